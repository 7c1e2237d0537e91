"""Tiny, seeded, offline diffusers pipelines for tests and CPU benchmarks.

Every pipeline is a real diffusers pipeline class assembled from real diffusers /
transformers model classes with small configs and random weights, so feature caching
can be exercised end to end without any download:

- ``"sd"``: ``StableDiffusionPipeline`` (SD1.5-layout ``UNet2DConditionModel``, DDIM)
- ``"sdxl"``: ``StableDiffusionXLPipeline`` (SDXL-layout UNet with ``text_time`` embeddings)
- ``"dit"``: ``DiTPipeline`` (``DiTTransformer2DModel``, class-conditional)
- ``"pixart"``: ``PixArtAlphaPipeline`` (``PixArtTransformer2DModel`` + T5 encoder)
- ``"sd3"``: ``StableDiffusion3Pipeline`` (MMDiT ``SD3Transformer2DModel``, flow matching)
- ``"flux"``: ``FluxPipeline`` (``FluxTransformer2DModel``, guidance-distilled)
- ``"unet2d"``: ``DDIMPipeline`` (unconditional ``UNet2DModel``)

Weights are drawn from ``torch.manual_seed(seed * 1000 + offset)`` per component (the
caller's global RNG state is left untouched), so the same seed gives bit-identical
pipelines. As a safeguard, linear/conv layers left all-zero by a model's constructor
(adaLN-zero gates, final projections in some diffusers versions; none in 0.42) are
re-initialised randomly so every block influences the output.
Tokenizers are built offline from a tiny byte-level BPE (CLIP) and a tiny Unigram
model (T5).

Example::

    pipe = build_pipeline("sd", seed=0)
    images = pipe(**call_kwargs("sd", num_inference_steps=4)).images  # (1, 64, 64, 3)
"""

from __future__ import annotations

import json
import logging
import string
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch
from diffusers import (
    AutoencoderKL,
    DDIMPipeline,
    DDIMScheduler,
    DiffusionPipeline,
    DiTPipeline,
    DiTTransformer2DModel,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    PixArtAlphaPipeline,
    PixArtTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
    UNet2DModel,
)
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from torch import nn
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5TokenizerFast,
)

__all__ = ["PIPELINE_NAMES", "BENCH_PIPELINE_NAMES", "SIZES", "build_pipeline", "call_kwargs", "image_size"]

logger = logging.getLogger(__name__)

PIPELINE_NAMES: tuple[str, ...] = ("sd", "sdxl", "dit", "pixart", "sd3", "flux", "unet2d")
"""All pipeline names accepted by :func:`build_pipeline` and :func:`call_kwargs`."""

SIZES: tuple[str, ...] = ("tiny", "bench", "large")

# Output image side in pixels per (name, size); the VAE factor is 8 everywhere.
_IMAGE_PX: dict[tuple[str, str], int] = {
    ("sd", "tiny"): 64,
    ("sd", "bench"): 128,
    ("sdxl", "tiny"): 64,
    ("dit", "tiny"): 64,
    ("dit", "bench"): 128,
    ("dit", "large"): 256,
    ("sd", "large"): 256,
    ("pixart", "tiny"): 64,
    ("sd3", "tiny"): 64,
    ("flux", "tiny"): 64,
    ("unet2d", "tiny"): 32,
}
BENCH_PIPELINE_NAMES: tuple[str, ...] = tuple(n for n in PIPELINE_NAMES if (n, "bench") in _IMAGE_PX)
"""Names that also have bigger ``size="bench"`` and ``size="large"`` configurations ("sd", "dit"). ``"large"`` is
the real models' size at 256 px: DiT-XL/2 (675M) and the SD1.5 UNet (860M), with small text encoders and VAEs."""

_VAE_CHANNELS = {"tiny": (8, 8, 16, 16), "bench": (32, 32, 64, 64), "large": (32, 32, 64, 64)}
_VAE_FACTOR = 8
_TEXT_DIM = 32  # hidden size of every CLIP text encoder
_TEXT_VOCAB = 1000  # >= both tokenizer vocab sizes
_MAX_SEQ = 16  # T5 max_sequence_length used in call_kwargs
_PROMPTS = ("a red car", "a blue bird", "a green tree on a hill", "a photo of a cat", "a dog in the snow")
_WORDS = sorted({w for p in _PROMPTS for w in p.split()} | {"the", "of", "on", "in", "with", "and"})
# SD1.5 / SDXL noise schedule.
_SD_SCHEDULE = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1)

