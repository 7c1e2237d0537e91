"""What the executor did: per (step, unit) compute/reuse counts and cache memory, for `diffcache.summary`."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..schedule import Schedule


@dataclass
class CacheSummary:
    """Counters of the most recent generation of an accelerated pipeline.

    Attributes:
        computed, reused: ``(num_steps, num_units)`` counts of (component x CFG-branch) slots that ran / were
            served from the cache at each step.
        planned_cache_usage_ratio: the schedule's CUR; ``cache_usage_ratio`` is what really happened (lower
            when a cache read found nothing, e.g. after a batch-size change).
        cache_bytes, peak_cache_bytes: bytes of cached tensors held now / at most since `accelerate`.
        schedule: the plan of the last generation (resampled to its step count).
        quant: which layers run quantized and how (real int8 or simulated), if quantized.
        memory: what memory slicing cuts, if sliced; then ``peak_rss_bytes`` is the process's peak resident memory
            during the last generation's denoiser calls and ``start_rss_bytes`` its RSS when that generation began
            (after handing free heap memory back, so the difference is what the calls needed).
    """

    method: str
    tag: str | None
    units: list[str]
    components: list[str]
    num_steps: int
    computed: np.ndarray
    reused: np.ndarray
    denoiser_calls: int
    generations: int
    planned_cache_usage_ratio: float
    cache_bytes: int
    peak_cache_bytes: int
    schedule: Schedule
    quant: str | None = None
    memory: str | None = None
    start_rss_bytes: int | None = None
    peak_rss_bytes: int | None = None

    @property
    def cache_usage_ratio(self) -> float:
        total = self.computed.sum() + self.reused.sum()
        return float(self.reused.sum() / total) if total else 0.0

    @property
    def hits(self) -> int:
        return int(self.reused.sum())

    def __str__(self) -> str:
        name = self.tag or self.method
        lines = [
            f"diffcache: {name}  ({self.num_steps} steps, {len(self.units)} units x {self.components}, "
            f"{self.generations} generations, {self.denoiser_calls} denoiser calls in the last)",
            f"cache usage: planned {self.planned_cache_usage_ratio:.1%}, actual {self.cache_usage_ratio:.1%}; "
            f"cache memory now {_mib(self.cache_bytes)}, peak {_mib(self.peak_cache_bytes)}",
        ]
        if self.quant:
            lines.append(f"quantization: {self.quant}")
        if self.memory:
            peak = "not measured (no /proc here)" if self.peak_rss_bytes is None else (
                f"peak RSS {_mib(self.peak_rss_bytes)} during the denoiser calls, "
                f"{_mib(self.peak_rss_bytes - (self.start_rss_bytes or 0))} above the generation's start")
            lines.append(f"memory: {self.memory}; {peak}")
        width = max(len(u) for u in self.units)
        lines.append(f"{'unit':<{width}}  computed  reused  per step (C computed, r reused, . partly, - not run)")
        for u, unit in enumerate(self.units):
            marks = "".join(_mark(c, r) for c, r in zip(self.computed[:, u], self.reused[:, u]))
            computed, reused = int(self.computed[:, u].sum()), int(self.reused[:, u].sum())
            lines.append(f"{unit:<{width}}  {computed:>8}  {reused:>6}  {marks}")
        return "\n".join(lines)


def _mark(computed: int, reused: int) -> str:
    if computed and reused:
        return "."
    return "C" if computed else ("r" if reused else "-")


def _mib(num_bytes: int) -> str:
    return f"{num_bytes / 2**20:.2f} MiB"


class StatsRecorder:
    """Counts compute/reuse events of the current generation."""

    def __init__(self, num_units: int) -> None:
        self.num_units = num_units
        self.computed = np.zeros((0, num_units), dtype=np.int64)
        self.reused = np.zeros((0, num_units), dtype=np.int64)
        self.generations = 0
        self.calls = 0
        self.start_rss: int | None = None  # when memory is measured: RSS at the generation's first call
        self.peak_rss: int | None = None  # and the most during its denoiser calls

    def start(self, num_steps: int) -> None:
        self.computed = np.zeros((num_steps, self.num_units), dtype=np.int64)
        self.reused = np.zeros((num_steps, self.num_units), dtype=np.int64)
        self.generations += 1
        self.calls = 0
        self.start_rss = self.peak_rss = None

    def resize(self, num_steps: int) -> None:
        """Same generation, another step count (counts of the steps so far are kept)."""
        for name in ("computed", "reused"):
            old = getattr(self, name)
            new = np.zeros((num_steps, self.num_units), dtype=np.int64)
            keep = min(num_steps, len(old))
            new[:keep] = old[:keep]
            setattr(self, name, new)

    def add(self, step: int, unit: int | slice, computed: int, reused: int) -> None:
        """Count ``computed`` and ``reused`` slots of one call at ``(step, unit)`` (a unit index or a slice)."""
        if step < len(self.computed):
            self.computed[step, unit] += computed
            self.reused[step, unit] += reused
