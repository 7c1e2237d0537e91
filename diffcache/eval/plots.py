"""Figures: image grids (rows = methods, same seeds), animated clip grids (GIF) and speed/quality Pareto plots."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ..optional import require
from .metrics import to_uint8


def image_grid(rows: Mapping[str, np.ndarray], path: str | os.PathLike, scale: int = 2,
               columns: Sequence[str] | None = None, font_px: int = 14) -> None:
    """Save a grid: one row per method (its full name on the left), the same images/seeds in every column.

    Args:
        rows: method name -> images ``(N, H, W, C)`` in [0, 1]; all rows have the same N, H, W.
        scale: integer upscaling of each tile (nearest), so 32 px digits stay readable.
        columns: a header per column (e.g. the class label each column asked for).
    """
    _grid(rows, scale, columns, font_px).save(path)


def clip_gif(rows: Mapping[str, np.ndarray], path: str | os.PathLike, scale: int = 4,
             columns: Sequence[str] | None = None, frame_ms: int = 150) -> None:
    """Save an animated GIF of video clips: `image_grid`'s layout, one GIF frame per clip frame (looping).

    Args:
        rows: method name -> clips ``(N, F, H, W, C)`` in [0, 1]; all rows have the same N, F, H, W.
        frame_ms: display time of each frame.
    """
    frames = next(iter(rows.values())).shape[1]
    images = [_grid({name: clips[:, f] for name, clips in rows.items()}, scale, columns, 14) for f in range(frames)]
    images[0].save(path, save_all=True, append_images=images[1:], duration=frame_ms, loop=0)


def clip_strip(rows: Mapping[str, np.ndarray], path: str | os.PathLike, clip: int = 0, scale: int = 4) -> None:
    """Save a PNG of one clip per method with its frames side by side (rows = methods, columns = frames)."""
    frames = next(iter(rows.values())).shape[1]
    image_grid({name: clips[clip] for name, clips in rows.items()}, path, scale,
               columns=[f"t={f}" for f in range(frames)])


def _grid(rows: Mapping[str, np.ndarray], scale: int, columns: Sequence[str] | None, font_px: int) -> Image.Image:
    first = next(iter(rows.values()))
    n, h, w = first.shape[:3]
    tile_h, tile_w, pad = h * scale, w * scale, 2
    font = ImageFont.load_default(size=font_px)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_px = 12 + max(int(measure.textlength(name, font=font)) for name in rows)  # no name is cut
    header_px = font_px + 10 if columns else 0
    canvas = Image.new("RGB", (label_px + n * (tile_w + pad), header_px + len(rows) * (tile_h + pad)), "white")
    draw = ImageDraw.Draw(canvas)
    for c, title in enumerate(columns or []):
        x = label_px + c * (tile_w + pad) + (tile_w - int(draw.textlength(title, font=font))) // 2
        draw.text((x, 3), title, fill="black", font=font)
    for r, (name, images) in enumerate(rows.items()):
        y = header_px + r * (tile_h + pad)
        draw.text((4, y + (tile_h - font_px) // 2), name, fill="black", font=font)
        for c, image in enumerate(images):
            tile = Image.fromarray(to_uint8(image)).convert("RGB").resize((tile_w, tile_h), Image.NEAREST)
            canvas.paste(tile, (label_px + c * (tile_w + pad), y))
    return canvas


def measured_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the non-dominated points (no other is at least as fast and at least as good, and better in
    one), ordered by speed: the measured front that a plot joins."""
    front = [i for i, (x, y) in enumerate(points)
             if not any(x2 >= x and y2 >= y and (x2, y2) != (x, y) for x2, y2 in points)]
    return sorted(front, key=lambda i: points[i][0])


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

    Points are numbered and listed beside each panel, so labels never overlap; searched points are stars; the
    non-dominated points (the measured front) are joined by a line, the others are plain dots.

    Args:
        models: model name -> ``[(method, speedup, quality, low, high, searched), ...]``.
    """
    matplotlib = require("matplotlib", "eval", "the front plot")
    matplotlib.use("Agg")
    plt = require("matplotlib.pyplot", "eval", "the front plot")

    fig, axes = plt.subplots(len(models), 1, figsize=(9, 3.6 * len(models)), dpi=120, squeeze=False)
    for ax, (model, points) in zip(axes[:, 0], models.items()):
        listing = []
        front = measured_front([(p[1], p[2]) for p in points])
        ax.plot([points[i][1] for i in front], [points[i][2] for i in front], "-", color="tab:gray", alpha=0.6,
                zorder=0, label="measured front")
        for i, (method, speedup, quality, low, high, searched) in enumerate(points, start=1):
            color = "tab:red" if searched else "tab:blue"
            ax.errorbar(speedup, quality, yerr=[[quality - low], [high - quality]], fmt="*" if searched else "o",
                        color=color, markersize=11 if searched else 6, capsize=3)
            ax.annotate(str(i), (speedup, quality), textcoords="offset points", xytext=(5, 3), fontsize=8,
                        color=color)
            listing.append(f"{i}  {method}" + ("  (front)" if i - 1 in front else ""))
        ax.set_title(model, fontsize=10)
        ax.set_xlabel("measured speedup vs full (x)")
        ax.set_ylabel(quality_label)
        ax.grid(alpha=0.3)
        ax.text(1.02, 1.0, "\n".join(listing), transform=ax.transAxes, va="top", fontsize=7, family="monospace")
    fig.tight_layout()
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
