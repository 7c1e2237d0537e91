"""The hooks: one leader on the denoiser decides per call, followers on units/components obey.

All hooks subclass diffusers' ``ModelHook`` and are attached per instance through `runtime.attach`. Only the
leader is stateful (it owns the executor's per-generation caches); followers read the executor.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.hooks.hooks import BaseState, ModelHook, StateManager

from ..adapters.dit import TransformerUnit
from ..adapters.unet import UNetLayer
from ..errors import AccelerationStateError
from .executor import STACK, Executor


class _NoState(BaseState):
    def reset(self, *args, **kwargs) -> None:
        pass


class ContextTracker(StateManager):
    """Receives diffusers' ``cache_context("cond"/"uncond")`` so split-CFG calls get their own caches.

    diffusers' ``_set_cache_context`` pushes the context into every ``StateManager`` attribute of the stateful
    hooks under the model, which is how a pipeline's ``with transformer.cache_context(...)`` reaches us.
    """

    def __init__(self) -> None:
        super().__init__(_NoState)

    @property
    def name(self) -> str | None:
        return self._context.name if self._context is not None else None


class DenoiserHook(ModelHook):
    """Leader on the denoiser: opens and closes each call's decisions."""

    _is_stateful = True

    def __init__(self, executor: Executor) -> None:
        super().__init__()
        self.executor = executor
        self.contexts = ContextTracker()

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        if not self.executor.begin_call(args, kwargs, self.contexts.name):
            return self.fn_ref.original_forward(*args, **kwargs)
        try:
            return self.fn_ref.original_forward(*args, **kwargs)
        finally:
            self.executor.end_call()

    def reset_state(self, module: torch.nn.Module) -> torch.nn.Module:
        # diffusers calls this at the end of a pipeline call (maybe_free_model_hooks): free the caches.
        self.executor.release()
        return module


class ComponentHook(ModelHook):
    """Caches a transformer block's sub-module output (pre-gate) and serves it on reuse steps."""

    def __init__(self, executor: Executor, unit: int, component: int) -> None:
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
        if ex.needed[self.unit][self.component]:
            ex.put(key, output)
        return output


def block_input(spec: TransformerUnit, name: str, args: tuple, kwargs: dict) -> torch.Tensor:
    """The block's input stream ``name`` (``hidden_states``, ``encoder_hidden_states``) from its call arguments."""
    if name in kwargs:
        return kwargs[name]
    position = spec.input_positions[name]
    if position < len(args):
        return args[position]
    raise AccelerationStateError(f"{spec.name} was called without its {name!r} input")


class BlockHook(ModelHook):
    """Caches a block's residual (output minus input, per stream); a reuse step adds it to the current input."""

    def __init__(self, executor: Executor, unit: int, spec: TransformerUnit) -> None:
        super().__init__()
        self.executor, self.unit, self.spec = executor, unit, spec
        self.streams = spec.streams

    def _input(self, name: str, args: tuple, kwargs: dict) -> torch.Tensor:
        return block_input(self.spec, name, args, kwargs)

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        ex = self.executor
        if not ex.in_call:
            return self.fn_ref.original_forward(*args, **kwargs)
        key, streams = (self.unit, 0), self.streams
        if not ex.row[self.unit][0]:
            if ex.fused:  # every block reused: the first adds all their residuals, the rest pass it on
                inputs = tuple(self._input(s, args, kwargs) for s in streams)
                if self.unit == 0:
                    inputs = tuple(x if d is None else x + d for x, d in zip(inputs, ex.cached(STACK)))
                return inputs if self.spec.outputs is not None else inputs[0]
            deltas = ex.cached(key)
            outputs = tuple(None if d is None else self._input(s, args, kwargs) + d for s, d in zip(streams, deltas))
            return outputs if self.spec.outputs is not None else outputs[0]
        output = self.fn_ref.original_forward(*args, **kwargs)
        if ex.fuse_blocks:
            ex.chain.append((tuple(self._input(s, args, kwargs) for s in streams),
                             output if self.spec.outputs is not None else (output,)))
        if ex.needed[self.unit][0]:
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


class UNetLayerHook(ModelHook):
    """A UNet module inside a DeepCache branch: skipped when its unit is reused. The decoder resnet consuming
    skip ``j`` is where unit ``j + 1``'s feature ``F_j`` is captured and injected; the last up block is where
    unit 0's feature (the body's output) is."""

    def __init__(self, executor: Executor, layer: UNetLayer) -> None:
        super().__init__()
        self.executor, self.layer = executor, layer

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        ex, layer = self.executor, self.layer
        if not ex.in_call:
            return self.fn_ref.original_forward(*args, **kwargs)
        branch = ex.branch
        if layer.body_output:
            if branch == 0:
                return self._cached_feature(0)
            output = self.fn_ref.original_forward(*args, **kwargs)
            if ex.needed[0][0]:
                ex.put(("F", 0), (output, _memory_format(output)))
            return output
        if branch is not None and layer.member is not None and layer.member >= branch:
            return self._placeholder(args, kwargs)
        j = layer.consumes
        if j is not None:
            x = args[0]
            if j + 1 == branch:
                if x.shape[1] != layer.skip_channels:
                    raise AccelerationStateError(
                        f"{layer.name} got {x.shape[1]} channels on a cached step, expected the "
                        f"{layer.skip_channels}-channel skip alone; the UNet's forward differs from diffusers'"
                    )
                feature, memory_format = self._cached_feature(branch, with_format=True)
                # Same memory layout as on the full step (oneDNN may hand out channels_last), so the resnet
                # computes in the same order and unchanged inputs reproduce the full step bit for bit.
                joined = torch.cat([feature, x], dim=1).contiguous(memory_format=memory_format)
                args = (joined, *args[1:])
            elif ex.needed[j + 1][0]:
                ex.put(("F", j + 1), (x[:, : x.shape[1] - layer.skip_channels].clone(), _memory_format(x)))
        return self.fn_ref.original_forward(*args, **kwargs)

    def _cached_feature(self, unit: int, with_format: bool = False) -> Any:
        feature, memory_format = self.executor.cached(("F", unit))
        fix = self.executor.fix
        if fix is not None:  # CacheQuant's per-channel correction of the stale feature
            feature = feature * fix[0] + fix[1]
        return (feature, memory_format) if with_format else feature

    def _placeholder(self, args: tuple, kwargs: dict) -> Any:
        # A zero-channel view keeps batch and spatial size, so the UNet's concatenations still line up and the
        # decoder layer consuming the cached branch receives exactly its fresh skip tensor.
        x = args[0] if args else kwargs["hidden_states"]
        empty = x[:, :0]
        if not self.layer.wraps_output:
            return empty
        if kwargs.get("return_dict", True) is False:
            return (empty,)
        from diffusers.models.modeling_outputs import Transformer2DModelOutput

        return Transformer2DModelOutput(sample=empty)


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    return torch.channels_last if channels_last else torch.contiguous_format
