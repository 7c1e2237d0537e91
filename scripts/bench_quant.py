"""Quantization: fp32 vs bf16 vs W8A8 simulated vs W8A8 real int8, alone, compiled and with a cache schedule, side
by side in one process (alternated runs after a warm-up, median; on CPU one thread).

Embedded digits models: calibration on 40 labels at seed 0 (per-step activation ranges, timestep MLPs from a
full-precision table); evaluation on 100 held-out images at seed 1000. Quality: Fréchet distance of the digit
classifier's features to real digits, classifier accuracy, PSNR vs fp32. Weight bytes count the denoiser's
quantized layers as stored.

``--large``: random-weight models of the real sizes at 256 px, DiT-XL/2 (675M) and the SD1.5 UNet (860M, 32x32
latent), with small text encoders and VAEs (`diffcache.testing`, ``size="large"``). Calibration on 2 other
prompts at another seed; quality is PSNR vs fp32. int8 runs with bf16 everywhere else; compiled variants use
inductor with freezing (what bf16 needs to prepack its weights).

    python scripts/bench_quant.py                          # both digits models, ~10 min on 2 cores
    python scripts/bench_quant.py --models digits-dit --per-class 5 --repeats 1
    python scripts/bench_quant.py --large dit              # ~25 min; --large sd ~20 min
    python scripts/bench_quant.py --large dit --device cuda --steps 25 --repeats 5
"""

from __future__ import annotations

import argparse
import contextlib
import math

import torch
from digits_bench import held_out, run_models  # scripts/digits_bench.py
from side_by_side import time_side_by_side  # scripts/side_by_side.py

import diffcache
from diffcache.adapters import denoiser_of
from diffcache.eval.bench import compare_methods
from diffcache.memory import format_mib
from diffcache.eval.metrics import accuracy, fid, psnr
from diffcache.models import GUIDANCE_SCALE, NUM_INFERENCE_STEPS, load_pipeline
from diffcache.quant import QuantCalibration, QuantConfig, calibrate, quantizable_layers
from diffcache.runtime import QUANT_HOOK
from diffcache.testing import build_pipeline, call_kwargs, image_size

