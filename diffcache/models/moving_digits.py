"""Moving digits: short clips of one scikit-learn digit translating across its 32x32 canvas.

A clip is ``NUM_FRAMES`` frames of the same digit (the :mod:`diffcache.models.digits` images, train or
held-out split) shifted along a straight line at constant speed: the path starts at a random offset and ends
at another, each coordinate within ``MAX_SHIFT`` pixels of the centre. That range stays inside the shifts the
shared VAE and the classifier were trained on, so every frame decodes and classifies like a still digit, and
the motion is a fact that can be checked (:func:`centre_of_mass` along the clip is a straight line).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .digits import IMAGE_SIZE, real_digits

NUM_FRAMES = 8
MAX_SHIFT = 2.5  # pixels; the classifier was trained on shifts of up to 2.5, the VAE on 2.0


def shift(images: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Translates ``(N, 1, H, W)`` images by ``(N, 2)`` pixel offsets ``(dx, dy)`` (bilinear, zero fill)."""
    n, _, h, w = images.shape
    theta = torch.zeros(n, 2, 3, dtype=images.dtype)
    theta[:, 0, 0] = theta[:, 1, 1] = 1
    # affine_grid maps output to input coordinates in [-1, 1]: moving content by +d pixels samples at -d.
    theta[:, 0, 2] = -offsets[:, 0] * 2 / w
    theta[:, 1, 2] = -offsets[:, 1] * 2 / h
    grid = F.affine_grid(theta, [n, 1, h, w], align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def random_paths(n: int, generator: torch.Generator, num_frames: int = NUM_FRAMES,
                 max_shift: float = MAX_SHIFT) -> torch.Tensor:
    """``(n, num_frames, 2)`` straight constant-speed paths between two random offsets in ``[-max, max]^2``."""
    ends = (torch.rand(n, 2, 2, generator=generator) * 2 - 1) * max_shift
    s = torch.linspace(0, 1, num_frames).view(1, num_frames, 1)
    return ends[:, :1] + (ends[:, 1:] - ends[:, :1]) * s


def make_clips(images: torch.Tensor, paths: torch.Tensor) -> torch.Tensor:
    """Clips ``(N, F, 1, H, W)`` in [0, 1]: image ``i`` moved along ``paths[i]`` (``(N, F, 2)`` offsets)."""
    n, f = paths.shape[:2]
    frames = shift(images.repeat_interleave(f, dim=0), paths.reshape(n * f, 2))
    return frames.clamp(0, 1).view(n, f, *images.shape[1:])


def moving_digits(split: str = "test", per_digit: int = 1, seed: int = 0
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Clips of the real digits of ``split``, ``per_digit`` random paths each (seeded, in data set order).

    Returns:
        ``(clips, labels, paths)``: float32 ``(N, F, 1, 32, 32)``, int64 ``(N,)`` and ``(N, F, 2)`` offsets.
    """
    images, labels = real_digits(split)
    images = images.repeat_interleave(per_digit, dim=0)
    labels = labels.repeat_interleave(per_digit, dim=0)
    paths = random_paths(len(images), torch.Generator().manual_seed(seed))
    return make_clips(images, paths), labels, paths


def centre_of_mass(frames: torch.Tensor) -> torch.Tensor:
    """Ink centre ``(..., 2)`` as ``(x, y)`` pixels from the canvas centre, of ``(..., 1, H, W)`` frames."""
    h, w = frames.shape[-2:]
    ink = frames.clamp(min=0).sum(dim=-3)
    total = ink.sum(dim=(-2, -1)).clamp(min=1e-6)
    ys = torch.arange(h, dtype=frames.dtype) - (h - 1) / 2
    xs = torch.arange(w, dtype=frames.dtype) - (w - 1) / 2
    x = (ink * xs).sum(dim=(-2, -1)) / total
    y = (ink * ys.view(-1, 1)).sum(dim=(-2, -1)) / total
    return torch.stack([x, y], dim=-1)


__all__ = ["IMAGE_SIZE", "MAX_SHIFT", "NUM_FRAMES", "centre_of_mass", "make_clips", "moving_digits",
           "random_paths", "shift"]
