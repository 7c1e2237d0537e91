"""The demo end to end on a few images (slow: it searches and calibrates both models)."""

import pytest

from diffcache.eval.demo import run_demo


@pytest.mark.slow
def test_demo_with_quantization(tmp_path):
    report = run_demo(tmp_path, per_class=1, repeats=1, progress=False, quant="w8a8")
    for expected in ("**digits-dit**", "**digits-unet**", "| w8a8 |", "| w8a8 + fora:interval=3 |",
                     "| w8a8 + deepcache:interval=3 |", "dp latency:2.5x: "):
        assert expected in report
    # The front check on the real run: each model's searched row is on the measured front (no preset at least
    # as fast is better by a paired interval), issue #18 item 5.
    assert report.count("on the measured front") == 2 and "off the measured front" not in report
    assert (tmp_path / "grid.png").stat().st_size > 0 and (tmp_path / "pareto.png").stat().st_size > 0
