"""Side-by-side speed and quality of schedules on one pipeline, in one process.

Runs are alternated (full, method 1, method 2, ..., full, ...) after one warm-up each, and the median of
wall and CPU time is reported, because a shared machine makes single timings unreliable. Two ideal speedups
come from the cost model: the denoiser's MAC reduction turned into an end-to-end bound (Amdahl, with the
measured denoiser share), and the measured latency of the reused modules taken off the full run. Each method's
peak RSS is the process's most resident memory while that method ran (its context entered, every round, warm-up
included; `diffcache.memory.PeakRSS`): one process, so it counts what every method before it left loaded.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from ..adapters import denoiser_of, resolve_adapter
from ..api import accelerated, restore
from ..schedule import Schedule
from ..data import generate
from ..schedules.presets import build_from_tag, parse_tag, resample, tag_of
from .cost import profile_latency, profile_macs
from .intervals import Interval, bootstrap, paired
from ..memory import PeakRSS, format_mib
from .metrics import psnr, psnr_per_image

FULL = "full"


@dataclass
class BenchRow:
    """One method's numbers; speedups are relative to the full pipeline measured in the same process.

    ``macs_speedup`` is the denoiser's MAC reduction; ``ideal_macs`` turns it into an end-to-end bound with the
    denoiser's share of pipeline time (Amdahl); ``ideal_latency`` instead removes the measured time of the
    reused modules, which also counts work without MACs (norms, gates) that reuse steps still do. ``peak_rss``:
    the process's peak resident bytes during this method's runs (None where not measurable).
    """

    method: str
    num_steps: int
    wall_s: float
    cpu_s: float
    speedup: float
    cpu_speedup: float
    macs_speedup: float
    ideal_macs: float
    ideal_latency: float
    psnr_db: float
    images: np.ndarray = field(repr=False, default_factory=lambda: np.zeros(0))
    psnr_images: np.ndarray = field(repr=False, default_factory=lambda: np.zeros(0))
    peak_rss: int | None = None

    @property
    def psnr_interval(self) -> Interval | None:
        """95% bootstrap interval of the mean PSNR over the images (``None`` for fewer than two)."""
        return bootstrap(self.psnr_images) if len(self.psnr_images) >= 2 else None


def psnr_difference(a: BenchRow, b: BenchRow) -> Interval:
    """Paired 95% interval of ``a``'s minus ``b``'s per-image PSNR (the same seeds): "a beats b" needs it above 0."""
    return paired(a.psnr_images, b.psnr_images)


def compare_methods(
    pipe: Any,
    make_kwargs: Callable[[], dict[str, Any]],
    tags: Sequence[str | Schedule],
    repeats: int = 3,
    progress: bool = True,
    others: Mapping[str, Callable[[], AbstractContextManager]] | None = None,
) -> list[BenchRow]:
    """Time ``pipe(**make_kwargs())`` unaccelerated and under each tag (or searched `Schedule`, labelled
    ``"<method> <budget>"``); returns one row per method (full first), with the images of its warm-up call.

    ``others`` adds methods that are not diffcache schedules (e.g. diffusers' own caches): name -> a function
    returning a context manager inside which the pipeline runs that way. Their cost-model columns are NaN.
    ``make_kwargs`` must return fresh arguments with a fixed seed each time (same images for the same method).
    The pipeline must call its denoiser once per step (batched CFG), as the built-in test pipelines do.
    """
    for tag in tags:
        if isinstance(tag, str):
            parse_tag(tag)
    restore(pipe)
    adapter = resolve_adapter(denoiser_of(pipe))
    num_steps = make_kwargs()["num_inference_steps"]
    schedules = {label(t): build_from_tag(t, adapter, num_steps) if isinstance(t, str) else resample(t, num_steps)
                 for t in tags}
    granularities = {s.granularity for s in schedules.values()}
    contexts = {FULL: nullcontext} | {m: (lambda s=s: accelerated(pipe, s)) for m, s in schedules.items()}
    contexts |= dict(others or {})
    methods = list(contexts)
    images: dict[str, np.ndarray] = {}
    wall: dict[str, list[float]] = {m: [] for m in methods}
    cpu: dict[str, list[float]] = {m: [] for m in methods}
    peaks: dict[str, int | None] = dict.fromkeys(methods)
    bar = tqdm(total=(repeats + 1) * len(methods), desc="bench (warm-up round first)", disable=not progress)
    for round_index in range(repeats + 1):
        for method in methods:  # round 0 is the warm-up; methods alternate within every round
            bar.set_postfix_str(f"round {round_index}/{repeats}: {method}")
            with PeakRSS() as peak, contexts[method]():
                w0, c0 = time.perf_counter(), time.process_time()
                out = generate(pipe, make_kwargs())
                w1, c1 = time.perf_counter(), time.process_time()
            if peak.bytes is not None:
                peaks[method] = max(peaks[method] or 0, peak.bytes)
            if round_index == 0:
                images[method] = np.asarray(out)
            else:
                wall[method].append(w1 - w0)
                cpu[method].append(c1 - c0)
            bar.update()
    bar.close()
    restore(pipe)

    # Profiles after the timed rounds, on a warm pipeline; the denoiser's share of time comes from the same
    # profiled call, so timing-hook overhead cancels out.
    macs = {g: profile_macs(pipe, make_kwargs() | {"num_inference_steps": 1}, g) for g in granularities}
    latency, share = {}, {}
    for g in granularities:
        start = time.perf_counter()
        latency[g] = profile_latency(pipe, make_kwargs(), g)
        share[g] = min(1.0, latency[g].total * num_steps / ((time.perf_counter() - start) * 1000))

    full_wall, full_cpu = statistics.median(wall[FULL]), statistics.median(cpu[FULL])
    rows = []
    for method in methods:
        macs_speedup, ideal_macs, ideal_latency = (1.0, 1.0, 1.0) if method == FULL else (math.nan,) * 3
        if method in schedules:
            schedule = schedules[method]
            g = schedule.granularity
            macs_speedup = macs[g].speedup(schedule)
            ideal_macs = _amdahl(share[g], macs_speedup)
            ideal_latency = _amdahl(share[g], latency[g].speedup(schedule))
        w, c = statistics.median(wall[method]), statistics.median(cpu[method])
        rows.append(
            BenchRow(method, num_steps, w, c, full_wall / w, full_cpu / c, macs_speedup, ideal_macs, ideal_latency,
                     psnr(images[method], images[FULL]), images[method],
                     psnr_per_image(images[method], images[FULL]), peaks[method])
        )
    return rows


def label(method: str | Schedule) -> str:
    """A method's name in tables: its tag, or ``"<method> <budget>"`` for a searched schedule."""
    if isinstance(method, str):
        return method
    keys = method.method == "ecad" and method.params.get("key_steps")  # (dp's key_steps is a count)
    branch = method.params.get("branch", 0) if keys else 0
    options = ((",key_steps=1" if keys else "") + (f",branch={branch}" if branch else "")
               + (f",forecast={method.forecast}" if method.forecast else ""))
    budget = method.meta.get("budget", "")
    searched = method.meta.get("search_method")
    if searched is not None and "arena" in method.meta:  # what the search's final round chose, and from where
        return f"{searched} {budget}: {tag_of(method) or method.method + options}".strip()
    return tag_of(method) or f"{method.method}{options} {budget}".strip()


def psnr_cell(row: BenchRow) -> str:
    """Mean PSNR, with its 95% interval over images where there are several (and they differ from the full)."""
    interval = row.psnr_interval
    if interval is None or row.psnr_db >= 100:
        return f"{row.psnr_db:.1f}"
    return f"{row.psnr_db:.1f} [{interval.low:.1f}, {interval.high:.1f}]"


def _amdahl(share: float, speedup: float) -> float:
    """End-to-end speedup when a ``share`` of the time gets ``speedup`` faster."""
    return 1.0 / ((1.0 - share) + share / speedup)


def run_suites(
    suites: dict[str, Sequence[str]], steps: int, repeats: int, progress: bool = True
) -> list[str]:
    """`compare_methods` on the built-in ``size="bench"`` test pipelines; returns one markdown table each."""
    from ..testing import build_pipeline, call_kwargs

    tables = []
    for name, tags in suites.items():
        pipe = build_pipeline(name, size="bench")
        denoiser = denoiser_of(pipe)
        params = sum(p.numel() for p in denoiser.parameters()) / 1e6
        rows = compare_methods(
            pipe, lambda name=name: call_kwargs(name, num_inference_steps=steps, size="bench"), tags, repeats,
            progress=progress,
        )
        title = f"{name}: {type(pipe).__name__} / {type(denoiser).__name__} ({params:.1f}M), batch 1 + CFG"
        tables.append(format_table(title, rows))
    return tables


def format_table(title: str, rows: Sequence[BenchRow]) -> str:
    """A markdown table of ``rows``."""
    lines = [
        f"**{title}**",
        "",
        "| method | steps | median s | speedup | CPU-time speedup | MACs speedup (denoiser) | ideal e2e (MACs) "
        "| of ideal (MACs) | ideal e2e (latency) | of ideal (latency) | PSNR dB vs full | peak RSS MiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.method} | {r.num_steps} | {r.wall_s:.3f} | {r.speedup:.2f}x | {r.cpu_speedup:.2f}x | "
            f"{r.macs_speedup:.2f}x | {r.ideal_macs:.2f}x | {r.speedup / r.ideal_macs:.0%} | "
            f"{r.ideal_latency:.2f}x | {r.speedup / r.ideal_latency:.0%} | {psnr_cell(r)} | {format_mib(r.peak_rss)} |"
        )
    return "\n".join(lines)