CACHE = {"digits-dit": "uniform:interval=3", "digits-unet": "deepcache:interval=3"}
LARGE_CACHE = {"dit": "uniform:interval=3", "sd": "deepcache:interval=3"}
CALIBRATION = {"dit": [1, 500], "sd": ["a photo of a cat", "a dog in the snow"]}  # evaluation: call_kwargs's


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(CACHE))
    parser.add_argument("--per-class", type=int, default=10)
    parser.add_argument("--calibration", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--large", choices=sorted(LARGE_CACHE), help="the real-size random-weight model instead")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=10, help="sampling steps of --large")
    parser.add_argument("--no-compile", action="store_true", help="--large: leave out the compiled variants")
    args = parser.parse_args()
    if args.large:
        torch.set_num_threads(1)
        print(bench_large(args.large, args), flush=True)
    else:
        run_models(args, bench_model)


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
    float_bytes, int8_bytes = _weight_bytes(denoiser_of(pipe), per_step.config)
    lines = [
        f"**{name}** ({len(labels)} held-out images, {NUM_INFERENCE_STEPS} DDIM steps, 1 thread; {note}; "
        f"quantized layers' weights {float_bytes / 2**20:.2f} MiB fp32 -> {int8_bytes / 2**20:.2f} MiB int8)",
        "",
        "| method | measured speedup | CPU-time speedup | FID (digits) | accuracy | PSNR vs fp32 dB | peak RSS MiB |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        method = "fp32" if r.method == "full" else r.method
        lines.append(f"| {method} | {r.speedup:.2f}x | {r.cpu_speedup:.2f}x | {fid(r.images, real, classifier):.2f} "
                     f"| {accuracy(r.images, labels, classifier):.1%} | "
                     f"{r.psnr_db if math.isfinite(r.psnr_db) else 100:.1f} | {format_mib(r.peak_rss)} |")
    return "\n".join(lines) + "\n"


def bench_large(name: str, args: argparse.Namespace) -> str:
    device, steps, cache = torch.device(args.device), args.steps, LARGE_CACHE[name]
    kwargs = call_kwargs(name, num_inference_steps=steps, size="large", seed=1)
    guidance = kwargs.get("guidance_scale")
    torch._inductor.config.freezing = True

    def build(dtype: torch.dtype):
        return build_pipeline(name, size="large").to(device, dtype)

    full = build(torch.float32)
    calibration = calibrate(full, CALIBRATION[name], "w8a8", num_inference_steps=steps, guidance_scale=guidance,
                            batch_size=len(CALIBRATION[name]), progress=False)
    variants = {"fp32": full, "bf16": build(torch.bfloat16)}
    quantized = {"W8A8 int8": "none", f"W8A8 int8 + {cache}": cache}
    for label, schedule in quantized.items():  # float weights freed: the weights that run, and less RAM
        variants[label] = diffcache.accelerate(build(torch.bfloat16), schedule, quant=calibration,
                                               keep_float_weights=False)
    if not args.no_compile:
        variants["bf16 + compile"] = build(torch.bfloat16)
        for label, schedule in quantized.items():
            variants[label + " + compile"] = diffcache.accelerate(build(torch.bfloat16), schedule, quant=calibration,
                                                                  keep_float_weights=False)
        for label in [label for label in variants if label.endswith("compile")]:
            denoiser_of(variants[label]).compile()
    for pipe in variants.values():
        pipe.set_progress_bar_config(disable=True)

    def run(pipe):
        def generate():
            return pipe(**(kwargs | {"generator": torch.Generator("cpu").manual_seed(1)})).images
        return generate

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    timed = time_side_by_side({label: run(pipe) for label, pipe in variants.items()}, args.repeats, warmups=2,
                              sync=sync)
    note = diffcache.summary(variants["W8A8 int8"]).quant
    denoiser = denoiser_of(full)
    processor = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {torch.get_num_threads()} thread"
    reference = "bf16 + compile" if "bf16 + compile" in timed else "bf16"
    lines = [
        f"**{type(denoiser).__name__} {sum(p.numel() for p in denoiser.parameters()) / 1e6:.0f}M, "
        f"{image_size(name, 'large')} px** ({processor}; {steps} DDIM steps, batch 1 + CFG, median of {args.repeats}; "
        f"{note})",
        "",
        f"| method | denoiser weights MiB | warm-up s (2 runs) | median s | CPU s | vs fp32 | vs {reference} | "
        "PSNR vs fp32 dB | peak RSS MiB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for label, t in timed.items():
        quality = psnr(t.images, timed["fp32"].images)
        mib = _resident_weight_bytes(denoiser_of(variants[label])) / 2**20
        lines.append(f"| {label} | {mib:.0f} | {t.warmup_s:.1f} | {t.wall_s:.2f} | {t.cpu_s:.2f} | "
                     f"{timed['fp32'].wall_s / t.wall_s:.2f}x | {timed[reference].wall_s / t.wall_s:.2f}x | "
                     f"{quality if math.isfinite(quality) else 100:.1f} | {format_mib(t.peak_rss)} |")
    return "\n".join(lines) + "\n"


def _weight_bytes(denoiser: torch.nn.Module, config: QuantConfig) -> tuple[int, int]:
    """Bytes of the quantized layers' weights in fp32, and as int8 with one float32 scale per output channel."""
    layers = quantizable_layers(denoiser, config)
    return (sum(m.weight.numel() * 4 for _, m in layers),
            sum(m.weight.numel() + m.weight.shape[0] * 4 for _, m in layers))


def _resident_weight_bytes(denoiser: torch.nn.Module) -> int:
    """Bytes of the denoiser's parameters plus what its quantized layers' hooks hold (int8 kernels, rounded copies):
    the weights this variant keeps in memory."""
    held = sum(p.numel() * p.element_size() for p in denoiser.parameters())
    for module in denoiser.modules():
        registry = getattr(module, "_diffusers_hook", None)
        hook = registry.get_hook(QUANT_HOOK) if registry is not None else None
        held += getattr(hook, "nbytes", 0)
    return held


@contextlib.contextmanager
def _stacked(*contexts):
    with contextlib.ExitStack() as stack:
        for context in contexts:
            stack.enter_context(context)
        yield


if __name__ == "__main__":
    main()
