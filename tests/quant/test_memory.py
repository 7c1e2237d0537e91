"""Resident memory: the peak-RSS helper, and (slow) that int8 generations of the SD1.5-size UNet do not grow RSS."""

from __future__ import annotations

import sys
import time

import pytest
import torch

from diffcache import memory
from diffcache.memory import PeakRSS, format_mib, rss_bytes

MIB = 2**20
linux = pytest.mark.skipif(sys.platform != "linux", reason="RSS is read from /proc")


def _touched(mib: int) -> torch.Tensor:
    return torch.ones(mib * MIB, dtype=torch.uint8)  # ones, not empty: pages count once written


@linux
def test_rss_follows_an_allocation():
    before = rss_bytes()
    block = _touched(256)
    during = rss_bytes()
    del block
    after = rss_bytes()
    assert 250 * MIB <= during - before <= 300 * MIB
    assert during - after >= 250 * MIB  # a large block is unmapped when freed


@linux
@pytest.mark.parametrize("method", ["hwm", "sampled"])
def test_peak_sees_a_spike_that_is_gone_at_the_end(method, monkeypatch):
    if method == "sampled":
        monkeypatch.setattr(memory, "_reset_high_water_mark", lambda: False)
    with PeakRSS(interval=0.002) as peak:
        block = _touched(200)
        time.sleep(0.05)  # long enough for the sampler
        del block
    if method == "hwm" and peak.method != "hwm":
        pytest.skip("this kernel refuses to reset VmHWM")
    assert peak.method == method
    assert peak.bytes - peak.start >= 195 * MIB
    assert peak.end - peak.start <= 20 * MIB
    assert abs(peak.mib - peak.bytes / MIB) < 1e-9


@linux
def test_a_nested_block_keeps_the_outer_peak():
    with PeakRSS() as outer:
        block = _touched(200)
        del block
        with PeakRSS() as inner:  # resets the high-water mark the outer block relies on
            small = _touched(20)
            del small
    assert inner.bytes - inner.start < 100 * MIB
    assert outer.bytes - outer.start >= 195 * MIB


def test_without_proc_nothing_is_measured(monkeypatch):
    monkeypatch.setattr(memory, "_STATUS", "/nonexistent/status")
    assert rss_bytes() is None
    with PeakRSS() as peak:
        pass
    assert (peak.bytes, peak.mib, peak.method) == (None, None, "unavailable")
    assert format_mib(peak.bytes) == "n/a"
    assert format_mib(3 * MIB) == "3"


def test_trim_heap_returns_freed_small_blocks():
    freed = memory.trim_heap()
    if freed is None:
        pytest.skip("no malloc_trim here (not glibc)")
    # Blocks under glibc's mmap threshold (128 KiB at least) come from its heap; freed, their pages stay resident.
    blocks = [torch.ones(64 * 1024, dtype=torch.uint8) for _ in range(3200)]  # 200 MiB
    del blocks[:-1]  # the last one pins the heap's top, so only a trim (not free's own top trim) gives it back
    assert memory.trim_heap() >= 100 * MIB


@pytest.mark.slow
@linux
def test_sd15_size_int8_generations_do_not_grow_rss():
    """SD1.5-size UNet (860M), W8A8 on oneDNN with the float weights released: RSS after 3 generations within 5%
    of after 1, and the released float weights really leave the process (accelerate trims the heap)."""
    import diffcache
    from diffcache.quant import QuantConfig, calibrate
    from diffcache.testing import build_pipeline, call_kwargs

    if not diffcache.kernels.onednn_available():
        pytest.skip("no oneDNN int8 kernels in this torch build")
    steps, threads = 4, torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        pipe = build_pipeline("sd", size="large")
        kwargs = call_kwargs("sd", num_inference_steps=steps, size="large", seed=1)
        # min-max weight ranges and no AdaRound: the same kernels and memory, minutes less than the default search
        config = QuantConfig(weight_range="minmax", time_reconstruction=0)
        quant = calibrate(pipe, ["a photo of a cat"], config, num_inference_steps=steps,
                          guidance_scale=kwargs["guidance_scale"], batch_size=1, progress=False)
        built = rss_bytes()
        float_bytes = sum(p.numel() * p.element_size() for p in pipe.unet.parameters())
        diffcache.accelerate(pipe, "none", quant=quant, keep_float_weights=False)
        accelerated = rss_bytes()
        after = []
        for _ in range(3):
            pipe(**(kwargs | {"generator": torch.Generator("cpu").manual_seed(1)}))
            after.append(rss_bytes())
    finally:
        torch.set_num_threads(threads)
    print(f"RSS MiB: calibrated {built / MIB:.0f}, accelerated {accelerated / MIB:.0f}, "
          f"generations {', '.join(f'{a / MIB:.0f}' for a in after)}")
    assert after[2] <= 1.05 * after[0]
    assert built - accelerated >= 0.5 * float_bytes  # without the trim only ~15% came back
