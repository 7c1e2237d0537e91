"""`diffcache demo --video`: the embedded video default against cache presets and a searched schedule.

The full ``digits-video`` model (8-frame clips of a moving digit, a latent Wan transformer) runs unaccelerated,
under Wan's block and component presets, and under a schedule searched for it (`diffcache.search`, dynamic
programming on 10 calibration labels at another seed, budget `SEARCH_BUDGET`, final round against the
presets). Clips use the same seeds and labels for every method; speed is measured side by side with
alternated runs (`bench.compare_methods`); quality is the shipped classifier's per-frame accuracy, clip
consistency, motion residual, the per-clip Fréchet distance to held-out real clips and the per-clip PSNR
against the full model, with its 95% interval. Writes ``clips.gif`` (every method, one clip per digit) and
``strip.png`` (the frames of one clip per method).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch

from ..memory import format_mib
from ..schedules.search import search
from .bench import FULL, BenchRow, compare_methods, label, psnr_cell
from .demo import SEARCH_SEED, front_check
from .plots import clip_gif, clip_strip

VIDEO_SCHEDULES = ["fora:interval=2", "fora:interval=3", "uniform:interval=2", "uniform:interval=3",
                   "uniform:interval=3,warmup=2,forecast=1"]
SEARCH_BUDGET = "latency:2x"


def run_video_demo(out_dir: str | os.PathLike = "demo-out", per_class: int = 2, repeats: int = 2,
                   progress: bool = True) -> str:
    """Run the video demo; writes ``clips.gif`` and ``strip.png`` into ``out_dir`` and returns the report."""
    from ..models import VIDEO_GUIDANCE_SCALE, VIDEO_STEPS, load_classifier, load_pipeline, video_quality
    from ..models.moving_digits import moving_digits

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    classifier = load_classifier()
    real, _, _ = moving_digits("test", per_digit=1, seed=11)
    labels = [i % 10 for i in range(10 * per_class)]
    pipe = load_pipeline("digits-video")
    pipe.set_progress_bar_config(disable=True)

    def make_kwargs() -> dict:
        return {"class_labels": labels, "guidance_scale": VIDEO_GUIDANCE_SCALE, "output_type": "np",
                "num_inference_steps": VIDEO_STEPS, "generator": torch.Generator("cpu").manual_seed(0)}

    searched = search(pipe, list(range(10)), "dp", SEARCH_BUDGET, num_inference_steps=VIDEO_STEPS,
                      guidance_scale=VIDEO_GUIDANCE_SCALE, seed=SEARCH_SEED, batch_size=10, progress=progress)
    rows = compare_methods(pipe, make_kwargs, [*VIDEO_SCHEDULES, searched], repeats, progress=progress)
    scores = {r.method: video_quality.clip_quality(r.images, torch.tensor(labels), classifier, real) for r in rows}
    searched_row = next(r for r in rows if r.method == label(searched))
    presets = [r for r in rows if r.method in set(VIDEO_SCHEDULES)]
    clips = {r.method: r.images[:10] for r in rows}
    clip_gif(clips, out / "clips.gif", columns=[f"digit {c}" for c in labels[:10]])
    clip_strip(clips, out / "strip.png")
    return "\n\n".join([_table(rows, scores), front_check(searched_row, presets),
                        f"wrote {out / 'clips.gif'} and {out / 'strip.png'}"])


def _table(rows: list[BenchRow], scores: dict[str, dict[str, float]]) -> str:
    num_clips, num_frames = rows[0].images.shape[:2]
    lines = [
        f"**digits-video** ({num_clips} clips of {num_frames} frames per method, {rows[0].num_steps} DDIM steps, "
        f"batch {num_clips} + CFG)",
        "",
        "| method | MACs speedup | measured speedup | frame accuracy | consistent clips | motion residual px "
        "| clip FD | PSNR vs full dB | peak RSS MiB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        q = scores[r.method]
        method = "full (no cache)" if r.method == FULL else r.method
        macs = f"{r.macs_speedup:.2f}x" if math.isfinite(r.macs_speedup) else "n/a"
        lines.append(f"| {method} | {macs} | {r.speedup:.2f}x | {q['frame_accuracy']:.1%} | "
                     f"{q['clip_consistency']:.0%} | {q['motion_residual']:.2f} | {q['fd']:.1f} | {psnr_cell(r)} | "
                     f"{format_mib(r.peak_rss)} |")
    return "\n".join(lines)


__all__ = ["SEARCH_BUDGET", "VIDEO_SCHEDULES", "run_video_demo"]
