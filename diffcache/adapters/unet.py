"""UNet denoisers (`UNet2DConditionModel`: SD1.x/2.x/SDXL layouts; `UNet2DModel`): DeepCache skip branches.

DeepCache (specs/algorithms.md section 1): the encoder emits skip tensors ``s_0 .. s_{M-1}`` (``s_0`` =
``conv_in``, then one per down resnet[+attention] layer and one per downsampler) that the decoder consumes
in reverse. Caching at branch ``b`` keeps ``F_b``, the hidden state that entered the decoder layer consuming
``s_b`` at the last full step; a partial step runs ``conv_in``, the encoder layers producing ``s_1..s_b``, the
decoder layers consuming ``s_b..s_0`` and ``conv_out``, and skips everything deeper.

Units are the nested shells of that structure, shallowest first: unit ``u < M`` is the encoder layer that
produces ``s_u`` (unit 0: ``conv_in``) plus the decoder layer (and following upsampler) that consumes it; unit
``M`` is the mid block. Unit ``u``'s cache is the output of everything from unit ``u`` down: for ``u >= 1`` that
is ``F_{u-1}``, for unit 0 the output of the last up block, i.e. the whole UNet but its output head
(``conv_norm_out``/``conv_out``), which is where diffusers' TaylorSeerCache cuts a UNet. A step's bits must be a
run of ``True`` followed by ``False`` (a deeper shell cannot run when a shallower one is reused); the first
``False`` unit ``u`` is DeepCache's ``cache_branch_id = u - 1`` (``u = 1``: only ``conv_in``/``conv_out`` and the
last decoder layer run; ``u = 0``: only the output head runs).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from ..errors import ScheduleError, UnsupportedModelError
from .base import BLOCK, Adapter, Layout, register_adapter

_DOWN_BLOCKS = ("DownBlock2D", "CrossAttnDownBlock2D", "AttnDownBlock2D")
_UP_BLOCKS = ("UpBlock2D", "CrossAttnUpBlock2D", "AttnUpBlock2D")


@dataclass
class UNetLayer:
    """A hooked UNet module.

    Attributes:
        member: the unit it belongs to; it is skipped when that unit is at or deeper than the step's first
            reused unit.
        consumes: for decoder resnets, the skip index ``j``; its hidden input is unit ``j + 1``'s cache ``F_j``.
        skip_channels: channels of ``s_j`` in the resnet's concatenated input ``cat([F_j, s_j])``.
        wraps_output: the module returns an output object (a tuple with ``return_dict=False``), e.g. a
            ``Transformer2DModel``.
        body_output: the last up block, whose output is unit 0's cache (the whole UNet but its output head).
    """

    name: str
    module: torch.nn.Module
    member: int | None
    consumes: int | None = None
    skip_channels: int = 0
    wraps_output: bool = False
    body_output: bool = False


class UNetAdapter(Adapter):
    """DeepCache branches of a diffusers UNet: ``units[b + 1]`` is ``cache_branch_id b``; ``units[0]``
    (``conv_in``) caches the whole body.

    Subclasses for other UNet lines (`diffcache.adapters.video_unets`) name their block classes, the module lists
    that run beside each resnet, and the modules that return an output object rather than a tensor.
    """

    family = "unet"
    down_blocks: ClassVar[tuple[str, ...]] = _DOWN_BLOCKS
    up_blocks: ClassVar[tuple[str, ...]] = _UP_BLOCKS
    beside_resnets: ClassVar[tuple[str, ...]] = ("attentions",)
    """Module lists of a block whose ``i``-th entry runs after ``resnets[i]`` and belongs to its unit."""
    wrapped_outputs: ClassVar[tuple[str, ...]] = ("Transformer2DModel",)
    """Classes whose forward returns an output object (or a tuple with ``return_dict=False``)."""

    def __init__(self, denoiser: torch.nn.Module) -> None:
        super().__init__(denoiser)
        self.units, self.layers = _describe(denoiser, self)

    @staticmethod
    def resnet_channels(resnet: torch.nn.Module) -> tuple[int, int]:
        """``(in_channels, out_channels)`` of a block's resnet."""
        return resnet.in_channels, resnet.out_channels

    def layout(self, granularity: str = BLOCK) -> Layout:
        if granularity != BLOCK:
            raise UnsupportedModelError(
                "UNets are cached per skip branch (block granularity); component caching is for transformers"
            )
        return Layout(self.family, list(self.units), [BLOCK], nested=True)

    def slot_modules(self, granularity: str = BLOCK) -> dict[tuple[int, int], list[str]]:
        slots: dict[tuple[int, int], list[str]] = {}
        for layer in self.layers:
            if layer.member is not None:
                slots.setdefault((layer.member, 0), []).append(layer.name)
        return slots

    def feature_readers(self, units: set[int]) -> list[torch.nn.Module]:
        """Unit ``b >= 1``'s feature is read by the decoder resnet consuming skip ``b - 1`` (its ``conv1`` and
        ``conv_shortcut``); unit 0's (the body output) by the output head, which has no such layer here."""
        return [getattr(layer.module, attr) for layer in self.layers
                if layer.consumes is not None and layer.consumes + 1 in units
                for attr in ("conv1", "conv_shortcut") if getattr(layer.module, attr, None) is not None]

    def check_schedule(self, schedule) -> None:
        super().check_schedule(schedule)
        bits = schedule.recompute[:, :, 0]
        # True-run then False-run per step: a False followed later by a True is the violation.
        broken = (~bits[:, :-1] & bits[:, 1:]).any(axis=1)
        if broken.any():
            step = int(np.argmax(broken))
            row = "".join("1" if b else "0" for b in bits[step])
            raise ScheduleError(
                f"step {step}: UNet branch bits {row} recompute a deeper unit after reusing a shallower one; "
                "a UNet step reuses one branch feature, so bits must be 1...10...0 from shallow to deep"
            )


