"""PNG figures: image grids (rows = methods, same seeds) and speed/quality Pareto plots."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw

from ..optional import require
from .metrics import to_uint8


def image_grid(rows: Mapping[str, np.ndarray], path: str | os.PathLike, scale: int = 2, label_px: int = 240) -> None:
    """Save a grid: one row per method (its name on the left), the same images/seeds in every column.

    Args:
        rows: method name -> images ``(N, H, W, C)`` in [0, 1]; all rows have the same N, H, W.
        scale: integer upscaling of each tile (nearest), so 32 px digits stay readable.
    """
    first = next(iter(rows.values()))
    n, h, w = first.shape[:3]
    tile_h, tile_w, pad = h * scale, w * scale, 2
    canvas = Image.new("RGB", (label_px + n * (tile_w + pad), len(rows) * (tile_h + pad)), "white")
    draw = ImageDraw.Draw(canvas)
    for r, (name, images) in enumerate(rows.items()):
        y = r * (tile_h + pad)
        draw.text((4, y + tile_h // 2 - 6), name, fill="black")
        for c, image in enumerate(images):
            tile = Image.fromarray(to_uint8(image)).convert("RGB").resize((tile_w, tile_h), Image.NEAREST)
            canvas.paste(tile, (label_px + c * (tile_w + pad), y))
    canvas.save(path)


def pareto_plot(
    series: Mapping[str, Sequence[tuple[str, float, float]]],
    path: str | os.PathLike,
    quality_label: str,
    lower_is_better: bool = True,
    speedup_label: str = "measured speedup vs full (x)",
) -> None:
    """Save a quality-vs-speedup scatter, one series per model, each point labelled with its method.

    Args:
        series: model name -> ``[(method, speedup, quality), ...]``.
    """
    matplotlib = require("matplotlib", "eval", "the Pareto plot")
    matplotlib.use("Agg")
    plt = require("matplotlib.pyplot", "eval", "the Pareto plot")

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for model, points in series.items():
        ordered = sorted(points, key=lambda p: p[1])
        ax.plot([p[1] for p in ordered], [p[2] for p in ordered], "o-", label=model, alpha=0.8)
        for method, speedup, quality in ordered:
            ax.annotate(method, (speedup, quality), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xlabel(speedup_label)
    ax.set_ylabel(quality_label)
    ax.set_title(f"quality vs speed ({'lower' if lower_is_better else 'higher'} is better)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def front_plot(
    models: Mapping[str, Sequence[tuple[str, float, float, float, float, bool]]],
    path: str | os.PathLike,
    quality_label: str = "PSNR vs full model (dB)",
) -> None:
    """Save one panel per model: quality (with its 95% interval as a bar) against measured speedup.

    Points are numbered and listed beside each panel, so labels never overlap; searched points are stars.

    Args:
        models: model name -> ``[(method, speedup, quality, low, high, searched), ...]``.
    """
    matplotlib = require("matplotlib", "eval", "the front plot")
    matplotlib.use("Agg")
    plt = require("matplotlib.pyplot", "eval", "the front plot")

    fig, axes = plt.subplots(len(models), 1, figsize=(9, 3.6 * len(models)), dpi=120, squeeze=False)
    for ax, (model, points) in zip(axes[:, 0], models.items()):
        listing = []
        for i, (method, speedup, quality, low, high, searched) in enumerate(points, start=1):
            color = "tab:red" if searched else "tab:blue"
            ax.errorbar(speedup, quality, yerr=[[quality - low], [high - quality]], fmt="*" if searched else "o",
                        color=color, markersize=11 if searched else 6, capsize=3)
            ax.annotate(str(i), (speedup, quality), textcoords="offset points", xytext=(5, 3), fontsize=8,
                        color=color)
            listing.append(f"{i}  {method}")
        ax.set_title(model, fontsize=10)
        ax.set_xlabel("measured speedup vs full (x)")
        ax.set_ylabel(quality_label)
        ax.grid(alpha=0.3)
        ax.text(1.02, 1.0, "\n".join(listing), transform=ax.transAxes, va="top", fontsize=7, family="monospace")
    fig.tight_layout()
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
