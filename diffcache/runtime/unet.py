"""How a UNet runs a plan: DeepCache branch choice per call, and the hooks that skip and inject branches.

The units (`diffcache.adapters.unet`) are nested shells; a step's plan row is a run of recomputed units then
reused ones, and the first reused unit is the call's *branch*: everything at or deeper than it is skipped,
and the decoder layer consuming its skip gets the cached feature ``F`` instead (for unit 0, the whole body's
output). Store keys are ``(unit, 0)``; each value is the feature tensor, with its memory format kept beside it.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.hooks.hooks import ModelHook

from ..adapters.base import BLOCK
from ..adapters.unet import UNetAdapter, UNetLayer
from ..errors import AccelerationStateError, UnsupportedModelError
from .family import UNIT_HOOK, FamilyRuntime, Hooked, register_runtime



@register_runtime(UNetAdapter)
class UNetRuntime(FamilyRuntime):
    """DeepCache branches: one reused shell (and everything deeper) per call."""

    adapter: UNetAdapter

    def __init__(self, executor: Any) -> None:
        super().__init__(executor)
        self.branch: int | None = None  # this call's first reused unit (None: the call computes everything)

    def hooks(self, granularity: str) -> list[Hooked]:
        return [(layer.module, UNetLayerHook(self.executor, self, layer), UNIT_HOOK) for layer in self.adapter.layers]

    def use_plan(self, plan: Any) -> list[list[bool]]:
        needed = [[False] for _ in plan.units]
        for row in plan.recompute[:, :, 0].tolist():
            branch = _first_reuse(row)
            if branch is not None:
                needed[branch][0] = True
        return needed

    def begin_call(self, args: tuple, kwargs: dict) -> None:
        ex = self.executor
        self.branch = self._branch()
        if not all(all(bits) for bits in ex.row):
            prepare_reuse_call(kwargs, self.branch)

    def end_call(self) -> None:
        self.branch = None

    def _branch(self) -> int | None:
        """The shallowest reused branch whose feature is cached; deeper units are skipped with it."""
        ex = self.executor
        first = _first_reuse([bits[0] for bits in ex.row])
        branch = None
        if first is not None:
            for unit in range(first, len(ex.row)):
                if (unit, 0) in ex.store:
                    branch = unit
                    break
            if branch != first:
                ex.warn_missing(ex.plan.units[first])
        recorded = branch if branch is not None else len(ex.row)
        ex.stats.add(ex.step, slice(0, recorded), 1, 0)
        ex.stats.add(ex.step, slice(recorded, None), 0, 1)
        return branch


def prepare_reuse_call(kwargs: dict, branch: int | None) -> None:
    """ControlNet residuals stay correct on a cached step: the UNet adds residual ``j`` to skip ``s_j`` and the mid
    residual to the mid block's output. With ``branch`` the first reused unit, skips ``s_0..s_{branch-1}`` are
    computed fresh and get their fresh residuals; deeper skips and the mid output are zero-channel placeholders
    whose consumers are skipped, so their residuals become zero-channel too (the cached feature carries the
    control of its key step, exactly as it carries every other deep feature of that step). T2I-Adapter residuals
    enter *inside* the down blocks, which a cached step does not run: refused."""
    if kwargs.get("down_intrablock_additional_residuals") is not None:
        raise UnsupportedModelError(
            "the UNet was called with down_intrablock_additional_residuals (T2I-Adapter); they are added inside "
            "down blocks that a DeepCache step skips, so cached steps would drop them. Run this pipeline with "
            "the 'none' schedule (or diffcache.restore(pipe)); ControlNet residuals are supported"
        )
    if branch is None:
        return
    down = kwargs.get("down_block_additional_residuals")
    if down is not None:
        kwargs["down_block_additional_residuals"] = tuple(
            r if j < branch else _empty_like(r) for j, r in enumerate(down)
        )
    if kwargs.get("mid_block_additional_residual") is not None:
        kwargs["mid_block_additional_residual"] = _empty_like(kwargs["mid_block_additional_residual"])


def _empty_like(residual: torch.Tensor) -> torch.Tensor:
    """A zero-channel tensor that broadcasts onto any zero-channel placeholder of the same batch."""
    return residual[:, :0, :1, :1]


class UNetLayerHook(ModelHook):
    """A UNet module inside a DeepCache branch: skipped when its unit is reused. The decoder resnet consuming
    skip ``j`` is where unit ``j + 1``'s feature ``F_j`` is captured and injected; the last up block is where
    unit 0's feature (the body's output) is."""

    def __init__(self, executor: Any, runtime: UNetRuntime, layer: UNetLayer) -> None:
        super().__init__()
        self.executor, self.runtime, self.layer = executor, runtime, layer

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        ex, layer = self.executor, self.layer
        if not ex.in_call:
            return self.fn_ref.original_forward(*args, **kwargs)
        branch = self.runtime.branch
        if layer.body_output:
            if branch == 0:
                return ex.cached((0, 0))
            output = self.fn_ref.original_forward(*args, **kwargs)
            if ex.wanted[0][0]:
                ex.store.notes[(0, 0)] = _memory_format(output)
                ex.put((0, 0), output)
            return output
        if branch is not None and layer.member is not None and layer.member >= branch:
            return self._placeholder(args, kwargs)
        j = layer.consumes
        if j is not None:
            x, args, kwargs = _pop_input(args, kwargs)
            if j + 1 == branch:
                if x.shape[1] != layer.skip_channels:
                    raise AccelerationStateError(
                        f"{layer.name} got {x.shape[1]} channels on a cached step, expected the "
                        f"{layer.skip_channels}-channel skip alone; the UNet's forward differs from diffusers'"
                    )
                feature = ex.cached((branch, 0))
                # Same memory layout as on the full step (oneDNN may hand out channels_last), so the resnet
                # computes in the same order and unchanged inputs reproduce the full step bit for bit.
                x = torch.cat([feature, x], dim=1).contiguous(memory_format=ex.store.notes[(branch, 0)])
            elif ex.wanted[j + 1][0]:
                ex.store.notes[(j + 1, 0)] = _memory_format(x)
                ex.put((j + 1, 0), x[:, : x.shape[1] - layer.skip_channels].clone())
            args = (x, *args)
        return self.fn_ref.original_forward(*args, **kwargs)

    def _placeholder(self, args: tuple, kwargs: dict) -> Any:
        # A zero-channel view keeps batch and spatial size, so the UNet's concatenations still line up and the
        # decoder layer consuming the cached branch receives exactly its fresh skip tensor.
        x = _pop_input(args, kwargs)[0]
        empty = x[:, :0]
        if not self.layer.wraps_output:
            return empty
        if kwargs.get("return_dict", True) is False:
            return (empty,)
        from diffusers.models.modeling_outputs import Transformer2DModelOutput

        return Transformer2DModelOutput(sample=empty)


_INPUT_NAMES = ("hidden_states", "input_tensor", "sample")  # how diffusers' UNet blocks name a layer's input


def _pop_input(args: tuple, kwargs: dict) -> tuple[torch.Tensor, tuple, dict]:
    """A UNet layer's main input, and the call's other arguments: positional first (SD's blocks), or by keyword
    (the motion blocks call ``resnet(input_tensor=..., temb=...)``)."""
    if args:
        return args[0], args[1:], kwargs
    for name in _INPUT_NAMES:
        if name in kwargs:
            rest = dict(kwargs)
            return rest.pop(name), (), rest
    raise AccelerationStateError(f"a UNet layer was called without a positional input or one of {_INPUT_NAMES}")


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    return torch.channels_last if channels_last else torch.contiguous_format


def _first_reuse(bits: list[bool]) -> int | None:
    for unit, bit in enumerate(bits):
        if not bit:
            return unit
    return None


__all__ = ["BLOCK", "UNetLayerHook", "UNetRuntime", "prepare_reuse_call"]
