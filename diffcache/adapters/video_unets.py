"""Video UNets in diffusers: AnimateDiff's `UNetMotionModel` and Stable Video Diffusion's
`UNetSpatioTemporalConditionModel`, cached by DeepCache branches exactly as image UNets are (`diffcache.adapters.unet`,
the same runtime).

Both keep the SD encoder/decoder wiring (the decoder resnet consuming skip ``j`` takes ``cat([F_j, s_j])``), with
frames folded into the batch. What differs is only which modules run beside each resnet and belong to its unit:
AnimateDiff runs ``resnet -> attention -> motion module`` per layer (``motion_modules``, temporal attention over
the frames), SVD's resnets are `SpatioTemporalResBlock`s (a spatial and a temporal resnet, channel counts on the
spatial one) and its attentions are `TransformerSpatioTemporalModel`s. A reused branch therefore skips the motion
and temporal layers of every deeper unit too, as DeepCache skips the deep spatial layers.

Memory slicing (`slice_targets`, Streamlined Inference's Feature Slicer): the spatial layers see frames folded into
the batch and never mix them, so they are cut over frames (resnets with their ``temb`` rows, spatial transformers
with their context rows, samplers); the temporal transformer blocks see ``batch x positions`` sequences of frames,
so they are cut over positions. The motion modules' GroupNorm (statistics over frames and space) and SVD's
temporal resnets (a 3-D convolution over frames, GroupNorm over frames and space) are left whole: cutting them
would change their statistics.
"""

from __future__ import annotations

import torch

from .base import SliceRule, register_adapter
from .unet import UNetAdapter

_MOTION_DOWN = ("DownBlockMotion", "CrossAttnDownBlockMotion")
_MOTION_UP = ("UpBlockMotion", "CrossAttnUpBlockMotion")
_SVD_DOWN = ("DownBlockSpatioTemporal", "CrossAttnDownBlockSpatioTemporal")
_SVD_UP = ("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal")


class VideoUNetAdapter(UNetAdapter):
    """DeepCache branches of AnimateDiff's motion UNet and SVD's spatio-temporal UNet."""

    down_blocks = _MOTION_DOWN + _SVD_DOWN
    up_blocks = _MOTION_UP + _SVD_UP
    beside_resnets = ("attentions", "motion_modules")
    wrapped_outputs = ("Transformer2DModel", "TransformerSpatioTemporalModel")

    def slice_targets(self) -> list[tuple[torch.nn.Module, SliceRule]]:
        from diffusers.models.attention import BasicTransformerBlock, TemporalBasicTransformerBlock
        from diffusers.models.resnet import Downsample2D, ResnetBlock2D, Upsample2D
        from diffusers.models.transformers.transformer_2d import Transformer2DModel
        from diffusers.models.transformers.transformer_temporal import TransformerSpatioTemporalModel
        from diffusers.models.unets.unet_motion_model import AnimateDiffTransformer3D

        frames = SliceRule("frames", "hidden_states", ("encoder_hidden_states",))
        targets: list[tuple[torch.nn.Module, SliceRule]] = []
        for module in self.denoiser.modules():
            if isinstance(module, ResnetBlock2D):
                targets.append((module, SliceRule("frames", "input_tensor", ("temb",))))
            elif isinstance(module, (Downsample2D, Upsample2D, Transformer2DModel)):
                targets.append((module, frames))
            elif isinstance(module, AnimateDiffTransformer3D):
                targets += [(block, SliceRule("positions", "hidden_states", ("encoder_hidden_states",)))
                            for block in module.transformer_blocks if isinstance(block, BasicTransformerBlock)]
            elif isinstance(module, TransformerSpatioTemporalModel):
                targets += [(block, frames) for block in module.transformer_blocks]
                targets += [(block, SliceRule("positions-folded", "hidden_states", ("encoder_hidden_states",)))
                            for block in module.temporal_transformer_blocks
                            if isinstance(block, TemporalBasicTransformerBlock)]
        return targets

    @staticmethod
    def resnet_channels(resnet: torch.nn.Module) -> tuple[int, int]:
        spatial = getattr(resnet, "spatial_res_block", resnet)  # SVD keeps the channel counts on its spatial half
        return spatial.in_channels, spatial.out_channels


def _is_video_unet(module: torch.nn.Module) -> bool:
    from diffusers import UNetMotionModel, UNetSpatioTemporalConditionModel

    return isinstance(module, (UNetMotionModel, UNetSpatioTemporalConditionModel))


register_adapter("video-unet", _is_video_unet, before="unet")(VideoUNetAdapter)

__all__ = ["VideoUNetAdapter"]