M = TypeVar("M", bound=nn.Module)


# --------------------------------------------------------------------------- helpers


def _check(name: str, size: str = "tiny") -> None:
    if name not in PIPELINE_NAMES:
        raise ValueError(f"unknown pipeline name {name!r}; valid names: {', '.join(PIPELINE_NAMES)}")
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; valid sizes: {', '.join(SIZES)}")
    if (name, size) not in _IMAGE_PX:
        raise ValueError(
            f"size {size!r} is not available for {name!r}; "
            f"sizes 'bench' and 'large' exist only for: {', '.join(BENCH_PIPELINE_NAMES)}"
        )


def image_size(name: str, size: str = "tiny") -> int:
    """Side in pixels of the (square) images produced by ``call_kwargs(name, size=size)``."""
    _check(name, size)
    return _IMAGE_PX[name, size]


def _seeded(seed: int, offset: int, factory: Callable[[], M]) -> M:
    """Build ``factory()`` under ``torch.manual_seed(seed * 1000 + offset)`` without touching the
    global RNG, then randomly re-initialise linear/conv layers whose weight is all zeros."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed * 1000 + offset)
        module = factory()
        for m in module.modules():
            if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)) and not m.weight.any():
                m.reset_parameters()  # PyTorch default (fan-in scaled uniform) init, weight and bias
    return module.eval()


def _bytes_to_unicode() -> list[str]:
    """The 256 printable unicode characters GPT-2/CLIP byte-level BPE uses for the bytes."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    extra = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + extra)
            extra += 1
    return [chr(c) for c in cs]


def _merges_for(words: list[str]) -> list[str]:
    """Left-to-right BPE merges that build each word (with ``</w>``) from its characters."""
    merges: list[str] = []
    for word in words:
        current = word[0]
        for i, ch in enumerate(word[1:], start=1):
            piece = ch + ("</w>" if i == len(word) - 1 else "")
            merge = f"{current} {piece}"
            if merge not in merges:
                merges.append(merge)
            current += piece
    return merges


