"""Resident memory of the SD1.5-size UNet pipeline (860M random weights, 256 px) in fp32 and W8A8 int8, in one
process: RSS (``VmRSS``) after each stage and the peak during it (`diffcache.memory.PeakRSS`).

Stages: build, fp32 generations (the reference), W8A8 calibration on 2 prompts, ``accelerate(quant=...)`` with the
float weights released, int8 generations. The check: RSS after the last int8 generation within 5% of after the
first (a cache that fills once and stays is fine; growth per generation is a leak).

``--probe`` adds, after each stage, the bytes Python-visible tensors hold (a ``gc`` scan; oneDNN's prepacked int8
weights are opaque to it) and what glibc's ``malloc_trim`` then gives back (free memory the allocator kept
resident). ``--no-trim`` turns off the trim `accelerate` does after quantizing (the behaviour before it), to see
what it saves. oneDNN's primitive cache is sized by the environment (``ONEDNN_PRIMITIVE_CACHE_CAPACITY``, read at
the first primitive), glibc's arenas by ``MALLOC_ARENA_MAX``; both are logged, so runs with different settings can
be compared.

    python scripts/bench_memory.py                          # ~12 min on 2 cores
    python scripts/bench_memory.py --calibration /tmp/sd_w8a8.npz --probe --no-fp32
    python scripts/bench_memory.py --calibration /tmp/sd_w8a8.npz --no-fp32 --dtype bfloat16 --no-trim
    ONEDNN_PRIMITIVE_CACHE_CAPACITY=0 python scripts/bench_memory.py --calibration /tmp/sd_w8a8.npz --no-fp32
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import diffcache
from diffcache import memory
from diffcache.memory import PeakRSS, format_mib, rss_bytes, trim_heap
from diffcache.quant import QuantCalibration, calibrate
from diffcache.testing import build_pipeline, call_kwargs

logger = logging.getLogger("bench_memory")

PROMPTS = ["a photo of a cat", "a dog in the snow"]  # calibration; generations use call_kwargs's prompt
_ENV = ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "MALLOC_ARENA_MAX", "MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_",
        "OMP_NUM_THREADS")


@dataclass
class Row:
    """One stage: RSS when it ended, the peak during it, and the stage's wall time."""

    stage: str
    rss: int | None
    peak: int | None
    seconds: float
    note: str = ""


def measured(rows: list[Row], stage: str, work: Callable[[], Any], note: Callable[[], str] | None = None) -> Any:
    """Run ``work`` as ``stage``, append its row (and log it); returns what ``work`` returned."""
    start = time.perf_counter()
    with PeakRSS() as peak:
        result = work()
    rows.append(Row(stage, peak.end, peak.bytes, time.perf_counter() - start, note() if note else ""))
    logger.info("%-28s RSS %s MiB, peak %s MiB (%s), %.0f s %s", stage, format_mib(peak.end), format_mib(peak.bytes),
                peak.method, rows[-1].seconds, rows[-1].note)
    return result


def tensor_bytes() -> int:
    """Bytes of the distinct storages of every tensor Python can reach (what the model and its hooks hold)."""
    gc.collect()
    seen: dict[int, int] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # isinstance on deprecated lazy torch objects warns
        for obj in gc.get_objects():
            try:
                if isinstance(obj, torch.Tensor) and obj.device.type == "cpu" and not obj.is_meta:
                    storage = obj.untyped_storage()
                    seen[storage.data_ptr()] = storage.nbytes()
            except (RuntimeError, ReferenceError, NotImplementedError):  # opaque (mkldnn) or dead tensors
                continue
    return sum(seen.values())


def probe_note(enabled: bool) -> Callable[[], str] | None:
    if not enabled:
        return None

    def note() -> str:
        held = tensor_bytes()
        freed = trim_heap()
        return (f"(tensors {held / 2**20:.0f} MiB; malloc_trim gave back "
                f"{'n/a' if freed is None else f'{freed / 2**20:.0f}'} MiB)")
    return note


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--generations", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="the model's dtype for the int8 run (layers outside int8 kernels run in it)")
    parser.add_argument("--calibration", type=Path, help="load this saved calibration, or save it there")
    parser.add_argument("--keep-float-weights", action="store_true")
    parser.add_argument("--no-fp32", action="store_true", help="leave out the fp32 reference generations")
    parser.add_argument("--probe", action="store_true", help="after each stage: live tensor bytes, malloc_trim")
    parser.add_argument("--no-trim", action="store_true", help="accelerate without its heap trim (the old behaviour)")
    args = parser.parse_args()
    if args.no_trim:
        memory.trim_heap = lambda: None  # accelerate imports it from the module at call time
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    logger.info("torch %s, %d thread(s); %s", torch.__version__, torch.get_num_threads(),
                ", ".join(f"{k}={os.environ.get(k, 'unset')}" for k in _ENV))
    rows: list[Row] = []
    rows.append(Row("start", rss_bytes(), rss_bytes(), 0.0))
    note = probe_note(args.probe)
    pipe = measured(rows, "build (fp32)", lambda: build_pipeline("sd", size="large"), note)
    kwargs = call_kwargs("sd", num_inference_steps=args.steps, size="large", seed=1)

    def generate() -> None:
        pipe(**(kwargs | {"generator": torch.Generator("cpu").manual_seed(1)}))

    if not args.no_fp32:
        for index in range(1, args.generations + 1):
            measured(rows, f"fp32 generation {index}", generate, note)
    if args.calibration is not None and args.calibration.exists():
        quant = measured(rows, "load calibration", lambda: QuantCalibration.load(args.calibration))
    else:
        quant = measured(rows, "calibrate W8A8", lambda: calibrate(
            pipe, PROMPTS, "w8a8", num_inference_steps=args.steps, guidance_scale=kwargs["guidance_scale"],
            batch_size=len(PROMPTS), progress=False), note)
        if args.calibration is not None:
            quant.save(args.calibration)
    dtype = getattr(torch, args.dtype)
    if dtype != torch.float32:
        measured(rows, f"to {args.dtype}", lambda: pipe.to(dtype), note)
    measured(rows, "accelerate (int8)", lambda: diffcache.accelerate(
        pipe, "none", quant=quant, keep_float_weights=args.keep_float_weights), note)
    logger.info("%s", diffcache.summary(pipe).quant)
    for index in range(1, args.generations + 1):
        measured(rows, f"int8 generation {index}", generate, note)
    print(table(rows, args))


def table(rows: list[Row], args: argparse.Namespace) -> str:
    """The rows as a Markdown table, and the check: last int8 generation's RSS vs the first's."""
    env = ", ".join(f"{k}={os.environ[k]}" for k in _ENV if k in os.environ)
    lines = [f"SD1.5-size UNet, {args.steps} steps, 256 px, batch 1 + CFG, {torch.get_num_threads()} thread(s), "
             f"int8 model {args.dtype}, accelerate's heap trim {'off' if args.no_trim else 'on'}"
             + (f", {env}" if env else ""), "",
             "| stage | RSS MiB | peak MiB | s |" + (" probe |" if args.probe else ""),
             "|---|---|---|---|" + ("---|" if args.probe else "")]
    lines += [f"| {r.stage} | {format_mib(r.rss)} | {format_mib(r.peak)} | {r.seconds:.0f} |"
              + (f" {r.note} |" if args.probe else "") for r in rows]
    int8 = [r.rss for r in rows if r.stage.startswith("int8 generation") and r.rss is not None]
    if len(int8) > 1:
        lines.append(f"\nint8: RSS after generation {len(int8)} / after generation 1 = {int8[-1] / int8[0]:.3f}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
