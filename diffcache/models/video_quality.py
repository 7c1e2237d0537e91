"""Quality of moving-digit clips, measured with the shipped digit classifier.

- ``frame_accuracy``: share of frames classified as the clip's intended digit;
- ``clip_consistency``: share of clips whose frames all get the same predicted digit;
- ``motion_residual``: mean distance (pixels) of the frames' ink centres from the best straight line through
  them (the training clips move on straight lines at constant speed; real clips score about 0.1);
- ``fd``: Fréchet distance of per-clip features (the classifier's features averaged over frames) to a
  reference set of clips (held-out real clips, or the full model's).

Clips are ``(N, F, 1, H, W)`` tensors or the pipeline's ``(N, F, H, W, 1)`` arrays, in [0, 1].
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..eval.metrics import frechet_distance
from .classifier import DigitClassifier
from .moving_digits import centre_of_mass


def as_clips(clips: Any) -> torch.Tensor:
    """``(N, F, 1, H, W)`` float32 of a pipeline's ``(N, F, H, W, C)`` numpy frames or of such a tensor."""
    if isinstance(clips, np.ndarray):
        clips = torch.from_numpy(np.ascontiguousarray(clips)).permute(0, 1, 4, 2, 3)
    clips = clips.float()
    if clips.ndim != 5:
        raise ValueError(f"expected clips (N, F, C, H, W), got shape {tuple(clips.shape)}")
    return clips[:, :, :3].mean(dim=2, keepdim=True) if clips.shape[2] > 1 else clips


def frame_predictions(clips: Any, classifier: DigitClassifier) -> torch.Tensor:
    """Predicted digit ``(N, F)`` of every frame."""
    x = as_clips(clips)
    return classifier.predict(x.flatten(0, 1)).view(x.shape[:2])


def clip_features(clips: Any, classifier: DigitClassifier) -> torch.Tensor:
    """Per-clip features ``(N, D)``: the classifier's features averaged over frames."""
    x = as_clips(clips)
    with torch.no_grad():
        feats = torch.cat([classifier.features(c) for c in x.flatten(0, 1).split(512)])
    return feats.view(*x.shape[:2], -1).mean(dim=1)


def motion_residual(clips: Any) -> torch.Tensor:
    """Per-clip mean distance (pixels) of the frames' ink centres from their least-squares straight line."""
    x = as_clips(clips)
    centres = centre_of_mass(x).double()  # (N, F, 2)
    f = centres.shape[1]
    s = torch.linspace(-1, 1, f, dtype=torch.float64)
    design = torch.stack([torch.ones_like(s), s], dim=1)  # (F, 2)
    fit = design @ torch.linalg.lstsq(design.expand(len(x), f, 2), centres).solution
    return (centres - fit).norm(dim=-1).mean(dim=1).float()


def clip_quality(clips: Any, labels: torch.Tensor, classifier: DigitClassifier,
                 reference: Any | None = None) -> dict[str, float]:
    """The four measures of the module docstring (``fd`` only with a ``reference`` set of clips)."""
    preds = frame_predictions(clips, classifier)
    labels = torch.as_tensor(labels).view(-1, 1)
    result = {
        "frame_accuracy": float((preds == labels).float().mean()),
        "clip_consistency": float((preds == preds[:, :1]).all(dim=1).float().mean()),
        "motion_residual": float(motion_residual(clips).mean()),
    }
    if reference is not None:
        result["fd"] = frechet_distance(clip_features(clips, classifier), clip_features(reference, classifier))
    return result


__all__ = ["as_clips", "clip_features", "clip_quality", "frame_predictions", "motion_residual"]
