"""Video UNets in diffusers: AnimateDiff's `UNetMotionModel` and Stable Video Diffusion's
`UNetSpatioTemporalConditionModel`, cached by DeepCache branches exactly as image UNets are (`diffcache.adapters.unet`,
the same runtime).

Both keep the SD encoder/decoder wiring (the decoder resnet consuming skip ``j`` takes ``cat([F_j, s_j])``), with
frames folded into the batch. What differs is only which modules run beside each resnet and belong to its unit:
AnimateDiff runs ``resnet -> attention -> motion module`` per layer (``motion_modules``, temporal attention over
the frames), SVD's resnets are `SpatioTemporalResBlock`s (a spatial and a temporal resnet, channel counts on the
spatial one) and its attentions are `TransformerSpatioTemporalModel`s. A reused branch therefore skips the motion
and temporal layers of every deeper unit too, as DeepCache skips the deep spatial layers.
"""

from __future__ import annotations

import torch

from .base import register_adapter
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

    @staticmethod
    def resnet_channels(resnet: torch.nn.Module) -> tuple[int, int]:
        spatial = getattr(resnet, "spatial_res_block", resnet)  # SVD keeps the channel counts on its spatial half
        return spatial.in_channels, spatial.out_channels


def _is_video_unet(module: torch.nn.Module) -> bool:
    from diffusers import UNetMotionModel, UNetSpatioTemporalConditionModel

    return isinstance(module, (UNetMotionModel, UNetSpatioTemporalConditionModel))


register_adapter("video-unet", _is_video_unet, before="unet")(VideoUNetAdapter)

__all__ = ["VideoUNetAdapter"]
