"""The default search against the field at equal measured speed, on the embedded digits models (issue #18, item 6).

For each model: set up diffusers' own caches near 1.7x, 2.3x and 3x (TaylorSeer at orders 1 and 2, MagCache
with its ratios calibrated on this model, FirstBlockCache; FasterCache and cache-dit are reported where they do
not run), record which steps each one computes in full, and price that compute pattern with the latency profile
the searches use. Then call ``diffcache.search`` with its defaults (``dp``, and ``ecad``) at exactly each
baseline's price on 20 calibration labels (seed 0). Everything then generates 100 held-out images (seed 1000),
timed side by side in one process (`diffcache.eval.bench.compare_methods`: warm-up, alternated rounds, median, one
thread). For each baseline the table gives both measured speedups and the paired PSNR difference (search -
baseline, same images) with its 95% bootstrap interval: "beats" needs the interval above zero and the search at
least as fast within the timing noise.

    python scripts/bench_search.py                        # both models, about 45 min on 2 cores
    python scripts/bench_search.py --models digits-unet --methods dp --per-class 5 --repeats 1
"""

from __future__ import annotations

import argparse
import contextlib
import math
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from digits_bench import held_out, run_models  # scripts/digits_bench.py

import diffcache
from diffcache.adapters import denoiser_of, resolve_adapter
from diffcache.data import CalibrationData, conditions_from
from diffcache.errors import MissingExtraError
from diffcache.eval.baselines import BaselineUnavailable, cache_dit_cache, diffusers_cache, mag_ratios
from diffcache.eval.bench import compare_methods, label
from diffcache.eval.intervals import bootstrap, paired
from diffcache.memory import format_mib
from diffcache.eval.metrics import accuracy, fid, psnr_per_image
from diffcache.models import GUIDANCE_SCALE, NUM_INFERENCE_STEPS, load_pipeline
from diffcache.schedules.budget import Budget, CostModel
from diffcache.schedules.presets import whole_steps
from diffcache.schedules.search import default_granularity

STEPS = NUM_INFERENCE_STEPS
TARGETS = (1.7, 2.3, 3.0)  # speedups the baselines are set up near
SPEED_NOISE = 0.03  # side-by-side timings repeat within about this on the shared 2-core machine
BATCH = 10
LEAF = {"digits-dit": "transformer_blocks.5.ff", "digits-unet": "mid_block.resnets.0"}  # inside a skipped module: runs only on computed steps
OPTIONS = {"dp": {}, "ecad": {}}
# TaylorSeer: its interval sets the speed (3 settings x 2 orders); MagCache and FirstBlockCache: the setting of
# each grid whose compute pattern is nearest each target is kept.
TAYLORSEER = [{"cache_interval": n, "disable_cache_before_step": 2} | order
              for n in (2, 3, 4) for order in ({}, {"max_order": 2})]
MAGCACHE_GRID = [{"threshold": t, "max_skip_steps": k, "retention_ratio": r}
                 for t in (0.02, 0.06, 0.12, 0.25) for k in (2, 3, 5, 8) for r in (0.1, 0.2)]
FBCACHE_GRID = [{"threshold": t} for t in (0.05, 0.08, 0.1, 0.13, 0.16, 0.2, 0.25, 0.3, 0.4)]
# cache-dit's DBCache (Fn=1 first block always computed, Bn=0), plain and with its TaylorSeer calibrator
CACHE_DIT_GRID = [{"Fn_compute_blocks": 1, "Bn_compute_blocks": 0, "residual_diff_threshold": t, "max_warmup_steps": w}
                  for t in (0.08, 0.12, 0.16, 0.2, 0.3, 0.4) for w in (2, 4, 8)]
FAMILIES = ("taylorseer", "mag_cache", "first_block_cache", "faster_cache", "cache_dit")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(LEAF))
    parser.add_argument("--methods", nargs="+", default=list(OPTIONS))
    parser.add_argument("--per-class", type=int, default=10, help="held-out images per class (default 10)")
    parser.add_argument("--calibration", type=int, default=20, help="calibration labels (default 20)")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per method (default 2)")
    parser.add_argument("--baselines", nargs="+", default=list(FAMILIES), choices=FAMILIES,
                        help="which baseline families to set up (default all)")
    parser.add_argument("--work", default="bench-search", help="folder for the ECAD checkpoints")
    run_models(parser.parse_args(), bench_model)


@contextlib.contextmanager
def _counting(pipe, leaf: str):
    """Which denoiser calls (steps) ran ``leaf``: the steps a cache computed in full."""
    denoiser = denoiser_of(pipe)
    calls, computed = [0], set()
    pre = denoiser.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    post = denoiser.get_submodule(leaf).register_forward_hook(lambda *_: computed.add(calls[0] - 1))
    try:
        yield computed
    finally:
        pre.remove()
        post.remove()


