"""How a transformer runs a plan: block residuals, pre-gate component outputs, and whole-stack caching.

Store keys are ``(unit, component)``. A block's value is its residual per input stream (output minus input);
a component's is the sub-module's output before the block applies its timestep gate (`diffcache.adapters.dit`).

With block caching and whole steps only (every step computes or reuses every block), the stack's residual is
cached once instead of one per block, and a reuse step adds it at the first block (the others pass their
input on): one subtraction per computed step, one add (and forecast) per reused step, as TaylorSeer's
whole-body cache. Exact (up to rounding) when the blocks feed each other directly, which the first computed
call checks on ``chain`` (each block's inputs and outputs); otherwise per-block caching.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.hooks.hooks import ModelHook

from ..adapters.dit import TransformerAdapter, TransformerUnit, block_input
from ..errors import AccelerationStateError
from .family import COMPONENT_HOOK, UNIT_HOOK, FamilyRuntime, Hooked, register_runtime

STACK = ("stack",)
"""Store key of a transformer's whole-stack residual (last block's output minus first block's input)."""


@register_runtime(TransformerAdapter)
class TransformerRuntime(FamilyRuntime):
    """Blocks and components served one by one, or the whole stack at once (see the module docstring)."""

    adapter: TransformerAdapter

    def __init__(self, executor: Any) -> None:
        super().__init__(executor)
        self.fuse_blocks = False  # this plan reuses whole steps of blocks: cache the stack's residual
        self.chain_checked = False  # the first computed call showed the blocks feed each other directly
        self.fused = False  # this call reuses the stack
        self.chain: list[tuple[tuple, tuple]] = []

    def hooks(self, granularity: str) -> list[Hooked]:
        ex, hooks = self.executor, []
        for u, unit in enumerate(self.adapter.units):
            if granularity == "block":
                hooks.append((unit.module, BlockHook(ex, self, u, unit), UNIT_HOOK))
                continue
            for c, name in enumerate(self.adapter.component_names):
                if name in unit.components:
                    hooks.append((unit.components[name], ComponentHook(ex, u, c), COMPONENT_HOOK))
        return hooks

    def use_plan(self, plan: Any) -> list[list[bool]]:
        reused_rows = (~plan.recompute).all(axis=(1, 2))
        self.fuse_blocks = (plan.granularity == "block" and len({unit.streams for unit in self.adapter.units}) == 1
                            and bool(reused_rows.any())
                            and bool((reused_rows | plan.recompute.all(axis=(1, 2))).all()))
        self.chain_checked = False
        return super().use_plan(plan)

    def begin_call(self, args: tuple, kwargs: dict) -> None:
        ex = self.executor
        self.fused = self.fuse_blocks and self.chain_checked and not any(any(bits) for bits in ex.row)
        if self.fused and STACK not in ex.store:
            ex.warn_missing("the block stack")
            self.fused = False
            ex.row = [[True] * len(bits) for bits in ex.row]
        ex.row = ex.available_row(fused=self.fused)
        self.chain = []

    def end_call(self) -> None:
        if self.fuse_blocks and self.chain:
            self._cache_stack()

    def _cache_stack(self) -> None:
        """After a call that computed every block: cache the stack's residual; the first time, check the chain."""
        ex = self.executor
        chain, self.chain = self.chain, []
        chained = len(chain) == len(ex.plan.units) and all(
            all(a is b for a, b in zip(inputs, previous_outputs))
            for (_, previous_outputs), (inputs, _) in zip(chain, chain[1:]))
        if not chained:  # something runs between blocks: cache block by block
            self.fuse_blocks = False
            ex.set_needed((~ex.plan.recompute).any(axis=0).tolist())
            return
        if not self.chain_checked:  # from now on the per-block residuals are not needed
            self.chain_checked = True
            ex.set_needed([[False] * len(bits) for bits in ex.needed])
            for key in [k for k in ex.written if k != STACK]:
                ex.store.values.pop(key, None)
            ex.written = []
        inputs, outputs = chain[0][0], chain[-1][1]
        ex.put(STACK, tuple(None if o is None else o - x for x, o in zip(inputs, outputs)))


class ComponentHook(ModelHook):
    """Caches a transformer block's sub-module output (pre-gate) and serves it on reuse steps."""

    def __init__(self, executor: Any, unit: int, component: int) -> None:
        super().__init__()
        self.executor, self.unit, self.component = executor, unit, component

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        ex = self.executor
        if not ex.in_call:
            return self.fn_ref.original_forward(*args, **kwargs)
        key = (self.unit, self.component)
        if not ex.row[self.unit][self.component]:  # the executor made sure the cache has it
            return ex.cached(key)
        output = self.fn_ref.original_forward(*args, **kwargs)
        if ex.wanted[self.unit][self.component]:
            ex.put(key, output)
        return output


class BlockHook(ModelHook):
    """Caches a block's residual (output minus input, per stream); a reuse step adds it to the current input."""

    def __init__(self, executor: Any, runtime: TransformerRuntime, unit: int, spec: TransformerUnit) -> None:
        super().__init__()
        self.executor, self.runtime, self.unit, self.spec = executor, runtime, unit, spec
        self.streams = spec.streams

    def _input(self, name: str, args: tuple, kwargs: dict) -> torch.Tensor:
        return block_input(self.spec, name, args, kwargs)

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        ex, runtime = self.executor, self.runtime
        if not ex.in_call:
            return self.fn_ref.original_forward(*args, **kwargs)
        key, streams = (self.unit, 0), self.streams
        if not ex.row[self.unit][0]:
            if runtime.fused:  # every block reused: the first adds all their residuals, the rest pass it on
                inputs = tuple(self._input(s, args, kwargs) for s in streams)
                if self.unit == 0:
                    inputs = tuple(x if d is None else x + d for x, d in zip(inputs, ex.cached(STACK)))
                return inputs if self.spec.outputs is not None else inputs[0]
            deltas = ex.cached(key)
            outputs = tuple(None if d is None else self._input(s, args, kwargs) + d for s, d in zip(streams, deltas))
            return outputs if self.spec.outputs is not None else outputs[0]
        output = self.fn_ref.original_forward(*args, **kwargs)
        if runtime.fuse_blocks:
            runtime.chain.append((tuple(self._input(s, args, kwargs) for s in streams),
                                  output if self.spec.outputs is not None else (output,)))
        if ex.wanted[self.unit][0]:
            outputs = output if self.spec.outputs is not None else (output,)
            if not isinstance(outputs, tuple) or len(outputs) != len(streams) or not all(
                o is None or isinstance(o, torch.Tensor) for o in outputs
            ):
                raise AccelerationStateError(
                    f"{self.spec.name} ({type(module).__name__}) returned {type(output).__name__}; block caching "
                    "needs a tensor shaped like its first input. Choose other units= or a known block class"
                )
            deltas = tuple(None if o is None else o - self._input(s, args, kwargs) for s, o in zip(streams, outputs))
            ex.put(key, deltas)
        return output


__all__ = ["STACK", "BlockHook", "ComponentHook", "TransformerRuntime", "block_input"]
