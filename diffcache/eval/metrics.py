"""Quality metrics through torchmetrics: FID (pluggable features), CLIP score, PSNR, SSIM, classifier accuracy.

Images are accepted as diffusers returns them: numpy ``(N, H, W, C)`` floats in [0, 1] (``output_type="np"``),
a list of PIL images, or a torch ``(N, C, H, W)`` tensor in [0, 1]. Accelerated outputs are compared with the
full model's outputs at the same seeds (PSNR, SSIM) and with a reference set (FID).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ..errors import MetricUnavailableError
from ..optional import require

logger = logging.getLogger(__name__)

PSNR_CAP_DB = 100.0
"""PSNR of identical images is infinite; it is reported as this cap so that averages stay finite."""

METRIC_NAMES = ("fid", "clip", "psnr", "ssim", "acc")


def as_tensor(images: Any) -> torch.Tensor:
    """``(N, C, H, W)`` float32 tensor in [0, 1] from numpy NHWC, PIL images, or an NCHW tensor."""
    if isinstance(images, torch.Tensor):
        tensor = images.float()
    else:
        if isinstance(images, (list, tuple)) and images and not isinstance(images[0], np.ndarray):
            images = np.stack([np.asarray(im, dtype=np.float32) / 255.0 for im in images])
        array = np.asarray(images, dtype=np.float32)
        if array.ndim == 3:  # (N, H, W) grayscale
            array = array[..., None]
        tensor = torch.from_numpy(array).permute(0, 3, 1, 2)
    if tensor.ndim != 4:
        raise ValueError(f"expected a batch of images, got shape {tuple(tensor.shape)}")
    return tensor.contiguous()


def to_uint8(image: Any) -> np.ndarray:
    """One ``(H, W, C)`` image in [0, 1] as uint8 for PNG: ``(H, W)`` for grayscale, ``(H, W, C)`` otherwise."""
    array = np.clip(np.rint(np.asarray(image, dtype=np.float32) * 255), 0, 255).astype(np.uint8)
    return array[..., 0] if array.ndim == 3 and array.shape[-1] == 1 else array


def psnr(images: Any, reference: Any) -> float:
    """Mean per-image PSNR (dB) of ``images`` against ``reference``, each capped at `PSNR_CAP_DB`. For video
    batches ``(N, F, H, W, C)`` (numpy) each clip is one item, scored on its MSE over all frames."""
    return float(_psnr_values(images, reference).mean())


def psnr_per_image(images: Any, reference: Any) -> np.ndarray:
    """Per-image PSNR (dB) of ``images`` against ``reference``, each capped at `PSNR_CAP_DB` (for intervals)."""
    return _psnr_values(images, reference).double().numpy().reshape(-1)


def _psnr_values(images: Any, reference: Any) -> torch.Tensor:
    tm_image = require("torchmetrics.functional.image", "eval", "the PSNR metric")
    a, b = _pair(_clip_as_image(images), _clip_as_image(reference))
    values = tm_image.peak_signal_noise_ratio(a, b, data_range=1.0, reduction="none", dim=(1, 2, 3))
    return values.clamp(max=PSNR_CAP_DB)


def ssim(images: Any, reference: Any) -> float:
    """Mean SSIM of ``images`` against ``reference`` (1.0 for identical images)."""
    tm_image = require("torchmetrics.functional.image", "eval", "the SSIM metric")
    structural_similarity_index_measure = tm_image.structural_similarity_index_measure

    a, b = _pair(images, reference)
    kernel = min(11, a.shape[-1] - (1 - a.shape[-1] % 2), a.shape[-2] - (1 - a.shape[-2] % 2))
    return float(structural_similarity_index_measure(a, b, data_range=1.0, kernel_size=kernel))


def fid(images: Any, reference: Any, features: str | torch.nn.Module = "inception") -> float:
    """Fréchet distance between feature statistics of ``images`` and ``reference``.

    Args:
        features: ``"inception"`` (torchmetrics' InceptionV3, the paper standard: needs the ``torch-fidelity``
            package and its weights, downloaded on first use) or any module mapping an ``(N, C, H, W)`` batch
            in [0, 1] to ``(N, D)`` features, e.g. `diffcache.models.load_classifier()` for the digits models.

    Raises:
        MetricUnavailableError: Inception features are requested but cannot be loaded here.
    """
    FrechetInceptionDistance = require("torchmetrics.image.fid", "eval", "the FID metric").FrechetInceptionDistance

    fake, real = as_tensor(images), as_tensor(reference)
    if isinstance(features, str):
        if features != "inception":
            raise ValueError(f"features must be 'inception' or an nn.Module, got {features!r}")
        metric = _inception_fid()
        fake, real = _rgb(fake), _rgb(real)
    else:
        size = tuple(fake.shape[1:])
        metric = FrechetInceptionDistance(feature=_Features(features), normalize=True, input_img_size=size)
    if len(fake) < 2 or len(real) < 2:
        raise ValueError(f"FID needs at least 2 images per set, got {len(fake)} and {len(real)}")
    with torch.no_grad():
        metric.update(real, real=True)
        metric.update(fake, real=False)
        return float(metric.compute())


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets ``(N, D)`` (float64, symmetric square root);
    what `fid` computes, for features already extracted."""
    a, b = a.double(), b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)
    w, v = torch.linalg.eigh(cov_a)
    sqrt_a = (v * w.clamp(min=0).sqrt()) @ v.T
    cross = torch.linalg.eigvalsh(sqrt_a @ cov_b @ sqrt_a).clamp(min=0).sqrt().sum()
    return float((mu_a - mu_b).square().sum() + cov_a.trace() + cov_b.trace() - 2 * cross)


