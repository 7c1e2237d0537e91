"""Low-bit quantization on the embedded digits models, side by side in one process: fp32, W8A8 PTQ, W4A8 PTQ, W4A8
EfficientDM, W4A4 PTQ, W4A4 EfficientDM, and the best 4-bit one with a 1-in-3 cache schedule.

PTQ calibrates on 40 labels at seed 0 (per-step activation ranges, timestep MLPs from a float table, first and
last layers at 8 bits); EfficientDM fine-tunes each 4-bit PTQ start on trajectories of the ten classes (2 a
trajectory, seeds of their own) with 2 threads, timed. The evaluation: 100 held-out images (10 a class, seed 1000)
after a warm-up, latency as the median of alternated runs with 1 thread, peak RSS of each method's runs, weight
bytes of the quantized layers as they run (packed int4, int8, or float for simulated layers), Fréchet distance
of the digit classifier's features to real digits, accuracy, and PSNR vs fp32 with 95% bootstrap intervals over
images; "vs PTQ" is the paired interval of EfficientDM's minus PTQ's per-image PSNR (same noise), and "acc vs
fp32" the paired interval of the accuracy difference in points.

    python scripts/bench_efficientdm.py                         # both models, ~50 min on 2 cores
    python scripts/bench_efficientdm.py --models digits-unet --epochs 40 --per-class 3 --repeats 1
    python scripts/bench_efficientdm.py --save /tmp/edm          # keep the fine-tuned calibrations (reused later)
"""

from __future__ import annotations

import argparse
import logging
import math
import time
from pathlib import Path

import numpy as np
import torch
from digits_bench import held_out  # scripts/digits_bench.py

import diffcache
from diffcache.eval.bench import compare_methods
from diffcache.eval.intervals import bootstrap, paired
from diffcache.memory import format_mib
from diffcache.eval.metrics import as_tensor, fid
from diffcache.models import GUIDANCE_SCALE, NUM_INFERENCE_STEPS, load_classifier, load_pipeline, real_digits
from diffcache.quant import QuantCalibration, calibrate, finetune, quantizable_layers
from diffcache.quant.hooks import QuantLayerHook, quant_hooks
from diffcache.adapters import denoiser_of, resolve_adapter

logger = logging.getLogger("bench_efficientdm")