def compute_pattern(pipe, leaf: str, context: Callable[[], contextlib.AbstractContextManager], labels) -> np.ndarray:
    """The steps ``context``'s cache computes in full on ``labels`` (the calibration batch, seed 0)."""
    with context(), _counting(pipe, leaf) as computed:
        pipe(**held_out(labels, STEPS) | {"generator": torch.Generator("cpu").manual_seed(0)})
    key = np.zeros(STEPS, bool)
    key[sorted(computed)] = True
    return key


def price(adapter, cost_model: CostModel, granularity: str, key: np.ndarray) -> float:
    """Latency fraction of a pattern whose key steps compute every slot and whose other steps reuse them all
    (FirstBlockCache also runs its first block on those: it is priced slightly low, against the search)."""
    return cost_model.fraction(whole_steps(adapter.layout(granularity), key, "pattern"))


def baselines_for(name: str, pipe, labels, families) -> tuple[dict[str, Callable], dict[str, np.ndarray], list[str]]:
    """diffusers' and cache-dit's caches set up near each target speed: name -> context factory, name -> compute
    pattern; and a note for each family that does not run on this pipeline."""
    leaf, notes = LEAF[name], []
    candidates = {_title("taylorseer", p): ("taylorseer", p) for p in TAYLORSEER} if "taylorseer" in families else {}
    patterns: dict[str, np.ndarray] = {}  # every setting tried, so a chosen one is not run again

    def mag_cache() -> dict[str, tuple[str, dict]]:
        ratios = mag_ratios(pipe, held_out(labels, STEPS) | {"generator": torch.Generator("cpu").manual_seed(0)})
        grid = {_title("mag_cache", p): ("mag_cache", p | {"mag_ratios": ratios, "num_inference_steps": STEPS})
                for p in MAGCACHE_GRID}
        return _nearest(pipe, leaf, grid, labels, patterns)

    def first_block_cache() -> dict[str, tuple[str, dict]]:
        return _nearest(pipe, leaf, {_title("first_block_cache", p): ("first_block_cache", p)
                                     for p in FBCACHE_GRID}, labels, patterns)

    def faster_cache() -> dict[str, tuple[str, dict]]:
        with diffusers_cache(pipe, "faster_cache"):
            pipe(**held_out(labels[:2], 2))
        return {"diffusers faster_cache": ("faster_cache", {})}

    def cache_dit() -> dict[str, tuple[str, dict]]:
        chosen = {}
        for order in (0, 1):  # plain DBCache, and with its TaylorSeer calibrator
            grid = {_title("cache_dit", p | {"taylorseer_order": order}): ("cache_dit", p | {"taylorseer_order": order})
                    for p in CACHE_DIT_GRID}
            chosen |= _nearest(pipe, leaf, grid, labels, patterns)
        return chosen

    builders = {"mag_cache": mag_cache, "first_block_cache": first_block_cache, "faster_cache": faster_cache,
                "cache_dit": cache_dit}
    for family, build in builders.items():
        if family in families:
            try:
                candidates |= build()
            except (BaselineUnavailable, MissingExtraError) as err:
                notes.append(f"- {family}: not applicable ({err})")
    contexts = {t: (lambda b=b, p=p: _context(pipe, b, p)) for t, (b, p) in candidates.items()}
    patterns = {t: patterns[t] if t in patterns else compute_pattern(pipe, leaf, c, labels)
                for t, c in contexts.items()}
    return contexts, patterns, notes


def _context(pipe, baseline: str, params: dict) -> contextlib.AbstractContextManager:
    return cache_dit_cache(pipe, **params) if baseline == "cache_dit" else diffusers_cache(pipe, baseline, **params)


def _nearest(pipe, leaf: str, grid: dict[str, tuple[str, dict]], labels, patterns: dict[str, np.ndarray]
             ) -> dict[str, tuple[str, dict]]:
    """Per target speed, the grid setting whose number of fully computed steps is nearest ``STEPS / target``;
    every setting's compute pattern is recorded in ``patterns``."""
    for t, (b, p) in grid.items():
        patterns[t] = compute_pattern(pipe, leaf, lambda b=b, p=p: _context(pipe, b, p), labels)
    counts = {t: int(patterns[t].sum()) for t in grid}
    chosen = {min(counts, key=lambda t: (abs(counts[t] - STEPS / target), t)) for target in TARGETS}
    return {t: grid[t] for t in sorted(chosen, key=lambda t: -counts[t])}


