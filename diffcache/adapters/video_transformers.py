"""Video transformer denoisers in diffusers: Wan (and VACE), SkyReels-V2, CogVideoX, HunyuanVideo, LTX-Video, Mochi,
Latte.

They are cached as the image transformers are (`diffcache.adapters.dit`, the same runtime): units are the blocks,
components are the attention / feed-forward sub-modules, whose outputs diffusers' video blocks take *before* they
apply the timestep gate and the residual add (checked block by block in diffusers 0.42: Wan/SkyReels multiply
``attn1``/``ffn`` by ``gate_msa``/``c_gate_msa`` and add ``attn2`` ungated; CogVideoX gates ``attn1`` and ``ff`` per
stream after the call; HunyuanVideo's double blocks are Flux-shaped and its single blocks gate ``proj_out``; LTX
gates ``attn1``/``ff``; Mochi passes ``attn1``/``ff`` outputs through its gated ``norm2``/``norm4``). So a reused
component is served to the current step's modulation, as FORA/ECAD require.

What differs from the image blocks is only the table below and Latte's unit order: Latte runs
``transformer_blocks[i]`` (spatial) then ``temporal_transformer_blocks[i]``, so its units interleave the two
lists in that order. Wan-VACE's control blocks (``vace_blocks``) are not units: they run every step and feed hints
between the main blocks (so the whole-stack cache is off there; blocks are served one by one).

Memory slicing (`slice_targets`) cuts the feed-forwards over tokens (their 4x-wide hidden layer is the largest
intermediate of a block). Attention over all of a clip's tokens mixes every frame and position, so no frame or
space slicing applies; norms are per token but their output is as large as their input, so cutting them alone
saves nothing. Latte is the exception: its attention is factorised, so its spatial attentions are cut over frames
and its temporal attentions over positions. The cuts are at the components, never around a block: a component
cache hook inside a cut block would see one chunk per call and serve the last chunk to all of them.
"""

from __future__ import annotations

import torch

from .base import SliceRule, register_adapter
from .dit import _BLOCK_SPECS, BLOCK_LIST_NAMES, BlockSpecs, TransformerAdapter, TransformerUnit, make_unit

_TUPLE = ("hidden_states", "encoder_hidden_states")  # video blocks return (video, text) in this order

VIDEO_BLOCK_SPECS: BlockSpecs = {
    "WanTransformerBlock": (("attn1", "attn2", "ffn"), None),
    "SkyReelsV2TransformerBlock": (("attn1", "attn2", "ffn"), None),
    "CogVideoXBlock": (("attn1", "ff"), _TUPLE),
    "HunyuanVideoTransformerBlock": (("attn", "ff", "ff_context"), _TUPLE),
    "HunyuanVideoSingleTransformerBlock": (("attn", "proj_mlp", "proj_out"), _TUPLE),
    "HunyuanVideoTokenReplaceTransformerBlock": (("attn", "ff", "ff_context"), _TUPLE),
    "HunyuanVideoTokenReplaceSingleTransformerBlock": (("attn", "proj_mlp", "proj_out"), _TUPLE),
    "LTXVideoTransformerBlock": (("attn1", "attn2", "ff"), None),
    "MochiTransformerBlock": (("attn1", "ff", "ff_context"), _TUPLE),
}
"""Video block class -> (cached sub-modules, output streams). Latte's blocks are `BasicTransformerBlock`s."""

_LATTE_LISTS = ("transformer_blocks", "temporal_transformer_blocks")


class VideoTransformerAdapter(TransformerAdapter):
    """diffusers' video transformers: the transformer family with the video blocks' components."""

    block_specs = {**_BLOCK_SPECS, **VIDEO_BLOCK_SPECS}

    def slice_targets(self) -> list[tuple[torch.nn.Module, SliceRule]]:
        from diffusers.models.attention import FeedForward

        targets = [(module, SliceRule("tokens")) for module in self.denoiser.modules() if isinstance(module, FeedForward)]
        if _is_latte(self.denoiser):
            companions = ("encoder_hidden_states", "attention_mask")
            for name, kind in zip(_LATTE_LISTS, ("frames", "positions")):
                for block in getattr(self.denoiser, name):
                    targets += [(attn, SliceRule(kind, companions=companions))
                                for attn in (block.attn1, getattr(block, "attn2", None)) if attn is not None]
        return targets

    def _find_units(self, denoiser: torch.nn.Module) -> list[TransformerUnit]:
        if not _is_latte(denoiser):
            return super()._find_units(denoiser)
        spatial, temporal = (getattr(denoiser, name) for name in _LATTE_LISTS)
        return [make_unit(f"{name}.{i}", blocks[i], specs=self.block_specs)
                for i in range(len(spatial)) for name, blocks in zip(_LATTE_LISTS, (spatial, temporal))]


def _is_latte(denoiser: torch.nn.Module) -> bool:
    lists = [getattr(denoiser, name, None) for name in _LATTE_LISTS]
    return type(denoiser).__name__ == "LatteTransformer3DModel" and all(
        isinstance(blocks, torch.nn.ModuleList) for blocks in lists) and len(lists[0]) == len(lists[1])


def _is_video_transformer(denoiser: torch.nn.Module) -> bool:
    if _is_latte(denoiser):
        return True
    return any(type(block).__name__ in VIDEO_BLOCK_SPECS
               for name in BLOCK_LIST_NAMES if isinstance(getattr(denoiser, name, None), torch.nn.ModuleList)
               for block in getattr(denoiser, name))


register_adapter("video-transformer", _is_video_transformer, before="transformer")(VideoTransformerAdapter)

__all__ = ["VIDEO_BLOCK_SPECS", "VideoTransformerAdapter"]