def _describe(unet: torch.nn.Module, adapter: UNetAdapter) -> tuple[list[str], list[UNetLayer]]:
    for kind, blocks, allowed in (("down", unet.down_blocks, adapter.down_blocks),
                                  ("up", unet.up_blocks, adapter.up_blocks)):
        bad = [type(b).__name__ for b in blocks if type(b).__name__ not in allowed]
        if bad:
            raise UnsupportedModelError(
                f"{type(unet).__name__} has {kind} blocks {bad}; DeepCache branches are supported for {allowed}. "
                "Pass units='<glob>' to cache chosen modules as whole blocks instead"
            )
    if unet.mid_block is None:
        raise UnsupportedModelError(f"{type(unet).__name__} has no mid block; DeepCache needs one")

    def layer(name: str, module: torch.nn.Module, member: int | None, **kw) -> UNetLayer:
        return UNetLayer(name, module, member, wraps_output=any(
            c.__name__ in adapter.wrapped_outputs for c in type(module).__mro__), **kw)

    def beside(block: torch.nn.Module, bi: int, i: int, kind: str, member: int) -> list[UNetLayer]:
        return [layer(f"{kind}_blocks.{bi}.{name}.{i}", getattr(block, name)[i], member)
                for name in adapter.beside_resnets if getattr(block, name, None) is not None]

    # Encoder: skip j is produced by unit j (s_0 by conv_in).
    skip_channels = [unet.conv_in.out_channels]
    units = ["conv_in"]
    layers = [layer("conv_in", unet.conv_in, 0)]
    for bi, block in enumerate(unet.down_blocks):
        for i, resnet in enumerate(block.resnets):
            unit = len(units)
            units.append(f"down_blocks.{bi}.resnets.{i}")
            layers.append(layer(units[-1], resnet, unit))
            layers += beside(block, bi, i, "down", unit)
            skip_channels.append(adapter.resnet_channels(resnet)[1])
        for i, sampler in enumerate(block.downsamplers or []):
            units.append(f"down_blocks.{bi}.downsamplers.{i}")
            layers.append(layer(units[-1], sampler, len(units) - 1))
            skip_channels.append(sampler.out_channels)
    units.append("mid_block")
    layers.append(layer("mid_block", unet.mid_block, len(units) - 1))

    # Decoder: resnets consume skips from the deepest; skip j's consumer belongs to unit j.
    j = len(skip_channels) - 1
    for bi, block in enumerate(unet.up_blocks):
        for i, resnet in enumerate(block.resnets):
            if j < 0:
                raise UnsupportedModelError(f"{type(unet).__name__}: decoder has more resnets than encoder skips")
            in_channels = adapter.resnet_channels(resnet)[0]
            if in_channels <= skip_channels[j]:
                raise UnsupportedModelError(
                    f"up_blocks.{bi}.resnets.{i} takes {in_channels} channels, not a hidden state plus the "
                    f"{skip_channels[j]}-channel skip {j}; unexpected UNet wiring"
                )
            name = f"up_blocks.{bi}.resnets.{i}"
            layers.append(layer(name, resnet, j, consumes=j, skip_channels=skip_channels[j]))
            layers += beside(block, bi, i, "up", j)
            j -= 1
        for i, sampler in enumerate(block.upsamplers or []):
            # It feeds the consumer of skip j (j+1 was just consumed), so it is part of F_j: unit j + 1.
            layers.append(layer(f"up_blocks.{bi}.upsamplers.{i}", sampler, j + 1))
    if j != -1:
        raise UnsupportedModelError(f"{type(unet).__name__}: {j + 1} encoder skips are never consumed by the decoder")
    # Its output is unit 0's cache; its layers are counted above, so it belongs to no unit itself.
    last = len(unet.up_blocks) - 1
    layers.append(UNetLayer(f"up_blocks.{last}", unet.up_blocks[last], None, body_output=True))
    return units, layers


def _is_unet(module: torch.nn.Module) -> bool:
    from diffusers import UNet2DConditionModel, UNet2DModel

    return isinstance(module, (UNet2DConditionModel, UNet2DModel))


register_adapter("unet", _is_unet)(UNetAdapter)
