"""`diffcache demo`: the full digits models against cache presets and a searched schedule, in one table.

Everything runs offline on the embedded default models (`diffcache.models`): besides the presets, each model gets
a schedule searched for it (`diffcache.search`, dynamic programming on 10 calibration labels at another seed,
budget ``SEARCH_BUDGET``; the search's final round measures the pick with and without a forecast against every
preset that fits, and holds out two labels). Images per method use the same seeds and
labels, speed is measured side by side with alternated runs (`bench.compare_methods`), quality is the Fréchet
distance of the digit classifier's features to held-out real digits, the classifier's accuracy on the requested
labels, and PSNR against the full model's images.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch

from ..schedules.search import search
from .bench import FULL, BenchRow, compare_methods, label, psnr_cell, psnr_difference
from ..memory import format_mib
from .metrics import accuracy, fid
from .plots import front_plot, image_grid

DEMO_SCHEDULES = {
    "digits-dit": ["fora:interval=2", "fora:interval=3", "uniform:interval=2", "uniform:interval=3",
                   "uniform:interval=3,warmup=2,forecast=1"],
    "digits-unet": ["deepcache:interval=2", "deepcache:interval=3", "deepcache:interval=5",
                    "deepcache:interval=3,mode=quadratic", "deepcache:interval=4,warmup=2,forecast=1"],
}
GRID_COLUMNS = 10  # one image per digit class
SEARCH_BUDGET = "latency:2.5x"
SEARCH_SEED = 1000  # calibration noise differs from the evaluated images' (seed 0)


def run_demo(out_dir: str | os.PathLike = "demo-out", per_class: int = 10, repeats: int = 2,
             progress: bool = True, quant: str | None = None) -> str:
    """Run the demo; writes ``grid.png`` and ``pareto.png`` into ``out_dir`` and returns the report text.

    ``quant`` (a preset such as ``"w8a8"``) also calibrates each model on 40 labels and adds the quantized model
    alone and with the second preset of its list."""
    from ..models import GUIDANCE_SCALE, NUM_INFERENCE_STEPS, load_classifier, load_pipeline, real_digits

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    classifier = load_classifier()
    real, _ = real_digits("test")
    labels = [i % 10 for i in range(10 * per_class)]
    report, grid, pareto = [], {}, {}
    for name, schedules in DEMO_SCHEDULES.items():
        pipe = load_pipeline(name)
        pipe.set_progress_bar_config(disable=True)

        def make_kwargs() -> dict:
            return {"class_labels": labels, "guidance_scale": GUIDANCE_SCALE, "output_type": "np",
                    "num_inference_steps": NUM_INFERENCE_STEPS, "generator": torch.Generator("cpu").manual_seed(0)}

        searched = search(pipe, list(range(10)), "dp", SEARCH_BUDGET, num_inference_steps=NUM_INFERENCE_STEPS,
                          guidance_scale=GUIDANCE_SCALE, seed=SEARCH_SEED, batch_size=10,
                          progress=progress)
        others = _quantized(pipe, quant, schedules[1], progress) if quant else {}
        rows = compare_methods(pipe, make_kwargs, [*schedules, searched], repeats, progress=progress, others=others)
        scores = {r.method: (fid(r.images, real, classifier), accuracy(r.images, labels, classifier)) for r in rows}
        # The searched row by its label: with quant, the quantized rows come after it.
        searched_row = next(r for r in rows if r.method == label(searched))
        presets = [r for r in rows if r.method in {label(t) for t in schedules}]
        report.append(_table(name, rows, scores, len(labels), searched_row, presets))
        for r in rows:
            grid[f"{name} {r.method}"] = r.images[:GRID_COLUMNS]
        pareto[name] = [(r.method, r.speedup, r.psnr_db, *_bounds(r), r is searched_row)
                        for r in rows if r.method != FULL]
    image_grid(grid, out / "grid.png", columns=[f"digit {c}" for c in labels[:GRID_COLUMNS]])
    front_plot(pareto, out / "pareto.png")
    report.append(f"wrote {out / 'grid.png'} and {out / 'pareto.png'}")
    return "\n\n".join(report)


def _quantized(pipe, quant: str, schedule: str, progress: bool) -> dict:
    """Contexts running ``pipe`` quantized (calibrated here on 40 labels), alone and with ``schedule``."""
    from ..api import accelerated
    from ..models import GUIDANCE_SCALE, NUM_INFERENCE_STEPS
    from ..quant import calibrate

    calibration = calibrate(pipe, [i % 10 for i in range(40)], quant, num_inference_steps=NUM_INFERENCE_STEPS,
                            guidance_scale=GUIDANCE_SCALE, seed=SEARCH_SEED, batch_size=20, progress=progress)
    name = calibration.config.name
    return {name: lambda: accelerated(pipe, "none", quant=calibration),
            f"{name} + {schedule}": lambda: accelerated(pipe, schedule, quant=calibration)}


def _table(name: str, rows: list[BenchRow], scores: dict[str, tuple[float, float]], num_images: int,
           searched: BenchRow, presets: list[BenchRow]) -> str:
    lines = [
        f"**{name}** ({num_images} images per method, {rows[0].num_steps} DDIM steps, batch {num_images} + CFG)",
        "",
        "| method | MACs speedup | measured speedup | ideal (latency) | FID (digits) | accuracy | PSNR vs full dB "
        "| peak RSS MiB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        frechet, acc = scores[r.method]
        method = "full (no cache)" if r.method == FULL else r.method
        macs, ideal = (f"{v:.2f}x" if math.isfinite(v) else "n/a" for v in (r.macs_speedup, r.ideal_latency))
        lines.append(f"| {method} | {macs} | {r.speedup:.2f}x | {ideal} | {frechet:.1f} | {acc:.1%} | "
                     f"{psnr_cell(r)} | {format_mib(r.peak_rss)} |")
    lines += ["", front_check(searched, presets)]
    return "\n".join(lines)


def _bounds(row: BenchRow) -> tuple[float, float]:
    interval = row.psnr_interval
    return (interval.low, interval.high) if interval is not None else (row.psnr_db, row.psnr_db)


SPEED_TOLERANCE = 0.03  # measured speedups repeat within about this on the shared 2-core machine


def front_check(searched: BenchRow, presets: list[BenchRow]) -> str:
    """Whether ``searched`` lies on the measured front: no preset at least as fast (within `SPEED_TOLERANCE`) is
    better by a paired 95% PSNR interval above zero. Returns one line saying so, with the paired differences."""
    rivals = [p for p in presets if p.speedup >= searched.speedup * (1 - SPEED_TOLERANCE)]
    if not rivals:
        return f"{searched.method}: on the measured front (no preset is as fast)."
    parts, beaten_by = [], []
    for rival in rivals:
        diff = psnr_difference(searched, rival)
        parts.append(f"{rival.method} {diff.mean:+.2f} dB [{diff.low:+.2f}, {diff.high:+.2f}]")
        if diff.high < 0:
            beaten_by.append(rival.method)
    verdict = (f"off the measured front: {', '.join(beaten_by)} is as fast and better" if beaten_by
               else "on the measured front")
    return (f"{searched.method}: {verdict} (paired 95% PSNR difference vs each preset at least as fast: "
            + "; ".join(parts) + ").")


__all__ = ["DEMO_SCHEDULES", "run_demo"]
