"""What the benchmarks on the embedded digits models share: the held-out generation call and the model loop."""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch

from diffcache.models import GUIDANCE_SCALE, load_classifier, real_digits

HELD_OUT_SEED = 1000


def held_out(labels: list[int], steps: int) -> dict:
    """Call arguments of the held-out set: the same noise (seed 1000) for every method."""
    return {"class_labels": labels, "num_inference_steps": steps, "guidance_scale": GUIDANCE_SCALE,
            "output_type": "np", "generator": torch.Generator("cpu").manual_seed(HELD_OUT_SEED)}


def run_models(args: argparse.Namespace, bench_model: Callable[..., str]) -> None:
    """One torch thread; print ``bench_model(name, args, classifier, real_digits)`` for each of ``args.models``."""
    torch.set_num_threads(1)
    classifier = load_classifier()
    real, _ = real_digits("test")
    for name in args.models:
        print(bench_model(name, args, classifier, real), flush=True)
