"""`compare_methods` times presets and searched schedules side by side on one pipeline."""

from __future__ import annotations

import contextlib
import math

import pytest

import diffcache
from diffcache.eval.bench import FULL, compare_methods, format_table
from diffcache.testing import build_pipeline, call_kwargs


def test_compare_methods_with_a_searched_schedule():
    pipe = build_pipeline("dit")
    pipe.set_progress_bar_config(disable=True)
    searched = diffcache.search(pipe, [207, 360], "dp", "recompute:0.5", num_inference_steps=6, guidance_scale=4.0,
                                batch_size=2, progress=False, presets=False)
    rows = compare_methods(pipe, lambda: call_kwargs("dit", num_inference_steps=6), ["fora:interval=2", searched],
                           repeats=1, progress=False, others={"plain again": contextlib.nullcontext})
    assert [r.method for r in rows] == [FULL, "fora:interval=2", "dp recompute:2x", "plain again"]
    other = rows.pop()
    assert other.psnr_db == 100.0 and math.isnan(other.macs_speedup)  # timed like the rest, no cost model
    assert rows[0].psnr_db == 100.0 and rows[0].macs_speedup == 1.0
    for row in rows[1:]:
        assert 15 < row.psnr_db < 100 and row.macs_speedup > 1.2 and row.speedup > 0
    assert rows[2].macs_speedup == pytest.approx(searched.meta["predicted_speedup"], rel=0.35)
    assert "dp recompute:2x" in format_table("t", rows)
    # The pipeline is left unaccelerated.
    with pytest.raises(diffcache.DiffcacheError, match="not accelerated"):
        diffcache.summary(pipe)