def clip_score(images: Any, prompts: Sequence[str], model: str = "openai/clip-vit-base-patch16") -> float:
    """Mean CLIP score (torchmetrics `CLIPScore`, 100 x cosine similarity) of images with their prompts.

    ``model`` is a hub id or a local CLIP checkpoint directory.

    Raises:
        MetricUnavailableError: the CLIP weights cannot be loaded (offline, or a wrong path).
    """
    metric = _clip(model)
    tensor = _rgb(as_tensor(images))
    with torch.no_grad():
        return float(metric((tensor * 255).to(torch.uint8), list(prompts)))


def accuracy(images: Any, labels: Sequence[int], classifier: torch.nn.Module) -> float:
    """Fraction of ``images`` that ``classifier`` assigns to their conditioning ``labels``."""
    tensor = as_tensor(images)
    with torch.no_grad():
        predicted = classifier(tensor).argmax(dim=-1)
    return float((predicted == torch.as_tensor(list(labels))).float().mean())


def check_available(names: Sequence[str], fid_features: str | torch.nn.Module, clip_model: str) -> None:
    """Load the models that ``names`` need now, so a long run fails before it starts, not after.

    Raises:
        MetricUnavailableError: Inception (for ``fid`` with ``fid_features="inception"``) or CLIP cannot load.
    """
    if "fid" in names and fid_features == "inception":
        _inception_fid()
    if "clip" in names:
        _clip(clip_model)


def _inception_fid() -> Any:
    FrechetInceptionDistance = require("torchmetrics.image.fid", "eval", "the FID metric").FrechetInceptionDistance

    try:
        return FrechetInceptionDistance(feature=2048, normalize=True)
    except (ImportError, OSError, RuntimeError) as err:
        raise MetricUnavailableError(
            f"FID with Inception features is unavailable ({type(err).__name__}: {err}). Install `torch-fidelity` "
            "with network access for its weights, or pass a feature extractor (for the digits models: "
            "--fid-features digits)"
        ) from None


def _clip(model: str) -> Any:
    CLIPScore = require("torchmetrics.multimodal.clip_score", "eval", "the CLIP score metric").CLIPScore

    try:
        return CLIPScore(model_name_or_path=model)
    except (OSError, ValueError, ImportError) as err:
        raise MetricUnavailableError(
            f"CLIP model {model!r} could not be loaded ({type(err).__name__}); pass --clip-model with a local CLIP "
            "checkpoint directory (e.g. a saved openai/clip-vit-base-patch16)"
        ) from None


class _Features(torch.nn.Module):
    """Adapts a feature extractor (a module with ``features()``, or a plain module) to torchmetrics' FID."""

    def __init__(self, extractor: torch.nn.Module) -> None:
        super().__init__()
        self.extractor = extractor

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        extract = getattr(self.extractor, "features", self.extractor)
        return extract(images).flatten(1).double()


def _clip_as_image(images: Any) -> Any:
    # A video batch (N, F, H, W, C) scores one PSNR per clip (its MSE over every frame): frames stacked in height.
    if isinstance(images, np.ndarray) and images.ndim == 5:
        n, f, h, w, c = images.shape
        return images.reshape(n, f * h, w, c)
    return images


def _pair(images: Any, reference: Any) -> tuple[torch.Tensor, torch.Tensor]:
    a, b = as_tensor(images), as_tensor(reference)
    if a.shape != b.shape:
        raise ValueError(f"images {tuple(a.shape)} and reference {tuple(b.shape)} differ in shape")
    return a, b


def _rgb(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.expand(-1, 3, -1, -1) if tensor.shape[1] == 1 else tensor
