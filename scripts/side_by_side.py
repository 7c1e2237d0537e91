"""Timing several ways of running a generation in one process: warm-up first (compile included), then the
ways alternated round by round, median wall and CPU time (a busy period on a shared machine hits all of them), and
each way's peak RSS: the process's most resident memory during its calls, warm-ups included
(`diffcache.memory.PeakRSS`; one process, so it includes whatever every way keeps loaded)."""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from diffcache.memory import PeakRSS


@dataclass
class Timed:
    images: np.ndarray  # from the last warm-up call
    warmup_s: float  # all warm-up calls together (compilation included)
    wall_s: float  # median
    cpu_s: float  # median
    peak_rss: int | None = None  # bytes, None where not measurable


def time_side_by_side(runs: dict[str, Callable[[], np.ndarray]], repeats: int, warmups: int = 1,
                      sync: Callable[[], None] = lambda: None) -> dict[str, Timed]:
    """``runs``: label -> a call that generates and returns the images (the same seed every time). ``sync`` waits
    for an accelerator's queued work (e.g. ``torch.cuda.synchronize``)."""
    images, warmup = {}, {}
    peaks: dict[str, int | None] = dict.fromkeys(runs)

    def note_peak(label: str, peak: PeakRSS) -> None:
        if peak.bytes is not None:
            peaks[label] = max(peaks[label] or 0, peak.bytes)

    for label, run in runs.items():
        start = time.perf_counter()
        with PeakRSS() as peak:
            for _ in range(warmups):
                images[label] = np.asarray(run())
            sync()
        note_peak(label, peak)
        warmup[label] = time.perf_counter() - start
        print(f"warm-up {label}: {warmup[label]:.1f} s", file=sys.stderr, flush=True)
    wall: dict[str, list[float]] = {label: [] for label in runs}
    cpu: dict[str, list[float]] = {label: [] for label in runs}
    for _ in range(repeats):
        for label, run in runs.items():
            with PeakRSS() as peak:
                w0, c0 = time.perf_counter(), time.process_time()
                run()
                sync()
                wall[label].append(time.perf_counter() - w0)
                cpu[label].append(time.process_time() - c0)
            note_peak(label, peak)
    return {label: Timed(images[label], warmup[label], statistics.median(wall[label]), statistics.median(cpu[label]),
                         peaks[label]) for label in runs}
