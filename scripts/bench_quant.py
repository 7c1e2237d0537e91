"""Quantization on the embedded digits models: fp32 vs bf16 vs W8A8 simulated vs W8A8 real int8, alone and with a
cache schedule, side by side in one process (CPU, 1 thread, alternated runs after a warm-up, median).

Calibration: 40 labels at seed 0 (per-step activation ranges, timestep MLPs from a full-precision table);
evaluation: 100 held-out images at seed 1000. Quality: Fréchet distance of the digit classifier's features to
real digits, classifier accuracy, PSNR vs fp32. Weight bytes count the denoiser's quantized layers as stored.

    python scripts/bench_quant.py                          # both models, ~10 min on 2 cores
    python scripts/bench_quant.py --models digits-dit --per-class 5 --repeats 1
"""

from __future__ import annotations

import argparse
import contextlib
import math

import torch
from digits_bench import held_out, run_models  # scripts/digits_bench.py

import diffcache
from diffcache.adapters import denoiser_of
from diffcache.eval.bench import compare_methods
from diffcache.eval.metrics import accuracy, fid
from diffcache.models import GUIDANCE_SCALE, NUM_INFERENCE_STEPS, load_pipeline
from diffcache.quant import QuantCalibration, QuantConfig, calibrate, quantizable_layers

CACHE = {"digits-dit": "uniform:interval=3", "digits-unet": "deepcache:interval=3"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(CACHE))
    parser.add_argument("--per-class", type=int, default=10)
    parser.add_argument("--calibration", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=3)
    run_models(parser.parse_args(), bench_model)


def bench_model(name: str, args: argparse.Namespace, classifier, real) -> str:
    pipe = load_pipeline(name)
    pipe.set_progress_bar_config(disable=True)
    labels = [i % 10 for i in range(10 * args.per_class)]
    per_step = calibrate(pipe, [i % 10 for i in range(args.calibration)], "w8a8",
                         num_inference_steps=NUM_INFERENCE_STEPS, guidance_scale=GUIDANCE_SCALE, batch_size=20,
                         progress=False)
    simulated = QuantCalibration(QuantConfig(backend="fake"), per_step.model, per_step.layers, per_step.ranges,
                                 per_step.data_key, per_step.temporal)
    cache = CACHE[name]
    others = {
        "bf16 (autocast)": lambda: torch.autocast("cpu", dtype=torch.bfloat16),
        "W8A8 simulated": lambda: diffcache.accelerated(pipe, "none", quant=simulated),
        "W8A8 int8": lambda: diffcache.accelerated(pipe, "none", quant=per_step),
        f"W8A8 int8 + {cache}": lambda: diffcache.accelerated(pipe, cache, quant=per_step),
        f"bf16 + {cache}": lambda: _stacked(diffcache.accelerated(pipe, cache),
                                            torch.autocast("cpu", dtype=torch.bfloat16)),
    }
    with diffcache.accelerated(pipe, "none", quant=per_step):  # (calibrated for this step count only)
        pipe(**held_out(labels[:2], NUM_INFERENCE_STEPS))
        note = diffcache.summary(pipe).quant
    rows = compare_methods(pipe, lambda: held_out(labels, NUM_INFERENCE_STEPS), [cache], args.repeats, progress=False,
                           others=others)
    denoiser = denoiser_of(pipe)
    layers = quantizable_layers(denoiser, per_step.config)
    float_bytes = sum(m.weight.numel() * 4 for _, m in layers)
    int8_bytes = sum(m.weight.numel() + m.weight.shape[0] * 4 for _, m in layers)
    lines = [
        f"**{name}** ({len(labels)} held-out images, {NUM_INFERENCE_STEPS} DDIM steps, 1 thread; {note}; "
        f"quantized layers' weights {float_bytes / 2**20:.2f} MiB fp32 -> {int8_bytes / 2**20:.2f} MiB int8)",
        "",
        "| method | measured speedup | CPU-time speedup | FID (digits) | accuracy | PSNR vs fp32 dB |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        method = "fp32" if r.method == "full" else r.method
        lines.append(f"| {method} | {r.speedup:.2f}x | {r.cpu_speedup:.2f}x | {fid(r.images, real, classifier):.2f} "
                     f"| {accuracy(r.images, labels, classifier):.1%} | "
                     f"{r.psnr_db if math.isfinite(r.psnr_db) else 100:.1f} |")
    return "\n".join(lines) + "\n"


@contextlib.contextmanager
def _stacked(*contexts):
    with contextlib.ExitStack() as stack:
        for context in contexts:
            stack.enter_context(context)
        yield


if __name__ == "__main__":
    main()
