"""Resident memory of this process: the current RSS, and the peak RSS during a block (`PeakRSS`).

On Linux the peak is exact: the kernel's high-water mark (``VmHWM``) is reset when the block starts (writing ``5``
to ``/proc/self/clear_refs``) and read when it ends, so a spike between two samples is not missed. Where that reset
is refused (old kernels, some sandboxes) a thread samples ``VmRSS`` instead, and ``PeakRSS.method`` says so.
Elsewhere neither number exists without a dependency: `rss_bytes` and the peak are ``None`` (tables print "n/a").

`trim_heap` hands the C allocator's free memory back to the system (glibc's ``malloc_trim``). torch's CPU tensors
come from ``malloc``; glibc serves blocks under its mmap threshold (which rises to 32 MiB once a large block is
freed) from its heap, and memory freed in the middle of the heap stays resident until trimmed. That, not live
tensors nor oneDNN's caches, is what kept the SD1.5-size UNet's process gigabytes above its weights after a
calibration and ``accelerate(quant=..., keep_float_weights=False)`` (README, "Memory").
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import sys
import threading
from types import TracebackType

logger = logging.getLogger(__name__)

_STATUS = "/proc/self/status"
_CLEAR_REFS = "/proc/self/clear_refs"
_active: list[PeakRSS] = []  # open blocks, outermost first: a nested reset must not lose an outer block's peak


def _status_kib(field: str) -> int | None:
    """A ``kB`` field of /proc/self/status (``VmRSS``, ``VmHWM``), or None off Linux."""
    try:
        with open(_STATUS, encoding="ascii") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def rss_bytes() -> int | None:
    """This process's resident set size now, in bytes (None where /proc is missing, e.g. macOS, Windows)."""
    kib = _status_kib("VmRSS")
    return None if kib is None else kib * 1024


def _reset_high_water_mark() -> bool:
    try:
        with open(_CLEAR_REFS, "w", encoding="ascii") as refs:
            refs.write("5")
        return True
    except OSError:
        return False


class PeakRSS:
    """``with PeakRSS() as peak: ...`` then ``peak.bytes``: the most resident memory the process held during the
    block (``None`` where it cannot be measured); ``peak.end`` is the RSS when the block ended, ``peak.start``
    when it began. ``method`` is ``"hwm"`` (kernel high-water mark, exact), ``"sampled"`` (``VmRSS`` every
    ``interval`` seconds: a shorter spike can be missed) or ``"unavailable"``."""

    def __init__(self, interval: float = 0.005) -> None:
        self.interval = interval
        self.start: int | None = None
        self.end: int | None = None
        self.bytes: int | None = None
        self.method = "unavailable"
        self._seen = 0  # KiB: the high-water mark before a nested block reset it, or the sampler's maximum
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> PeakRSS:
        self.start = rss_bytes()
        if self.start is None:
            if sys.platform != "linux":
                logger.debug("peak RSS: no /proc on %s, not measured", sys.platform)
            return self
        hwm = _status_kib("VmHWM") or 0
        for outer in _active:  # what the reset below forgets, the outer blocks keep
            outer._seen = max(outer._seen, hwm)
        if _reset_high_water_mark():
            self.method = "hwm"
        else:
            self.method = "sampled"
            self._thread = threading.Thread(target=self._sample, name="PeakRSS", daemon=True)
            self._thread.start()
        self._seen = self.start // 1024
        _active.append(self)
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self._seen = max(self._seen, _status_kib("VmRSS") or 0)

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        if self.method == "unavailable":
            return
        _active.remove(self)
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
        self.end = rss_bytes()
        last = (_status_kib("VmHWM") if self.method == "hwm" else None) or 0
        self.bytes = max(self._seen, last, (self.end or 0) // 1024) * 1024

    @property
    def mib(self) -> float | None:
        """The peak in MiB (None where not measured)."""
        return None if self.bytes is None else self.bytes / 2**20


@functools.cache
def _libc_trim():
    """glibc's ``malloc_trim``, or None (musl, macOS, Windows: no such call)."""
    name = ctypes.util.find_library("c") if sys.platform == "linux" else None
    if name is None:
        return None
    try:
        trim = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


def trim_heap() -> int | None:
    """Give the allocator's free memory back to the system (glibc ``malloc_trim(0)``: free pages anywhere in its
    heaps, not only at the top); returns the bytes RSS fell by, or None where there is no such call. Costs
    milliseconds to a few tenths of a second (it walks the free lists); live tensors are untouched."""
    trim = _libc_trim()
    if trim is None:
        return None
    before = rss_bytes() or 0
    trim(0)
    freed = max(0, before - (rss_bytes() or 0))
    logger.debug("malloc_trim: RSS %.0f MiB lower", freed / 2**20)
    return freed


def format_mib(value: int | None) -> str:
    """Bytes as a table cell in MiB, ``"n/a"`` where not measured."""
    return "n/a" if value is None else f"{value / 2**20:.0f}"


__all__ = ["PeakRSS", "format_mib", "rss_bytes", "trim_heap"]