def bench_model(name: str, args: argparse.Namespace, classifier, real) -> str:
    pipe = load_pipeline(name)
    pipe.set_progress_bar_config(disable=True)
    labels = [i % 10 for i in range(10 * args.per_class)]
    calibration = [i % 10 for i in range(args.calibration)]
    contexts, patterns, notes = baselines_for(name, pipe, calibration[:BATCH], args.baselines)
    adapter = resolve_adapter(denoiser_of(pipe))
    first_batch = CalibrationData(conditions_from(calibration, pipe), STEPS, GUIDANCE_SCALE, 0, BATCH).batches(pipe)[0]
    cost_models = {g: CostModel.measure_on(pipe, first_batch, "latency", g) for g in adapter.granularities}
    searched: dict[str, dict[str, diffcache.Schedule]] = {}  # baseline -> method -> its search at that price
    search_cost: dict[str, list[float]] = {}
    for method in args.methods:
        granularity = default_granularity(method, adapter, False)
        prices = {t: price(adapter, cost_models[granularity], granularity, k) for t, k in patterns.items()}
        done: dict[float, diffcache.Schedule] = {}
        for title, fraction in sorted(prices.items(), key=lambda kv: -kv[1]):
            if fraction not in done:  # exact: the baseline's own pattern must fit its budget
                start = time.perf_counter()
                done[fraction] = diffcache.search(
                    pipe, calibration, method, Budget("latency", fraction), num_inference_steps=STEPS,
                    guidance_scale=GUIDANCE_SCALE, batch_size=BATCH, progress=False,
                    cost_model=cost_models[granularity], out_dir=Path(args.work) / name / method, resume=True,
                    **OPTIONS[method])
                search_cost.setdefault(method, []).append(time.perf_counter() - start)
            searched.setdefault(title, {})[method] = done[fraction]
    schedules = list({label(s): s for per in searched.values() for s in per.values()}.values())
    rows = compare_methods(pipe, lambda: held_out(labels, STEPS), schedules, args.repeats, progress=False,
                           others=contexts)
    by = {r.method: r for r in rows}
    full = by["full"].images
    per_image = {m: np.minimum(psnr_per_image(r.images, full), 100.0) for m, r in by.items()}
    scores = {m: (fid(r.images, real, classifier), accuracy(r.images, labels, classifier)) for m, r in by.items()}
    lines = [f"**{name}** ({len(labels)} held-out images per method, seed 1000, {STEPS} DDIM steps, guidance "
             f"{GUIDANCE_SCALE}; searches on {len(calibration)} labels at seed 0 with their defaults, each at the "
             f"price of the baseline's compute pattern; 1 thread)", "",
             "| cache (diffusers / cache-dit) | its speedup | its PSNR dB [95%] / FID / acc | search (defaults) at its price | "
             "speedup | PSNR dB [95%] / FID / acc | search - cache, PSNR dB [95%, paired] | verdict | "
             "peak RSS MiB (cache / search) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for title in contexts:
        base = by[title]
        for method, schedule in searched.get(title, {}).items():
            ours = by[label(schedule)]
            diff = paired(per_image[ours.method], per_image[title])
            fast = ours.speedup >= (1 - SPEED_NOISE) * base.speedup
            verdict = ("beats" if diff.low > 0 else "loses" if diff.high < 0 else "tie") + (
                "" if fast else f" (but {ours.speedup / base.speedup - 1:+.0%} speed)")
            lines.append(f"| {title} | {base.speedup:.2f}x | {_quality(per_image[title], scores[title])} | "
                         f"{method} -> {schedule.meta.get('arena', {}).get('chosen', label(schedule))} | "
                         f"{ours.speedup:.2f}x | {_quality(per_image[ours.method], scores[ours.method])} | "
                         f"{diff.mean:+.2f} [{diff.low:+.2f}, {diff.high:+.2f}] | {verdict} | "
                         f"{format_mib(base.peak_rss)} / {format_mib(ours.peak_rss)} |")
    macs = {r.method: r.macs_speedup for r in rows}
    lines += ["", "Search cost (1 torch thread, calibration reused across budgets): " + "; ".join(
        f"{m}: first budget {c[0] / 60:.1f} CPU-min, each further {np.median(c[1:]) / 60 if len(c) > 1 else math.nan:.1f}"
        for m, c in search_cost.items()),
        "MACs speedups of the searched schedules: " + ", ".join(
            f"{m} {v:.2f}x" for m, v in macs.items() if m in {label(s) for s in schedules})]
    return "\n".join(lines + notes) + "\n"


SHORT = {"Fn_compute_blocks": "Fn", "Bn_compute_blocks": "Bn", "residual_diff_threshold": "threshold",
         "max_warmup_steps": "warmup", "taylorseer_order": "taylorseer"}


def _title(baseline: str, params: dict) -> str:
    shown = {SHORT.get(k, k): v for k, v in params.items() if k not in ("mag_ratios", "num_inference_steps")}
    owner = "cache-dit DBCache" if baseline == "cache_dit" else f"diffusers {baseline}"
    return f"{owner} " + ",".join(f"{k}={v}" for k, v in shown.items())


def _quality(values: np.ndarray, score: tuple[float, float]) -> str:
    interval = bootstrap(values)
    return f"{interval.mean:.1f} [{interval.low:.1f}, {interval.high:.1f}] / {score[0]:.2f} / {score[1]:.0%}"


if __name__ == "__main__":
    main()