CACHE = {"digits-dit": "uniform:interval=3", "digits-unet": "deepcache:interval=3"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(CACHE))
    parser.add_argument("--per-class", type=int, default=10)
    parser.add_argument("--calibration", type=int, default=40)
    parser.add_argument("--epochs", type=int, default=80, help="EfficientDM epochs (default 80, finetune's)")
    parser.add_argument("--lr-scale", type=float, default=32.0, help="LoRA learning-rate multiplier (default 32)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--save", type=Path, default=None, help="folder for the calibrations (reused if there)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    classifier = load_classifier()
    real, _ = real_digits("test")
    for name in args.models:
        print(bench_model(name, args, classifier, real), flush=True)


def quantized(pipe, name: str, args: argparse.Namespace) -> tuple[dict[str, QuantCalibration], dict[str, dict]]:
    """The PTQ and EfficientDM calibrations (from ``--save`` when there), and the fine-tunes' costs."""
    labels = [i % 10 for i in range(args.calibration)]
    out: dict[str, QuantCalibration] = {}
    costs: dict[str, dict] = {}
    for config in ("w8a8", "w4a8", "w4a4"):
        out[f"{config} PTQ"] = _cached(args.save, f"{name}-{config}-ptq", lambda c=config: calibrate(
            pipe, labels, c, num_inference_steps=NUM_INFERENCE_STEPS, guidance_scale=GUIDANCE_SCALE, batch_size=20,
            progress=False))
    epochs = args.epochs
    for config in ("w4a8", "w4a4"):
        def tune(c=config):
            torch.set_num_threads(2)  # the fine-tune's budget: 10 CPU-minutes on 2 cores
            wall, cpu = time.perf_counter(), time.process_time()
            tuned = finetune(pipe, list(range(10)), out[f"{c} PTQ"], epochs=epochs, guidance_scale=GUIDANCE_SCALE,
                             lr_scale=args.lr_scale, seed=1, progress=True)
            tuned.training["wall_s"] = round(time.perf_counter() - wall, 1)
            tuned.training["cpu_s"] = round(time.process_time() - cpu, 1)
            torch.set_num_threads(1)
            return tuned
        out[f"{config} EfficientDM"] = _cached(args.save, f"{name}-{config}-edm{epochs}", tune)
        costs[config] = out[f"{config} EfficientDM"].training
    return out, costs


def _cached(folder: Path | None, stem: str, make) -> QuantCalibration:
    path = folder / f"{stem}.npz" if folder is not None else None
    if path is not None and path.exists():
        logger.info("reusing %s", path)
        return QuantCalibration.load(path)
    made = make()
    if path is not None:
        made.save(path)
    return made


def weight_bytes(pipe, calibration: QuantCalibration) -> int:
    """Bytes of the quantized layers' weights as they run (kernels' packed/int8 codes and scales; simulated layers
    hold a float copy) plus the float layers the config leaves out."""
    hooks, _ = quant_hooks(resolve_adapter(denoiser_of(pipe)), calibration, None)
    return sum(hook.nbytes for _, hook in hooks if isinstance(hook, QuantLayerHook))


def correct(images: np.ndarray, labels: list[int], classifier) -> np.ndarray:
    with torch.no_grad():
        return (classifier(as_tensor(images)).argmax(dim=-1) == torch.as_tensor(labels)).float().numpy()


def bench_model(name: str, args: argparse.Namespace, classifier, real) -> str:
    torch.set_num_threads(1)
    pipe = load_pipeline(name)
    pipe.set_progress_bar_config(disable=True)
    calibrations, costs = quantized(pipe, name, args)
    labels = [i % 10 for i in range(10 * args.per_class)]
    cache = CACHE[name]
    others = {label: (lambda c=c: diffcache.accelerated(pipe, "none", quant=c)) for label, c in calibrations.items()}
    rows = compare_methods(pipe, lambda: held_out(labels, NUM_INFERENCE_STEPS), [], args.repeats, progress=True,
                           others=others)
    by = {r.method: r for r in rows}
    best = max(("w4a8 EfficientDM", "w4a4 EfficientDM", "w4a8 PTQ", "w4a4 PTQ"), key=lambda m: by[m].psnr_db)
    cached_label = f"{best} + {cache}"
    cached_rows = compare_methods(pipe, lambda: held_out(labels, NUM_INFERENCE_STEPS), [], args.repeats,
                                  progress=True, others={
                                      cached_label: lambda: diffcache.accelerated(pipe, cache,
                                                                                  quant=calibrations[best])})
    # the second comparison has its own fp32 row: speedups are against it, in the same process
    by[cached_label] = cached_rows[1]
    order = ["full", *calibrations, cached_label]
    layers = quantizable_layers(denoiser_of(pipe), calibrations["w8a8 PTQ"].config)
    float_bytes = sum(module.weight.numel() * module.weight.element_size() for _, module in layers)
    base_correct = correct(by["full"].images, labels, classifier)
    lines = [
        f"**{name}** ({len(labels)} held-out images, {NUM_INFERENCE_STEPS} DDIM steps, CFG {GUIDANCE_SCALE}, latency "
        f"with 1 thread, median of {args.repeats} alternated runs)",
        "",
        "| method | latency s | vs fp32 | quantized weights | peak RSS MiB | FID | accuracy | acc vs fp32 (points) "
        "| PSNR vs fp32 dB | vs PTQ dB (paired) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for method in order:
        r = by[method]
        ok = correct(r.images, labels, classifier)
        cal = calibrations.get(method.split(" + ")[0]) if method != "full" else None
        size = f"{float_bytes / 2**20:.2f} MiB fp32" if cal is None else f"{weight_bytes(pipe, cal) / 2**20:.2f} MiB"
        psnr_cell = "-" if method == "full" else f"{r.psnr_db:.1f} {_brackets(bootstrap(r.psnr_images))}"
        versus = "-"
        if "EfficientDM" in method and " + " not in method:
            diff = paired(r.psnr_images, by[method.replace("EfficientDM", "PTQ")].psnr_images)
            versus = f"{diff.mean:+.1f} {_brackets(diff, signed=True)}"
        acc_diff = paired(ok * 100, base_correct * 100)
        lines.append(
            f"| {'fp32' if method == 'full' else method} | {r.wall_s:.2f} | {r.speedup:.2f}x | {size} | "
            f"{format_mib(r.peak_rss)} | {fid(r.images, real, classifier):.2f} | {ok.mean():.0%} | "
            f"{'-' if method == 'full' else f'{acc_diff.mean:+.1f} {_brackets(acc_diff, signed=True)}'} | "
            f"{psnr_cell} | {versus} |")
    lines.append("")
    for config, cost in costs.items():
        if "wall_s" in cost:
            lines.append(f"- {config} EfficientDM: {cost['epochs']} epochs (x {NUM_INFERENCE_STEPS} steps), "
                         f"{cost['wall_s'] / 60:.1f} min wall / {cost['cpu_s'] / 60:.1f} CPU-min on 2 threads; "
                         f"distillation loss {cost['losses'][0]:.4f} (first epoch) -> "
                         f"{np.mean(cost['losses'][-5:]):.4f} (last 5)")
    with diffcache.accelerated(pipe, "none", quant=calibrations["w4a8 EfficientDM"]):
        pipe(**held_out(labels[:1], NUM_INFERENCE_STEPS))
        lines.append(f"- summary: {diffcache.summary(pipe).quant}")
    return "\n".join(lines) + "\n"


def _brackets(interval, signed: bool = False) -> str:
    fmt = "{:+.1f}" if signed else "{:.1f}"
    if not (math.isfinite(interval.low) and math.isfinite(interval.high)):
        return ""
    return f"[{fmt.format(interval.low)}, {fmt.format(interval.high)}]"


if __name__ == "__main__":
    main()
