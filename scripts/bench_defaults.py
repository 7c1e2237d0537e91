"""`diffcache.search` with its defaults against the presets, as a new user would call it (issue #18's check).

For each embedded digits model: search with ``method`` and defaults (final round against the presets, forecast
measured, two labels held out) on 10 calibration labels at MACs budget 0.5, then generate 50 other images
(other labels' order, seed 1000) with the searched schedule, with the best preset of its final round (on the
calibration set) and with the presets the issue names, and report PSNR vs the full model with 95% bootstrap intervals and the paired difference
(searched - preset). A claim "beats" needs the paired interval above zero.

    python scripts/bench_defaults.py                       # both models, dp and ecad, about 10 min on 2 cores
    python scripts/bench_defaults.py --models digits-dit --methods dp
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from digits_bench import held_out  # scripts/digits_bench.py

import diffcache
from diffcache.eval.intervals import bootstrap, paired
from diffcache.memory import PeakRSS, format_mib
from diffcache.eval.metrics import psnr_per_image
from diffcache.models import GUIDANCE_SCALE, NUM_INFERENCE_STEPS, load_pipeline
from diffcache.schedules.budget import CostModel

PRESETS = {
    "digits-dit": ["uniform:interval=2", "uniform:interval=2,warmup=2,forecast=1", "fora:interval=2"],
    "digits-unet": ["deepcache:interval=2", "deepcache:interval=2,warmup=2,forecast=1",
                    "deepcache:interval=2,branch=-1,warmup=2,forecast=1", "uniform:interval=2"],
}
OPTIONS = {"dp": {}, "ecad": {"population": 8, "generations": 3}}


def images(pipe, labels: list[int]) -> np.ndarray:
    return np.asarray(pipe(**held_out(labels, NUM_INFERENCE_STEPS)).images)


def scored(pipe, schedule, labels: list[int], full: np.ndarray) -> tuple[np.ndarray, int | None]:
    """Per-image PSNR vs ``full`` of ``schedule``'s images, and the process's peak RSS while it ran (accelerate
    included), measured the same way for every row."""
    with PeakRSS() as peak, diffcache.accelerated(pipe, schedule):
        values = psnr_per_image(images(pipe, labels), full)
    return values, peak.bytes


def bench(name: str, methods: list[str], budget: float) -> str:
    pipe = load_pipeline(name)
    pipe.set_progress_bar_config(disable=True)
    labels = [i % 10 for i in range(50)]
    # The MACs fraction of each schedule under a cost model of its granularity, as the searches price them.
    costs = {g: CostModel.measure_on(pipe, held_out(labels[:10], 1), "macs", g)
             for g in diffcache.adapters.resolve_adapter(diffcache.adapters.denoiser_of(pipe)).granularities}
    full = images(pipe, labels)
    rows, per_image, compared = [], {}, {}
    for method in methods:
        start = time.perf_counter()
        schedule = diffcache.search(pipe, list(range(10)), method, budget, num_inference_steps=NUM_INFERENCE_STEPS,
                                    guidance_scale=GUIDANCE_SCALE, seed=0, batch_size=10, progress=False,
                                    **OPTIONS[method])
        seconds = time.perf_counter() - start
        arena = schedule.meta["arena"]
        per_image[method], peak = scored(pipe, schedule, labels, full)
        rows.append((f"{method} (defaults) -> {arena['chosen']}", schedule, per_image[method], peak,
                     f"{seconds:.0f} s search"))
        best = arena["best_preset"]  # the final round's best preset on the calibration set, scored here too
        label = f"best preset of {method}'s final round: {best['label']}"
        if best["label"] not in per_image:
            plan = diffcache.Schedule.from_dict(best["schedule"])
            per_image[best["label"]], peak = scored(pipe, plan, labels, full)
            rows.append((label, plan, per_image[best["label"]], peak, ""))
        compared.setdefault(method, []).append(best["label"])
    for tag in PRESETS[name]:
        plan = diffcache.schedules.presets.from_tag(tag, diffcache.adapters.denoiser_of(pipe), NUM_INFERENCE_STEPS)
        per_image[tag], peak = scored(pipe, plan, labels, full)
        rows.append((tag, plan, per_image[tag], peak, ""))
    lines = [f"**{name}** (50 held-out images, seed 1000; search on labels 0-9 at seed 0, MACs budget {budget})", "",
             "| schedule | recompute fraction | MACs fraction | PSNR vs full dB [95%] | peak RSS MiB | note |",
             "|---|---|---|---|---|---|"]
    for label, plan, values, peak, note in rows:
        interval = bootstrap(values)
        macs = costs[plan.granularity].fraction(plan)
        fits = "fits" if macs <= budget + 1e-9 else "over budget"
        lines.append(f"| {label} | {plan.recompute_fraction:.2f} | {macs:.3f} ({fits}) | "
                     f"{interval.mean:.2f} [{interval.low:.2f}, {interval.high:.2f}] | {format_mib(peak)} | {note} |")
    lines += ["", "| searched - preset (paired, same images) | PSNR difference dB [95%] | verdict |", "|---|---|---|"]
    for method in methods:
        for tag in [*compared.get(method, []), *PRESETS[name]]:
            diff = paired(per_image[method], per_image[tag])
            verdict = "beats" if diff.low > 0 else "loses" if diff.high < 0 else "tie (interval spans 0)"
            lines.append(f"| {method} - {tag} | {diff.mean:+.2f} [{diff.low:+.2f}, {diff.high:+.2f}] | {verdict} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(PRESETS))
    parser.add_argument("--methods", nargs="+", default=list(OPTIONS))
    parser.add_argument("--budget", type=float, default=0.5)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    for name in args.models:
        print(bench(name, args.methods, args.budget) + "\n", flush=True)


if __name__ == "__main__":
    main()
