"""Tiny, seeded, offline diffusers *video* pipelines for tests (companion of :mod:`diffcache.testing.pipelines`).

Every pipeline is a real diffusers video pipeline class assembled from real diffusers /
transformers model classes with small configs (after diffusers' own fast pipeline tests)
and random weights, so feature caching can be exercised on video denoisers without any
download:

- ``"hunyuanvideo"``: ``HunyuanVideoPipeline`` (``HunyuanVideoTransformer3DModel`` with dual-stream
  ``transformer_blocks`` and single-stream ``single_transformer_blocks``, ``AutoencoderKLHunyuanVideo``,
  a tiny ``LlamaModel`` + byte-level BPE tokenizer and a tiny CLIP text encoder, flow matching)
- ``"latte"``: ``LattePipeline`` (``LatteTransformer3DModel``: spatial ``transformer_blocks`` interleaved
  with ``temporal_transformer_blocks``, ``AutoencoderKL``, T5 encoder, DDIM)
- ``"animatediff"``: ``AnimateDiffPipeline`` (SD-layout ``UNet2DConditionModel`` + ``MotionAdapter``
  merged into a ``UNetMotionModel``, CLIP text encoder, DDIM)
- ``"svd"``: ``StableVideoDiffusionPipeline`` (``UNetSpatioTemporalConditionModel``,
  ``AutoencoderKLTemporalDecoder``, ``CLIPVisionModelWithProjection``, Euler / v-prediction), image-to-video

Weights follow the same rules as :mod:`diffcache.testing.pipelines`: each component is drawn
under ``torch.manual_seed(seed * 1000 + offset)`` with the caller's global RNG untouched, and
linear/conv layers left all-zero by a constructor are re-initialised so every block influences
the output. Tokenizers are built offline (CLIP byte-level BPE, T5 Unigram, and a Llama-3-style
byte-level BPE with header / end-of-turn special tokens).

Example::

    pipe = build_video_pipeline("latte", seed=0)   # diffcache.testing.video
    frames = pipe(**video_call_kwargs("latte")).frames  # (1, 4, 64, 64, 3)
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import PIL.Image
import torch
from diffusers import (
    AnimateDiffPipeline,
    AutoencoderKLHunyuanVideo,
    AutoencoderKLTemporalDecoder,
    DDIMScheduler,
    DiffusionPipeline,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    HunyuanVideoPipeline,
    HunyuanVideoTransformer3DModel,
    LattePipeline,
    LatteTransformer3DModel,
    MotionAdapter,
    StableVideoDiffusionPipeline,
    UNet2DConditionModel,
    UNetMotionModel,
    UNetSpatioTemporalConditionModel,
)
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import (
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
    LlamaConfig,
    LlamaModel,
    PreTrainedTokenizerFast,
)

from diffcache.testing.pipelines import (
    _MAX_SEQ,
    _PROMPTS,
    _TEXT_DIM,
    _TEXT_VOCAB,
    _WORDS,
    _bytes_to_unicode,
    _clip_text_encoder,
    _clip_tokenizer,
    _ddim,
    _seeded,
    _t5_encoder,
    _t5_tokenizer,
    _vae,
)

try:  # transformers >= 5 without torchvision: the PIL backend (CLIPImageProcessor would warn and fall back to it)
    from transformers import CLIPImageProcessorPil as _CLIPImageProcessor
except ImportError:  # pragma: no cover - older transformers
    from transformers import CLIPImageProcessor as _CLIPImageProcessor

__all__ = ["BUILDERS", "VIDEO_MORE_NAMES", "video_more_kwargs"]

logger = logging.getLogger(__name__)


# (side in pixels, number of frames) of the videos produced by ``video_more_kwargs``.
_VIDEO: dict[str, tuple[int, int]] = {
    "hunyuanvideo": (32, 9),  # VAE 8x spatial, 4x temporal (4k + 1 frames): 3 x 4 x 4 latent tokens
    "latte": (64, 4),  # per-frame 2D VAE (8x): 4 frames x 8 x 8 latents, 2x2 patches
    "animatediff": (64, 8),  # per-frame 2D VAE (8x): 8 frames x 8 x 8 latents
    "svd": (32, 4),  # 2-level temporal-decoder VAE (2x): 4 frames x 16 x 16 latents
}
_LLAMA_DIM = 16  # hidden size of the HunyuanVideo Llama text encoder (= transformer text_embed_dim)
_HUNYUAN_CLIP_DIM = 8  # hidden size of its CLIP encoder (= transformer pooled_projection_dim)
_LLAMA_SPECIALS = (
    "<|begin_of_text|>",  # 0 = bos
    "<|pad|>",  # 1 = pad
    "<|end_of_text|>",  # 2 = eos
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
)
# A miniature of diffusers' DEFAULT_PROMPT_TEMPLATE for HunyuanVideo (same chat layout, shorter system text).
_HUNYUAN_TEMPLATE = (
    "<|start_header_id|>system<|end_header_id|>\n\nDescribe the video in detail.<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\n{}<|eot_id|>"
)
_LLAMA_WORDS = sorted(set(_WORDS) | {"system", "user", "Describe", "video", "detail"})


# --------------------------------------------------------------------------- helpers


def _llama_tokenizer() -> PreTrainedTokenizerFast:
    """A Llama-3-style byte-level BPE tokenizer built in memory.

    ids: ``<|begin_of_text|>``=0 (prepended to every sequence), ``<|pad|>``=1, ``<|end_of_text|>``=2,
    then the chat special tokens, the 256 byte symbols and merges that spell the known words
    (with and without a leading space). Any text is encodable (unknown words fall back to bytes).
    """
    chars = _bytes_to_unicode()
    space = "\u0120"  # "Ġ", the byte-level symbol of " " (chars is not indexed by byte value)
    merges: list[tuple[str, str]] = []
    # Left-to-right merges, all space-prefixed words first so that " word" becomes one token.
    for piece in [space + w for w in _LLAMA_WORDS] + _LLAMA_WORDS:
        current = piece[0]
        for ch in piece[1:]:
            if (current, ch) not in merges:
                merges.append((current, ch))
            current += ch
    tokens = [*_LLAMA_SPECIALS, *chars, *("".join(m) for m in merges)]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(tokens))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in _LLAMA_SPECIALS])
    bos = _LLAMA_SPECIALS[0]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, vocab[bos])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=bos,
        pad_token=_LLAMA_SPECIALS[1],
        eos_token=_LLAMA_SPECIALS[2],
        model_max_length=256,
        padding_side="right",
    )


@functools.lru_cache(maxsize=1)
def _hunyuan_crop_start() -> int:
    """Tokens of the template before the prompt (bos included): dropped from the Llama states."""
    prefix = _HUNYUAN_TEMPLATE.split("{}")[0]
    return len(_llama_tokenizer()(prefix)["input_ids"])


def _llama_encoder(seed: int, offset: int, tokenizer: PreTrainedTokenizerFast) -> LlamaModel:
    """Tiny ``LlamaModel`` (hidden 16, 3 layers: HunyuanVideo reads the state two layers before the last)."""
    config = LlamaConfig(
        vocab_size=_TEXT_VOCAB,
        hidden_size=_LLAMA_DIM,
        intermediate_size=37,
        num_hidden_layers=3,
        num_attention_heads=4,
        hidden_act="silu",
        rms_norm_eps=1e-5,
        max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return _seeded(seed, offset, lambda: LlamaModel(config))


class _DropFp32CastWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "should be kept in float32" not in record.getMessage()


@contextlib.contextmanager
def _quiet_fp32_cast_warning() -> Iterator[None]:
    """Silence diffusers' spurious "modules ... should be kept in float32: []" warning, which
    ``UNetMotionModel.from_unet2d`` triggers by calling ``model.to(dtype)`` on a same-dtype model."""
    model_logger = logging.getLogger("diffusers.models.modeling_utils")
    drop = _DropFp32CastWarning()
    model_logger.addFilter(drop)
    try:
        yield
    finally:
        model_logger.removeFilter(drop)


def _svd_image(index: int, px: int) -> PIL.Image.Image:
    """A deterministic ``px`` x ``px`` RGB test picture (gradients plus a square), different per ``index``."""
    yy, xx = np.mgrid[0:px, 0:px].astype(np.float64) / (px - 1)
    shift = (0.37 * index) % 1.0
    square = ((np.abs(xx - 0.5) < 0.2) & (np.abs(yy - 0.5) < 0.2)).astype(np.float64)
    rgb = np.stack([(xx + shift) % 1.0, yy, 0.5 * (1.0 - xx) + 0.5 * square], axis=-1)
    return PIL.Image.fromarray(np.round(rgb * 255).astype(np.uint8))


# -------------------------------------------------------------------------- builders


def _build_hunyuanvideo(seed: int) -> DiffusionPipeline:
    transformer = _seeded(
        seed,
        1,
        lambda: HunyuanVideoTransformer3DModel(
            in_channels=4,
            out_channels=4,
            num_attention_heads=2,
            attention_head_dim=10,
            num_layers=2,  # dual-stream (MMDiT) blocks
            num_single_layers=2,  # single-stream blocks
            num_refiner_layers=1,
            patch_size=1,
            patch_size_t=1,
            guidance_embeds=True,  # guidance-distilled, as HunyuanVideo
            text_embed_dim=_LLAMA_DIM,
            pooled_projection_dim=_HUNYUAN_CLIP_DIM,
            rope_axes_dim=(2, 4, 4),  # sums to attention_head_dim
        ),
    )
    vae = _seeded(
        seed,
        2,
        lambda: AutoencoderKLHunyuanVideo(
            in_channels=3,
            out_channels=3,
            latent_channels=4,
            down_block_types=("HunyuanVideoDownBlock3D",) * 4,
            up_block_types=("HunyuanVideoUpBlock3D",) * 4,
            block_out_channels=(8, 8, 8, 8),
            layers_per_block=1,
            act_fn="silu",
            norm_num_groups=4,
            scaling_factor=0.476986,
            spatial_compression_ratio=8,
            temporal_compression_ratio=4,
            mid_block_add_attention=True,
        ),
    )
    tokenizer, tokenizer_2 = _llama_tokenizer(), _clip_tokenizer()
    return HunyuanVideoPipeline(
        text_encoder=_llama_encoder(seed, 3, tokenizer),
        tokenizer=tokenizer,
        transformer=transformer,
        vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
        text_encoder_2=_clip_text_encoder(seed, 4, tokenizer_2, hidden=_HUNYUAN_CLIP_DIM),
        tokenizer_2=tokenizer_2,
    )


def _build_latte(seed: int) -> DiffusionPipeline:
    px, frames = _VIDEO["latte"]
    heads, head_dim = 2, 16
    transformer = _seeded(
        seed,
        1,
        lambda: LatteTransformer3DModel(
            sample_size=px // 8,
            num_layers=2,  # 2 spatial + 2 temporal blocks
            patch_size=2,
            attention_head_dim=head_dim,
            num_attention_heads=heads,
            caption_channels=_TEXT_DIM,
            in_channels=4,
            cross_attention_dim=heads * head_dim,
            out_channels=8,  # learned sigma (the pipeline drops it)
            attention_bias=True,
            activation_fn="gelu-approximate",
            num_embeds_ada_norm=1000,
            norm_type="ada_norm_single",
            norm_elementwise_affine=False,
            norm_eps=1e-6,
            video_length=frames,  # temporal position embedding length must equal the frame count
        ),
    )
    return LattePipeline(
        tokenizer=_t5_tokenizer(),
        text_encoder=_t5_encoder(seed, 3, _TEXT_DIM),
        vae=_vae(seed, 2, sample_size=px),
        transformer=transformer,
        scheduler=_ddim(),
    )


def _build_animatediff(seed: int) -> DiffusionPipeline:
    px, _ = _VIDEO["animatediff"]
    channels = (16, 32)
    unet2d = _seeded(
        seed,
        1,
        lambda: UNet2DConditionModel(
            sample_size=px // 8,
            in_channels=4,
            out_channels=4,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            block_out_channels=channels,
            layers_per_block=2,
            norm_num_groups=8,
            cross_attention_dim=_TEXT_DIM,
            attention_head_dim=2,  # legacy name: number of heads
        ),
    )
    adapter = _seeded(
        seed,
        4,
        lambda: MotionAdapter(
            block_out_channels=channels,
            motion_layers_per_block=2,  # must equal the UNet's layers_per_block
            motion_norm_num_groups=8,
            motion_num_attention_heads=2,
            motion_max_seq_length=32,
        ),
    )
    # The pipeline would do this conversion itself; doing it under _seeded keeps the global RNG untouched.
    with _quiet_fp32_cast_warning():
        unet = _seeded(seed, 5, lambda: UNetMotionModel.from_unet2d(unet2d, adapter))
    tokenizer = _clip_tokenizer()
    return AnimateDiffPipeline(
        vae=_vae(seed, 2, sample_size=px),
        text_encoder=_clip_text_encoder(seed, 3, tokenizer),
        tokenizer=tokenizer,
        unet=unet,
        motion_adapter=adapter,
        scheduler=DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="linear", clip_sample=False),
        feature_extractor=None,
        image_encoder=None,
    )


def _build_svd(seed: int) -> DiffusionPipeline:
    px, frames = _VIDEO["svd"]
    channels = (32, 64)
    unet = _seeded(
        seed,
        1,
        lambda: UNetSpatioTemporalConditionModel(
            sample_size=px // 2,
            in_channels=8,  # noisy latents + conditioning image latents
            out_channels=4,
            down_block_types=("CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"),
            up_block_types=("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"),
            block_out_channels=channels,
            layers_per_block=2,
            cross_attention_dim=_TEXT_DIM,
            num_attention_heads=8,
            addition_time_embed_dim=32,
            projection_class_embeddings_input_dim=3 * 32,  # fps, motion bucket id, noise augmentation
            num_frames=frames,
        ),
    )
    vae = _seeded(
        seed,
        2,
        lambda: AutoencoderKLTemporalDecoder(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * len(channels),
            block_out_channels=channels,
            latent_channels=4,
            sample_size=px,
        ),
    )
    # Images given as PIL are resized to 224 px for the image encoder (ViT-B/32 layout: 7 x 7 patches).
    image_encoder = _seeded(
        seed,
        3,
        lambda: CLIPVisionModelWithProjection(
            CLIPVisionConfig(
                hidden_size=32,
                projection_dim=_TEXT_DIM,
                num_hidden_layers=2,
                num_attention_heads=4,
                intermediate_size=37,
                image_size=224,
                patch_size=32,
            )
        ),
    )
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        interpolation_type="linear",
        num_train_timesteps=1000,
        prediction_type="v_prediction",
        sigma_max=700.0,
        sigma_min=0.002,
        steps_offset=1,
        timestep_spacing="leading",
        timestep_type="continuous",
        use_karras_sigmas=True,
    )
    return StableVideoDiffusionPipeline(
        vae=vae,
        image_encoder=image_encoder,
        unet=unet,
        scheduler=scheduler,
        feature_extractor=_CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}),
    )


BUILDERS: dict[str, Callable[[int], DiffusionPipeline]] = {
    "hunyuanvideo": _build_hunyuanvideo,
    "latte": _build_latte,
    "animatediff": _build_animatediff,
    "svd": _build_svd,
}
"""Name -> builder; :func:`diffcache.testing.video.build_video_pipeline` is the public entry."""
VIDEO_MORE_NAMES: tuple[str, ...] = tuple(BUILDERS)


# ------------------------------------------------------------------------ public API


def video_more_kwargs(
    name: str, num_inference_steps: int = 2, seed: int = 0, batch_size: int = 1
) -> dict[str, Any]:
    """Keyword arguments for a quick deterministic ``pipe(**kwargs)`` call of video pipeline ``name``.

    Classifier-free guidance is active everywhere: HunyuanVideo runs true CFG
    (``true_cfg_scale`` > 1 with an empty negative prompt) on top of its distilled guidance
    embedding; SVD uses ``min_guidance_scale`` / ``max_guidance_scale`` > 1. Outputs are numpy
    videos of ``batch_size`` x frames x side x side x 3 (sizes in ``_VIDEO``); SVD gets
    ``batch_size`` deterministic PIL pictures as conditioning images instead of prompts.
    """
    px, frames = _VIDEO[name]
    kwargs: dict[str, Any] = {
        "num_inference_steps": num_inference_steps,
        "generator": torch.Generator("cpu").manual_seed(seed),
        "output_type": "np",
        "height": px,
        "width": px,
    }
    if name == "svd":
        images = [_svd_image(i, px) for i in range(batch_size)]
        return kwargs | {
            "image": images[0] if batch_size == 1 else images,
            "num_frames": frames,
            "min_guidance_scale": 1.5,
            "max_guidance_scale": 3.0,
        }
    kwargs["prompt"] = [_PROMPTS[i % len(_PROMPTS)] for i in range(batch_size)]
    if name == "hunyuanvideo":
        return kwargs | {
            "num_frames": frames,
            "guidance_scale": 4.5,  # embedded (distilled) guidance
            "true_cfg_scale": 2.0,
            "negative_prompt": [""] * batch_size,
            "prompt_template": {"template": _HUNYUAN_TEMPLATE, "crop_start": _hunyuan_crop_start()},
            "max_sequence_length": _MAX_SEQ,
        }
    if name == "latte":
        return kwargs | {"video_length": frames, "guidance_scale": 5.0, "clean_caption": False}
    return kwargs | {"num_frames": frames, "guidance_scale": 7.5}  # animatediff
