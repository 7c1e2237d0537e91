"""How well does each search proxy rank schedules like the held-out metric? (issue #18, item 3)

For each embedded digits model, sample a few hundred block-granularity schedules (key-step patterns with random
placements, warm-up and reused depth, presets among them, each with a copy or a first/second-order forecast)
and score every one with:

* ``feature``: the summed, scale-normalized L1 feature error of its reused slots against their last computed
  step, from a calibration on the default search's 8 calibration labels (what ``dp`` minimizes unweighted);
* ``weighted feature``: the same error, each step scaled by its measured effect on the final image (``dp``'s
  default objective);
* ``calib PSNR n``: PSNR vs the full model on the first ``n`` of 32 calibration images (labels ``i % 10``,
  seed 0): what the final round and ECAD measure, at calibration sizes n = 4, 8, 16, 32;

against the target: PSNR vs the full model on 50 held-out images (labels ``i % 10``, seed 1000) and their
Fréchet distance to real digits (the digit classifier's features). The table gives Spearman's rank correlation
with a 95% bootstrap interval over schedules, for all schedules and within cost bands (a search compares
schedules of about the same cost, so the within-band number is the one that decides its pick), and the regret of
picking the proxy's best schedule in each band (held-out PSNR lost against the band's true best).

    python scripts/bench_proxy.py                      # both models, 200 schedules each, about 45 min on 1 core
    python scripts/bench_proxy.py --models digits-unet --schedules 60
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np
import torch
from digits_bench import held_out, run_models  # scripts/digits_bench.py

import diffcache
from diffcache.adapters import denoiser_of, resolve_adapter
from diffcache.data import CalibrationData
from diffcache.eval.metrics import fid, psnr_per_image
from diffcache.models import GUIDANCE_SCALE, NUM_INFERENCE_STEPS, load_pipeline
from diffcache.schedules.budget import CostModel
from diffcache.schedules.calibrate import calibrate
from diffcache.schedules.presets import from_tag, search_branch

logger = logging.getLogger("bench_proxy")
STEPS = NUM_INFERENCE_STEPS
SIZES = (4, 8, 16, 32)  # calibration images for the PSNR proxy
BANDS = ((0.25, 0.4), (0.4, 0.55), (0.55, 0.75))  # MACs fractions a search compares within
TOP = 15  # the best schedules of a band (by held-out PSNR): a search's final choice is among such near-ties
PRESETS = {
    "digits-dit": [f"uniform:interval={n},warmup={w},forecast={f}" for n in (2, 3, 4, 5) for w in (1, 2, 3)
                   for f in (0, 1, 2)],
    "digits-unet": [f"deepcache:interval={n},warmup={w},forecast={f},branch={b}" for n in (2, 3, 4, 5)
                    for w in (1, 3) for f in (0, 1, 2) for b in (0, -1)],
}


def sample(adapter, layout, rng: np.random.Generator, count: int, presets: list[str]) -> list[diffcache.Schedule]:
    """The presets, then random key-step schedules: ``k`` key steps (a warm-up of ``w`` first steps, the rest
    placed at random), every step in between reusing the units from a random depth down."""
    plans = [from_tag(tag, adapter, STEPS) for tag in presets]
    if layout.nested:
        cuts = [search_branch(layout, b) for b in (-1, 0, 1)]
    else:
        cuts = [0, 0, 0, 1, 2]
    seen = {p.recompute.tobytes() + bytes([p.forecast]) for p in plans}
    while len(plans) < count:
        keys = int(rng.integers(4, 16))
        warmup = int(rng.integers(1, 4))
        rest = rng.choice(np.arange(warmup, STEPS), size=max(0, keys - warmup), replace=False)
        key = np.zeros(STEPS, bool)
        key[:warmup] = True
        key[rest] = True
        reuse = np.zeros(len(layout.units), bool)
        reuse[int(rng.choice(cuts)):] = True
        grid = np.broadcast_to((key[:, None] | ~reuse[None])[:, :, None], (STEPS, len(layout.units), 1)).copy()
        forecast = int(rng.integers(0, 3))
        plan = diffcache.Schedule(grid, layout.units, layout.components, "random", forecast=forecast)
        tag = plan.recompute.tobytes() + bytes([forecast])
        if tag not in seen:
            seen.add(tag)
            plans.append(plan)
    return plans


def feature_error(calibration, plan: diffcache.Schedule, weights: np.ndarray) -> float:
    """Sum over reused (step, slot) of the normalized L1 distance to the slot's last computed step, weighted."""
    distance = calibration.normalized("l1")
    total = 0.0
    for u in range(len(plan.units)):
        for c in range(len(plan.components)):
            last = 0
            for t in range(1, STEPS):
                if plan.recompute[t, u, c]:
                    last = t
                else:
                    total += distance[u, c, last, t] * weights[t]
    return float(total)


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    rx, ry = np.argsort(np.argsort(x)), np.argsort(np.argsort(y))
    return float(np.corrcoef(rx, ry)[0, 1])


def spearman_interval(x: np.ndarray, y: np.ndarray, resamples: int = 1000) -> tuple[float, float, float]:
    rng = np.random.default_rng(0)
    draws = []
    for _ in range(resamples):
        i = rng.integers(0, len(x), len(x))
        if np.ptp(x[i]) > 0 and np.ptp(y[i]) > 0:
            draws.append(spearman(x[i], y[i]))
    low, high = np.quantile(draws, [0.025, 0.975])
    return spearman(x, y), float(low), float(high)


