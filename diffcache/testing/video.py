"""Tiny, seeded, offline diffusers *video* pipelines for tests.

The video counterpart of :mod:`diffcache.testing.pipelines`: every pipeline is a real
diffusers pipeline class assembled from real diffusers / transformers model classes with
the small configs of diffusers' own pipeline tests (``tests/pipelines/<family>``) and
random weights, so feature caching can be exercised on video denoisers without any
download:

- ``"wan"``: ``WanPipeline`` (``WanTransformer3DModel``, ``AutoencoderKLWan``, UMT5 encoder)
- ``"skyreels-v2"``: ``SkyReelsV2Pipeline`` (``SkyReelsV2Transformer3DModel``, Wan VAE, UniPC)
- ``"skyreels-v2-df"``: ``SkyReelsV2DiffusionForcingPipeline`` (same components, diffusion forcing)
- ``"cogvideox"``: ``CogVideoXPipeline`` (``CogVideoXTransformer3DModel``, ``AutoencoderKLCogVideoX``)
- ``"ltx"``: ``LTXPipeline`` (``LTXVideoTransformer3DModel``, ``AutoencoderKLLTXVideo``)
- ``"mochi"``: ``MochiPipeline`` (``MochiTransformer3DModel``, ``AutoencoderKLMochi``)
- ``"hunyuanvideo"``, ``"latte"``, ``"animatediff"`` (``UNetMotionModel``), ``"svd"``
  (``UNetSpatioTemporalConditionModel``): built by :mod:`diffcache.testing.video_more`

Each denoiser has 2 transformer blocks (diffusers' tests use 1 for CogVideoX and LTX) so
that block-level caching has something to skip. Text encoders are the tiny T5 (UMT5 for
Wan) encoders of :mod:`diffcache.testing.pipelines` with ``d_model`` 32, fed by its
offline T5 tokenizer. Weights are drawn per component exactly as there (the transformer
under seed offset 1, the VAE under 2, the text encoder under 3), so the same seed gives
bit-identical pipelines and the caller's global RNG state is left untouched. No layer of
these models is all-zero after construction (diffusers 0.42), so ``_seeded``'s re-init is
only a safeguard; Mochi's ``pos_frequencies`` (a parameter, not a layer) stays at its
constructor's zeros, as in diffusers' test, which makes its RoPE the identity.

With the default ``causal_block_size`` (1) and ``ar_step`` (0), ``"skyreels-v2-df"``
denoises all frames synchronously and matches ``"skyreels-v2"`` up to float rounding. The
SkyReels-V2 pipelines need ``ftfy`` (the ``video`` extra).

Example::

    pipe = build_video_pipeline("wan", seed=0)
    frames = pipe(**video_call_kwargs("wan")).frames  # (1, 9, 32, 32, 3)
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, TypeVar

import torch
from diffusers import (
    AutoencoderKLCogVideoX,
    AutoencoderKLLTXVideo,
    AutoencoderKLMochi,
    AutoencoderKLWan,
    CogVideoXDDIMScheduler,
    CogVideoXPipeline,
    CogVideoXTransformer3DModel,
    DiffusionPipeline,
    FlowMatchEulerDiscreteScheduler,
    LTXPipeline,
    LTXVideoTransformer3DModel,
    MochiPipeline,
    MochiTransformer3DModel,
    SkyReelsV2DiffusionForcingPipeline,
    SkyReelsV2Pipeline,
    SkyReelsV2Transformer3DModel,
    UniPCMultistepScheduler,
    WanPipeline,
    WanTransformer3DModel,
)
from transformers import UMT5Config, UMT5EncoderModel

from diffcache.optional import require
from diffcache.testing.video_more import BUILDERS as _MORE_BUILDERS
from diffcache.testing.video_more import VIDEO_MORE_NAMES, video_more_kwargs
from diffcache.testing.pipelines import _MAX_SEQ, _PROMPTS, _TEXT_DIM, _TEXT_VOCAB, _seeded, _t5_encoder, _t5_tokenizer

__all__ = ["VIDEO_PIPELINE_NAMES", "VIDEO_UNETS", "build_video_pipeline", "video_call_kwargs"]

logger = logging.getLogger(__name__)

_OWN_NAMES = ("wan", "skyreels-v2", "skyreels-v2-df", "cogvideox", "ltx", "mochi")
VIDEO_PIPELINE_NAMES: tuple[str, ...] = _OWN_NAMES + VIDEO_MORE_NAMES
"""All pipeline names accepted by :func:`build_video_pipeline` and :func:`video_call_kwargs`."""

VIDEO_UNETS: tuple[str, ...] = ("animatediff", "svd")
"""The names whose denoiser is a UNet (cached by DeepCache branches)."""

_NUM_LAYERS = 2  # transformer blocks per denoiser

# (height, width, num_frames, guidance_scale) per name. Frames and guidance are those of
# diffusers' pipeline tests; frame counts follow each VAE's temporal factor: 4k + 1 (Wan,
# CogVideoX), 8k + 1 (LTX), 6k + 1 (Mochi). The tests' 16 x 16 px leaves one token per latent
# frame after the 8x VAE and 2x2 patches, so 32 x 32 is used everywhere: 4 tokens per latent
# frame (64 for LTX, whose tiny VAE downsamples 4x with 1x1 patches).
_CALL: dict[str, tuple[int, int, int, float]] = {
    "wan": (32, 32, 9, 6.0),
    "skyreels-v2": (32, 32, 9, 6.0),
    "skyreels-v2-df": (32, 32, 9, 6.0),
    "cogvideox": (32, 32, 9, 6.0),
    "ltx": (32, 32, 9, 3.0),
    "mochi": (32, 32, 7, 4.5),
}


# --------------------------------------------------------------------------- helpers


def _check(name: str) -> None:
    if name not in VIDEO_PIPELINE_NAMES:
        raise ValueError(f"unknown video pipeline name {name!r}; valid names: {', '.join(VIDEO_PIPELINE_NAMES)}")


def _umt5_encoder(seed: int, offset: int) -> UMT5EncoderModel:
    return _t5_encoder(seed, offset, _TEXT_DIM, UMT5Config, UMT5EncoderModel)


def _wan_vae(seed: int, offset: int) -> AutoencoderKLWan:
    """Tiny Wan 2.1 VAE: 16 latent channels, spatial factor 8, temporal factor 4."""
    return _seeded(
        seed,
        offset,
        lambda: AutoencoderKLWan(
            base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]
        ),
    )


_WanLike = TypeVar("_WanLike", WanTransformer3DModel, SkyReelsV2Transformer3DModel)


def _wan_like_transformer(seed: int, offset: int, cls: type[_WanLike]) -> _WanLike:
    """Tiny Wan / SkyReels-V2 DiT (2 heads x 12 = inner dim 24, text dim 32, 2x2 patches)."""
    return _seeded(
        seed,
        offset,
        lambda: cls(
            patch_size=(1, 2, 2),
            num_attention_heads=2,
            attention_head_dim=12,
            in_channels=16,
            out_channels=16,
            text_dim=_TEXT_DIM,
            freq_dim=256,
            ffn_dim=32,
            num_layers=_NUM_LAYERS,
            cross_attn_norm=True,
            qk_norm="rms_norm_across_heads",
            rope_max_seq_len=32,
        ),
    )


# -------------------------------------------------------------------------- builders


def _build_wan(seed: int) -> DiffusionPipeline:
    return WanPipeline(
        tokenizer=_t5_tokenizer(),
        text_encoder=_umt5_encoder(seed, 3),
        vae=_wan_vae(seed, 2),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
        transformer=_wan_like_transformer(seed, 1, WanTransformer3DModel),
    )


def _require_ftfy() -> None:
    # The SkyReels-V2 pipelines (diffusers 0.42) import ftfy only if it is installed but call ftfy.fix_text on
    # every prompt, so without it they raise NameError; say which extra provides it instead.
    require("ftfy", "video", "diffusers' SkyReels-V2 pipelines (they clean prompts with ftfy)")


def _skyreels_components(seed: int) -> dict[str, Any]:
    return {
        "tokenizer": _t5_tokenizer(),
        "text_encoder": _umt5_encoder(seed, 3),
        "transformer": _wan_like_transformer(seed, 1, SkyReelsV2Transformer3DModel),
        "vae": _wan_vae(seed, 2),
        # diffusers' test leaves prediction_type at "epsilon"; the SkyReels-V2 checkpoints predict flow.
        "scheduler": UniPCMultistepScheduler(flow_shift=8.0, use_flow_sigmas=True, prediction_type="flow_prediction"),
    }


def _build_skyreels_v2(seed: int) -> DiffusionPipeline:
    _require_ftfy()
    return SkyReelsV2Pipeline(**_skyreels_components(seed))


def _build_skyreels_v2_df(seed: int) -> DiffusionPipeline:
    _require_ftfy()
    return SkyReelsV2DiffusionForcingPipeline(**_skyreels_components(seed))


def _build_cogvideox(seed: int) -> DiffusionPipeline:
    height, width, frames, _ = _CALL["cogvideox"]
    transformer = _seeded(
        seed,
        1,
        lambda: CogVideoXTransformer3DModel(
            num_attention_heads=4,
            attention_head_dim=8,  # inner dim 32; must be divisible by 16 for the 3D sincos embedding
            in_channels=4,
            out_channels=4,
            time_embed_dim=2,
            text_embed_dim=_TEXT_DIM,
            num_layers=_NUM_LAYERS,
            sample_width=width // 8,
            sample_height=height // 8,
            sample_frames=frames,
            patch_size=2,
            temporal_compression_ratio=4,
            max_text_seq_length=_MAX_SEQ,
        ),
    )
    vae = _seeded(
        seed,
        2,
        lambda: AutoencoderKLCogVideoX(
            in_channels=3,
            out_channels=3,
            down_block_types=("CogVideoXDownBlock3D",) * 4,
            up_block_types=("CogVideoXUpBlock3D",) * 4,
            block_out_channels=(8, 8, 8, 8),
            latent_channels=4,
            layers_per_block=1,
            norm_num_groups=2,
            temporal_compression_ratio=4,
        ),
    )
    # CogVideoX-2b's scheduler (diffusers' test uses a plain DDIMScheduler).
    scheduler = CogVideoXDDIMScheduler(
        clip_sample=False,
        prediction_type="v_prediction",
        rescale_betas_zero_snr=True,
        timestep_spacing="trailing",
        snr_shift_scale=3.0,
    )
    return CogVideoXPipeline(
        tokenizer=_t5_tokenizer(),
        text_encoder=_t5_encoder(seed, 3, _TEXT_DIM),
        vae=vae,
        transformer=transformer,
        scheduler=scheduler,
    )


def _build_ltx(seed: int) -> DiffusionPipeline:
    transformer = _seeded(
        seed,
        1,
        lambda: LTXVideoTransformer3DModel(
            in_channels=8,
            out_channels=8,
            patch_size=1,
            patch_size_t=1,
            num_attention_heads=4,
            attention_head_dim=8,
            cross_attention_dim=32,
            num_layers=_NUM_LAYERS,
            caption_channels=_TEXT_DIM,
        ),
    )
    vae = _seeded(
        seed,
        2,
        lambda: AutoencoderKLLTXVideo(
            in_channels=3,
            out_channels=3,
            latent_channels=8,
            block_out_channels=(8, 8, 8, 8),
            decoder_block_out_channels=(8, 8, 8, 8),
            layers_per_block=(1, 1, 1, 1, 1),
            decoder_layers_per_block=(1, 1, 1, 1, 1),
            spatio_temporal_scaling=(True, True, False, False),
            decoder_spatio_temporal_scaling=(True, True, False, False),
            decoder_inject_noise=(False, False, False, False, False),
            upsample_residual=(False, False, False, False),
            upsample_factor=(1, 1, 1, 1),
            timestep_conditioning=False,
            patch_size=1,
            patch_size_t=1,
            encoder_causal=True,
            decoder_causal=False,
        ),
    )
    vae.use_framewise_encoding = False
    vae.use_framewise_decoding = False
    return LTXPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        text_encoder=_t5_encoder(seed, 3, _TEXT_DIM),
        tokenizer=_t5_tokenizer(),
        transformer=transformer,
    )


def _build_mochi(seed: int) -> DiffusionPipeline:
    transformer = _seeded(
        seed,
        1,
        lambda: MochiTransformer3DModel(
            patch_size=2,
            num_attention_heads=2,
            attention_head_dim=8,
            num_layers=_NUM_LAYERS,
            pooled_projection_dim=16,
            in_channels=12,
            out_channels=None,
            qk_norm="rms_norm",
            text_embed_dim=_TEXT_DIM,
            time_embed_dim=4,
            activation_fn="swiglu",
            max_sequence_length=_MAX_SEQ,
        ),
    )
    vae = _seeded(
        seed,
        2,
        lambda: AutoencoderKLMochi(
            latent_channels=12,
            out_channels=3,
            encoder_block_out_channels=(32, 32, 32, 32),
            decoder_block_out_channels=(32, 32, 32, 32),
            layers_per_block=(1, 1, 1, 1, 1),
        ),
    )
    return MochiPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        text_encoder=_t5_encoder(seed, 3, _TEXT_DIM),
        tokenizer=_t5_tokenizer(),
        transformer=transformer,
    )


_BUILDERS: dict[str, Callable[[int], DiffusionPipeline]] = {
    "wan": _build_wan,
    "skyreels-v2": _build_skyreels_v2,
    "skyreels-v2-df": _build_skyreels_v2_df,
    "cogvideox": _build_cogvideox,
    "ltx": _build_ltx,
    "mochi": _build_mochi,
    **_MORE_BUILDERS,
}


# ------------------------------------------------------------------------ public API


def build_video_pipeline(name: str, seed: int = 0) -> DiffusionPipeline:
    """Build the tiny random-weight video pipeline ``name`` (see :data:`VIDEO_PIPELINE_NAMES`).

    The pipeline is on CPU, fp32, in eval mode, with its progress bar disabled. The same
    ``seed`` always yields bit-identical weights, hence bit-identical outputs for the same
    call arguments and torch thread count.
    """
    _check(name)
    pipe = _BUILDERS[name](seed)
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()
    pipe.set_progress_bar_config(disable=True)
    logger.debug("built %s video pipeline %r (seed=%d)", type(pipe).__name__, name, seed)
    return pipe


def video_call_kwargs(name: str, num_inference_steps: int = 2, seed: int = 0, batch_size: int = 1) -> dict[str, Any]:
    """Keyword arguments for a quick deterministic ``pipe(**kwargs)`` call of video pipeline ``name``.

    Classifier-free guidance is active (``guidance_scale > 1``) for every pipeline; outputs
    are numpy videos of shape ``(batch_size, num_frames, height, width, 3)`` in ``.frames``,
    of 32 x 32 px and the frame counts of diffusers' tests (9 frames, 7 for Mochi).
    """
    _check(name)
    if name in VIDEO_MORE_NAMES:
        return video_more_kwargs(name, num_inference_steps, seed, batch_size)
    height, width, num_frames, guidance_scale = _CALL[name]
    kwargs: dict[str, Any] = {
        "prompt": [_PROMPTS[i % len(_PROMPTS)] for i in range(batch_size)],
        "height": height,
        "width": width,
        "num_frames": num_frames,
        "num_inference_steps": num_inference_steps,
        "guidance_scale": guidance_scale,
        "generator": torch.Generator("cpu").manual_seed(seed),
        "max_sequence_length": _MAX_SEQ,
        "output_type": "np",
    }
    return kwargs