def _clip_tokenizer(pad_token: str = "<|endoftext|>") -> CLIPTokenizer:
    """A real byte-level BPE ``CLIPTokenizer`` (model_max_length 77) built offline.

    Written as vocab.json/merges.txt and loaded with ``from_pretrained``: in transformers 5,
    ``CLIPTokenizer(vocab_file=..., merges_file=...)`` silently builds a broken tokenizer.
    """
    chars = _bytes_to_unicode()
    merges = _merges_for([w for w in _WORDS if len(w) > 1])
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(tokens))}
    with tempfile.TemporaryDirectory(prefix="diffcache-clip-tok-") as tmp:
        (Path(tmp) / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
        (Path(tmp) / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
        return CLIPTokenizer.from_pretrained(tmp, model_max_length=77, pad_token=pad_token)


def _t5_tokenizer() -> T5TokenizerFast:
    """A real Unigram (sentencepiece-style) T5 tokenizer: ``<pad>``=0, ``</s>``=1, ``<unk>``=2."""
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [("▁" + w, -2.0) for w in _WORDS] + [("▁", -3.0)]
    pieces += [(c, -5.0) for c in string.ascii_letters + string.digits + string.punctuation]
    tok = Tokenizer(models.Unigram(pieces, unk_id=2, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    config = {"eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>", "extra_ids": 0}
    with tempfile.TemporaryDirectory(prefix="diffcache-t5-tok-") as tmp:
        tok.save(str(Path(tmp) / "tokenizer.json"))
        (Path(tmp) / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
        return T5TokenizerFast.from_pretrained(tmp, model_max_length=512)


def _clip_text_encoder(
    seed: int, offset: int, tokenizer: CLIPTokenizer, projection: bool = False, hidden: int = _TEXT_DIM
) -> CLIPTextModel | CLIPTextModelWithProjection:
    """Tiny CLIP text encoder (hidden 32 unless given, 2 layers, projection 32) matching ``tokenizer``'s ids."""
    config = CLIPTextConfig(
        vocab_size=_TEXT_VOCAB,
        hidden_size=hidden,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        projection_dim=_TEXT_DIM,
        max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    cls = CLIPTextModelWithProjection if projection else CLIPTextModel
    return _seeded(seed, offset, lambda: cls(config))


def _t5_encoder(seed: int, offset: int, d_model: int = 32, config_class: type = T5Config,
                model_class: type = T5EncoderModel) -> T5EncoderModel:
    """Tiny T5 v1.1-style (gated-gelu) encoder, 2 layers; ``UMT5Config`` / ``UMT5EncoderModel`` give Wan's UMT5
    (per-layer relative attention bias) of the same shape."""
    config = config_class(
        vocab_size=_TEXT_VOCAB,
        d_model=d_model,
        d_kv=8,
        d_ff=2 * d_model,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=32,
        feed_forward_proj="gated-gelu",
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    return _seeded(seed, offset, lambda: model_class(config))


def _vae(
    seed: int,
    offset: int,
    channels: tuple[int, ...] = (8, 8, 16, 16),
    latent_channels: int = 4,
    scaling_factor: float = 0.18215,
    shift_factor: float | None = None,
    sample_size: int = 64,
) -> AutoencoderKL:
    """Tiny 4-level ``AutoencoderKL`` (spatial factor 8)."""
    return _seeded(
        seed,
        offset,
        lambda: AutoencoderKL(
            block_out_channels=channels,
            down_block_types=("DownEncoderBlock2D",) * len(channels),
            up_block_types=("UpDecoderBlock2D",) * len(channels),
            latent_channels=latent_channels,
            layers_per_block=1,
            norm_num_groups=min(channels) // 2,
            sample_size=sample_size,
            scaling_factor=scaling_factor,
            shift_factor=shift_factor,
        ),
    )


def _ddim() -> DDIMScheduler:
    return DDIMScheduler(**_SD_SCHEDULE, clip_sample=False, set_alpha_to_one=False)


# -------------------------------------------------------------------------- builders


def _build_sd(seed: int, size: str) -> DiffusionPipeline:
    px = _IMAGE_PX["sd", size]
    channels, text_dim = ((320, 640, 1280, 1280), 768) if size == "large" else ((32, 64, 64, 64), _TEXT_DIM)
    unet = _seeded(
        seed,
        1,
        lambda: UNet2DConditionModel(
            sample_size=px // _VAE_FACTOR,
            in_channels=4,
            out_channels=4,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            block_out_channels=channels,
            layers_per_block=2,  # as SD1.5: 12 skip connections
            norm_num_groups=32,
            cross_attention_dim=text_dim,
            attention_head_dim=8,  # legacy name: number of heads, as in SD1.5
        ),
    )
    tokenizer = _clip_tokenizer()
    return StableDiffusionPipeline(
        vae=_vae(seed, 2, _VAE_CHANNELS[size], sample_size=px),
        text_encoder=_clip_text_encoder(seed, 3, tokenizer, hidden=text_dim),
        tokenizer=tokenizer,
        unet=unet,
        scheduler=_ddim(),
        safety_checker=None,
        feature_extractor=None,
        image_encoder=None,
        requires_safety_checker=False,
    )


def _build_sdxl(seed: int, size: str) -> DiffusionPipeline:
    px = _IMAGE_PX["sdxl", size]
    time_dim = 8
    unet = _seeded(
        seed,
        1,
        lambda: UNet2DConditionModel(
            sample_size=px // _VAE_FACTOR,
            in_channels=4,
            out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            block_out_channels=(32, 64, 64),
            layers_per_block=2,
            norm_num_groups=32,
            transformer_layers_per_block=(1, 1, 2),
            attention_head_dim=(2, 4, 4),  # legacy name: heads per block (head dim 16)
            use_linear_projection=True,
            cross_attention_dim=2 * _TEXT_DIM,  # concat of both encoders' hidden states
            addition_embed_type="text_time",
            addition_time_embed_dim=time_dim,
            # pooled text_encoder_2 projection + 6 micro-conditioning ids
            projection_class_embeddings_input_dim=_TEXT_DIM + 6 * time_dim,
        ),
    )
    tokenizer, tokenizer_2 = _clip_tokenizer(), _clip_tokenizer(pad_token="!")
    return StableDiffusionXLPipeline(
        vae=_vae(seed, 2, scaling_factor=0.13025, sample_size=px),
        text_encoder=_clip_text_encoder(seed, 3, tokenizer),
        text_encoder_2=_clip_text_encoder(seed, 4, tokenizer_2, projection=True),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=EulerDiscreteScheduler(**_SD_SCHEDULE, timestep_spacing="leading"),
        add_watermarker=False,
    )


def _build_dit(seed: int, size: str) -> DiffusionPipeline:
    px = _IMAGE_PX["dit", size]
    layers, heads, head_dim = {"tiny": (4, 2, 16), "bench": (12, 6, 64), "large": (28, 16, 72)}[size]
    transformer = _seeded(
        seed,
        1,
        lambda: DiTTransformer2DModel(
            num_attention_heads=heads,
            attention_head_dim=head_dim,
            in_channels=4,
            out_channels=8,  # learned sigma, as in DiT-XL/2 (the pipeline drops it)
            num_layers=layers,
            sample_size=px // _VAE_FACTOR,
            patch_size=2,
            num_embeds_ada_norm=1000,  # class id 1000 is the CFG null class
        ),
    )
    vae = _vae(seed, 2, _VAE_CHANNELS[size], sample_size=px)
    return DiTPipeline(transformer=transformer, vae=vae, scheduler=_ddim())


def _build_pixart(seed: int, size: str) -> DiffusionPipeline:
    px = _IMAGE_PX["pixart", size]
    transformer = _seeded(
        seed,
        1,
        lambda: PixArtTransformer2DModel(
            num_attention_heads=2,
            attention_head_dim=16,
            in_channels=4,
            out_channels=8,
            num_layers=4,
            cross_attention_dim=32,
            caption_channels=_TEXT_DIM,
            sample_size=px // _VAE_FACTOR,
            patch_size=2,
        ),
    )
    return PixArtAlphaPipeline(
        tokenizer=_t5_tokenizer(),
        text_encoder=_t5_encoder(seed, 3, _TEXT_DIM),
        vae=_vae(seed, 2, sample_size=px),
        transformer=transformer,
        scheduler=_ddim(),
    )


def _build_sd3(seed: int, size: str) -> DiffusionPipeline:
    px = _IMAGE_PX["sd3", size]
    t5_dim = 2 * _TEXT_DIM  # SD3 pads the concatenated CLIP states (2 x 32) up to the T5 width
    transformer = _seeded(
        seed,
        1,
        lambda: SD3Transformer2DModel(
            sample_size=px // _VAE_FACTOR,
            patch_size=2,
            in_channels=16,
            out_channels=16,
            num_layers=4,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=t5_dim,
            caption_projection_dim=32,  # = inner dim (heads x head dim)
            pooled_projection_dim=2 * _TEXT_DIM,  # concat of both pooled CLIP projections
            pos_embed_max_size=16,
        ),
    )
    tokenizer, tokenizer_2 = _clip_tokenizer(), _clip_tokenizer()
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_vae(seed, 2, latent_channels=16, scaling_factor=1.5305, shift_factor=0.0609, sample_size=px),
        text_encoder=_clip_text_encoder(seed, 3, tokenizer, projection=True),
        tokenizer=tokenizer,
        text_encoder_2=_clip_text_encoder(seed, 4, tokenizer_2, projection=True),
        tokenizer_2=tokenizer_2,
        text_encoder_3=_t5_encoder(seed, 5, t5_dim),
        tokenizer_3=_t5_tokenizer(),
    )


def _build_flux(seed: int, size: str) -> DiffusionPipeline:
    px = _IMAGE_PX["flux", size]
    latent_channels = 16
    transformer = _seeded(
        seed,
        1,
        lambda: FluxTransformer2DModel(
            patch_size=1,
            in_channels=4 * latent_channels,  # 2x2 latent patches are packed into channels
            num_layers=2,
            num_single_layers=2,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=_TEXT_DIM,
            pooled_projection_dim=_TEXT_DIM,
            guidance_embeds=True,  # FLUX.1-dev style guidance distillation
            axes_dims_rope=(4, 6, 6),  # sums to attention_head_dim
        ),
    )
    vae = _vae(
        seed, 2, latent_channels=latent_channels, scaling_factor=0.3611, shift_factor=0.1159, sample_size=px
    )
    tokenizer = _clip_tokenizer()
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    return FluxPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=_clip_text_encoder(seed, 3, tokenizer),
        tokenizer=tokenizer,
        text_encoder_2=_t5_encoder(seed, 4, _TEXT_DIM),
        tokenizer_2=_t5_tokenizer(),
        transformer=transformer,
    )


def _build_unet2d(seed: int, size: str) -> DiffusionPipeline:
    unet = _seeded(
        seed,
        1,
        lambda: UNet2DModel(
            sample_size=_IMAGE_PX["unet2d", size],
            in_channels=3,
            out_channels=3,
            down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
            up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
            block_out_channels=(16, 32, 32),
            layers_per_block=2,
            norm_num_groups=8,
            attention_head_dim=16,
        ),
    )
    # google/ddpm-cifar10-32 schedule (linear betas, clipped x0): keeps the pixels mostly unsaturated
    return DDIMPipeline(unet=unet, scheduler=DDIMScheduler(beta_schedule="linear", clip_sample=True))


_BUILDERS: dict[str, Callable[[int, str], DiffusionPipeline]] = {
    "sd": _build_sd,
    "sdxl": _build_sdxl,
    "dit": _build_dit,
    "pixart": _build_pixart,
    "sd3": _build_sd3,
    "flux": _build_flux,
    "unet2d": _build_unet2d,
}


# ------------------------------------------------------------------------ public API


def build_pipeline(name: str, seed: int = 0, size: str = "tiny") -> DiffusionPipeline:
    """Build the tiny random-weight pipeline ``name`` (see :data:`PIPELINE_NAMES`).

    The pipeline is on CPU, fp32, in eval mode, with its progress bar disabled. The same
    ``seed`` always yields bit-identical weights, hence bit-identical outputs for the same
    call arguments and torch thread count (UNet convs round differently across thread
    counts). ``size="bench"`` selects a bigger (still CPU-friendly) config and exists only
    for :data:`BENCH_PIPELINE_NAMES`.
    """
    _check(name, size)
    pipe = _BUILDERS[name](seed, size)
    pipe.set_progress_bar_config(disable=True)
    logger.debug("built %s pipeline %r (seed=%d, size=%s)", type(pipe).__name__, name, seed, size)
    return pipe


def call_kwargs(
    name: str, num_inference_steps: int = 4, seed: int = 0, batch_size: int = 1, size: str = "tiny"
) -> dict[str, Any]:
    """Keyword arguments for a quick deterministic ``pipe(**kwargs)`` call of pipeline ``name``.

    Classifier-free guidance is active wherever the pipeline supports it (Flux uses its
    distilled guidance embedding instead); outputs are numpy images of
    ``image_size(name, size)`` pixels; ``batch_size`` images are produced. Pass the same
    ``size`` as to :func:`build_pipeline`.
    """
    _check(name, size)
    kwargs: dict[str, Any] = {
        "num_inference_steps": num_inference_steps,
        "generator": torch.Generator("cpu").manual_seed(seed),
        "output_type": "np",
    }
    if name == "unet2d":
        return kwargs | {"batch_size": batch_size}
    if name == "dit":
        labels = [(207 + 100 * i) % 1000 for i in range(batch_size)]  # ImageNet class ids
        return kwargs | {"class_labels": labels, "guidance_scale": 4.0}
    px = _IMAGE_PX[name, size]
    kwargs |= {"prompt": [_PROMPTS[i % len(_PROMPTS)] for i in range(batch_size)], "height": px, "width": px}
    if name == "flux":
        return kwargs | {"guidance_scale": 3.5, "max_sequence_length": _MAX_SEQ}
    kwargs["guidance_scale"] = 5.0
    if name == "sd3":
        kwargs["max_sequence_length"] = _MAX_SEQ
    elif name == "pixart":
        kwargs |= {"max_sequence_length": _MAX_SEQ, "use_resolution_binning": False, "clean_caption": False}
    return kwargs