def bench_model(name: str, args: argparse.Namespace, classifier, real) -> str:
    pipe = load_pipeline(name)
    pipe.set_progress_bar_config(disable=True)
    adapter = resolve_adapter(denoiser_of(pipe))
    layout = adapter.layout("block")
    plans = sample(adapter, layout, np.random.default_rng(args.seed), args.schedules, PRESETS[name])
    data = CalibrationData(list(range(8)), STEPS, GUIDANCE_SCALE, 0, 8)
    calibration = calibrate(pipe, data, "block", progress=False)
    weights = calibration.step_weights("l1")
    cost = CostModel.measure_on(pipe, held_out(list(range(10)), 1), "macs", "block")
    calib_kwargs = held_out([i % 10 for i in range(max(SIZES))], STEPS) | {
        "generator": torch.Generator("cpu").manual_seed(0)}
    labels = [i % 10 for i in range(args.held_out)]
    full_calib = np.asarray(pipe(**calib_kwargs).images)
    full_held = np.asarray(pipe(**held_out(labels, STEPS)).images)
    cache = Path(args.work) / f"{name}.jsonl"
    cache.parent.mkdir(parents=True, exist_ok=True)
    done = [json.loads(line) for line in cache.read_text().splitlines()] if cache.exists() else []
    rows = done[: len(plans)]
    with cache.open("a") as out:
        for i, plan in enumerate(plans[len(rows):], start=len(rows)):
            with diffcache.accelerated(pipe, plan):
                calib = psnr_per_image(np.asarray(pipe(**calib_kwargs | {
                    "generator": torch.Generator("cpu").manual_seed(0)}).images), full_calib)
                images = np.asarray(pipe(**held_out(labels, STEPS)).images)
            row = {"i": i, "macs": cost.fraction(plan), "forecast": plan.forecast,
                   "feature": feature_error(calibration, plan, np.ones(STEPS)),
                   "weighted": feature_error(calibration, plan, weights),
                   **{f"calib{n}": float(np.minimum(calib[:n], 100).mean()) for n in SIZES},
                   "held_psnr": float(np.minimum(psnr_per_image(images, full_held), 100).mean()),
                   "held_fid": fid(images, real, classifier)}
            out.write(json.dumps(row) + "\n")
            out.flush()
            rows.append(row)
            logger.info("%s %d/%d macs %.2f held %.1f dB", name, i + 1, len(plans), row["macs"], row["held_psnr"])
    return table(name, rows, args)


PROXIES = [("feature", "feature error (unweighted)", -1), ("weighted", "feature error (image-weighted)", -1),
           *[(f"calib{n}", f"calibration PSNR, {n} images", 1) for n in SIZES]]


def table(name: str, rows: list[dict], args: argparse.Namespace) -> str:
    get = {k: np.array([r[k] for r in rows]) for k in rows[0]}
    lines = [f"**{name}** ({len(rows)} schedules, block granularity, {STEPS} DDIM steps; held-out: "
             f"{args.held_out} images at seed 1000)", "",
             "| proxy | Spearman vs held-out PSNR, all [95%] | within cost bands (mean) | same, copy schedules only "
             f"| among each band's {TOP} best (held-out), per band | regret of its pick per band, dB "
             "| Spearman vs held-out FID (lower better), all |",
             "|---|---|---|---|---|---|---|"]
    for key, title, sign in PROXIES:
        score = sign * get[key]  # higher = proxy says better
        rho, low, high = spearman_interval(score, get["held_psnr"])
        within, within_copy, regret, top = [], [], [], []
        for lo, hi in BANDS:
            band = (get["macs"] >= lo) & (get["macs"] < hi)
            if band.sum() >= 5:
                within.append(spearman(score[band], get["held_psnr"][band]))
                index = np.flatnonzero(band)
                best = index[np.argsort(-get["held_psnr"][index])[:TOP]]  # the schedules a search must tell apart
                top.append(spearman(score[best], get["held_psnr"][best]))
                best = get["held_psnr"][band].max()
                regret.append(best - get["held_psnr"][band][np.argmax(score[band])])
            copy = band & (get["forecast"] == 0)
            if copy.sum() >= 5:
                within_copy.append(spearman(score[copy], get["held_psnr"][copy]))
        fid_rho = spearman(score, -get["held_fid"])
        lines.append(f"| {title} | {rho:+.2f} [{low:+.2f}, {high:+.2f}] | {np.mean(within):+.2f} | "
                     f"{np.mean(within_copy):+.2f} | {' / '.join(f'{r:+.2f}' for r in top)} | "
                     f"{' / '.join(f'{r:.1f}' for r in regret)} | {fid_rho:+.2f} |")
    counts = [int(((get['macs'] >= lo) & (get['macs'] < hi)).sum()) for lo, hi in BANDS]
    lines += ["", f"Cost bands (MACs fraction): {', '.join(f'{lo}-{hi}: {c} schedules' for (lo, hi), c in zip(BANDS, counts))}; "
              f"held-out PSNR ranges {get['held_psnr'].min():.1f}-{get['held_psnr'].max():.1f} dB; "
              f"Spearman between held-out PSNR and held-out FID: {spearman(get['held_psnr'], -get['held_fid']):+.2f}."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(PRESETS))
    parser.add_argument("--schedules", type=int, default=200)
    parser.add_argument("--held-out", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", default="bench-proxy", help="per-schedule results, appended (resumable)")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    run_models(parser.parse_args(), bench_model)


if __name__ == "__main__":
    main()
