"""Embedded default models: small latent diffusion models of handwritten digits, trained offline.

Nothing can be downloaded where diffcache must work out of the box, so the package ships two tiny
class-conditional diffusers pipelines and a digit classifier, all trained by ``scripts/train_digits.py`` on
scikit-learn's digits (see :mod:`diffcache.models.digits`):

- ``"digits-dit"``: a real ``diffusers.DiTPipeline`` (``DiTTransformer2DModel``: hidden 128, 6 blocks, patch 1;
  label ``"3"`` -> class 3 through ``pipe.get_label_ids``; class 1000 is the null class).
- ``"digits-unet"``: :class:`DigitsUNetPipeline` (class-conditional ``UNet2DModel``, blocks 32/64 with
  DeepCache-ready DownBlock2D/AttnDownBlock2D and a mid block; class 10 is the null class).

Both denoise a 4x8x8 latent of one shared ``AutoencoderKL`` (32x32 grayscale images), use a ``DDIMScheduler``
and run on CPU in float32. The weights are stored in float16 under ``weights/`` (``vae/`` once, one folder
per pipeline without its ``vae``); :func:`load_pipeline` assembles them. To load a folder with diffusers
directly, pass the VAE: ``DiTPipeline.from_pretrained(folder, vae=AutoencoderKL.from_pretrained(vae_folder))``.

Example::

    import torch
    from diffcache.models import GUIDANCE_SCALE, NUM_INFERENCE_STEPS, load_pipeline
    pipe = load_pipeline("digits-dit")
    images = pipe(class_labels=[0, 1, 2], guidance_scale=GUIDANCE_SCALE,
                  num_inference_steps=NUM_INFERENCE_STEPS, generator=torch.manual_seed(0)).images
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import AutoencoderKL, DiffusionPipeline, DiTPipeline

from ..errors import PipelineNotFoundError
from ..eval.metrics import accuracy, fid
from ..eval.quality import QualityFn, register_quality
from .classifier import DigitClassifier, DigitFeatures, prepare
from . import video_quality
from .digits import NUM_CLASSES, real_digits
from .pipeline import DigitsUNetPipeline
from .video_pipeline import DigitsVideoPipeline

logger = logging.getLogger(__name__)

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
VAE_DIR = WEIGHTS_DIR / "vae"
CLASSIFIER_DIR = WEIGHTS_DIR / "classifier"

_PIPELINES: dict[str, type[DiffusionPipeline]] = {
    "digits-dit": DiTPipeline, "digits-unet": DigitsUNetPipeline, "digits-video": DigitsVideoPipeline}
MODEL_NAMES: tuple[str, ...] = ("digits-dit", "digits-unet")
"""The image defaults."""
VIDEO_MODEL_NAMES: tuple[str, ...] = ("digits-video",)
"""The video default (scripts/train_video_digits.py): 8-frame clips of a moving digit, a latent Wan transformer."""
DEFAULT_MODEL = "digits-dit"

# Guidance trades diversity for fidelity (ARCHITECTURE section 8). Measured on the shipped weights with 25
# DDIM steps (scripts/train_digits.py; 200 images per cell, 20 per class): classifier accuracy / Fréchet
# distance of classifier features to the 359 held-out digits (train-vs-held-out real floor: 1.2).
#   guidance         1.0          1.5          2.0          2.5          3.0
#   digits-dit   89.0% / 17.6  99.0% / 7.9  99.0% / 8.6  99.0% / 11.5  99.0% / 14.2
#   digits-unet  90.5% / 7.4   98.0% / 4.6  99.5% / 4.4  99.5% / 5.0   100%  / 5.6
# Accuracy saturates at 2.0 while the distance is at (UNet) or next to (DiT) its minimum; above it the
# distance grows as samples lose diversity, below it off-class samples appear.
GUIDANCE_SCALE = 2.0
NUM_INFERENCE_STEPS = 25

# The video default's sampler setting (measured in scripts/train_video_digits.py's report).
VIDEO_GUIDANCE_SCALE = 2.0
VIDEO_STEPS = 25

# DiTPipeline maps label names to class ids with ``id2label``; the keys must be ints (JSON stores strings).
ID2LABEL: dict[int, str] = {i: str(i) for i in range(NUM_CLASSES)}


def pipeline_dir(name: str) -> Path:
    """The weights folder of a built-in pipeline (its ``model_index.json`` and denoiser, not the VAE)."""
    _check_name(name)
    return WEIGHTS_DIR / name


def _check_name(name: str) -> None:
    if name not in _PIPELINES:
        raise PipelineNotFoundError(
            f"unknown built-in model {name!r}; available: {', '.join(_PIPELINES)}"
        )


def _float32(model: torch.nn.Module) -> torch.nn.Module:
    # The files are float16; recent diffusers already loads them as float32 (casting again would warn).
    if any(p.dtype != torch.float32 for p in model.parameters()):
        model.to(torch.float32)
    return model.eval()


def load_vae() -> AutoencoderKL:
    """The shared digits ``AutoencoderKL`` (float32, eval mode); ``config.scaling_factor`` is set."""
    return _float32(AutoencoderKL.from_pretrained(VAE_DIR, local_files_only=True))


def load_pipeline(name: str, folder: str | Path | None = None) -> DiffusionPipeline:
    """Loads a built-in digits pipeline on CPU in float32, offline.

    Args:
        name: one of :data:`MODEL_NAMES` (``"digits-dit"``, ``"digits-unet"``) or :data:`VIDEO_MODEL_NAMES`
            (``"digits-video"``).
        folder: load that pipeline's weights from another folder (e.g. a training run's ``--out``); the VAE is
            always the shipped one.

    Raises:
        PipelineNotFoundError: (a ``ValueError``) for any other name (the message lists the available ones) or
            a folder without the weights (the message names the script that trains them).
    """
    _check_name(name)
    cls = _PIPELINES[name]
    extra = {"id2label": ID2LABEL} if cls is DiTPipeline else {}
    path = Path(folder) if folder is not None else pipeline_dir(name)
    if not (path / "model_index.json").is_file():
        raise PipelineNotFoundError(f"no {name} weights in {path}; train them with scripts/"
                                    f"{'train_video_digits.py' if name in VIDEO_MODEL_NAMES else 'train_digits.py'}")
    pipe = cls.from_pretrained(path, vae=load_vae(), local_files_only=True, **extra)
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            _float32(component)
    logger.debug("loaded built-in pipeline %s from %s", name, pipeline_dir(name))
    return pipe


def load_classifier() -> DigitClassifier:
    """The digit classifier (float32, eval mode): ``features`` for Fréchet distances, ``predict`` for accuracy."""
    return _float32(DigitClassifier.from_pretrained(CLASSIFIER_DIR, local_files_only=True))



# The classifier's search objectives ("accuracy" of the intended digit, negated "fid" to the full model's
# features), registered here because they only mean something for these models (search never loads one).
@register_quality("accuracy")
def _accuracy() -> QualityFn:
    classifier = load_classifier()

    def quality(outputs: np.ndarray, full: np.ndarray, conditions: Sequence[Any]) -> float:
        return accuracy(outputs, [int(c) for c in conditions], classifier)

    return quality


@register_quality("fid")
def _fid() -> QualityFn:
    classifier = load_classifier()

    def quality(outputs: np.ndarray, full: np.ndarray, conditions: Sequence[Any]) -> float:
        return -fid(outputs, full, classifier)

    return quality


@register_quality("frame_accuracy")
def _frame_accuracy() -> QualityFn:
    classifier = load_classifier()

    def quality(outputs: np.ndarray, full: np.ndarray, conditions: Sequence[Any]) -> float:
        preds = video_quality.frame_predictions(outputs, classifier)
        return float((preds == torch.tensor([int(c) for c in conditions]).view(-1, 1)).float().mean())

    return quality


__all__ = [
    "DEFAULT_MODEL",
    "GUIDANCE_SCALE",
    "MODEL_NAMES",
    "NUM_INFERENCE_STEPS",
    "DigitClassifier",
    "DigitFeatures",
    "DigitsUNetPipeline",
    "DigitsVideoPipeline",
    "VIDEO_GUIDANCE_SCALE",
    "VIDEO_MODEL_NAMES",
    "VIDEO_STEPS",
    "load_classifier",
    "load_pipeline",
    "load_vae",
    "pipeline_dir",
    "prepare",
    "real_digits",
]
