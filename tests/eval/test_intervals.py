"""Bootstrap intervals: they cover the true mean at about the nominal rate, and pairing removes shared noise."""

from __future__ import annotations

import numpy as np
import pytest

from diffcache.eval.intervals import bootstrap, paired


def test_bootstrap_covers_the_true_mean_at_the_nominal_rate():
    rng = np.random.default_rng(0)
    trials, covered = 300, 0
    for trial in range(trials):
        sample = rng.gamma(2.0, 2.0, size=60)  # skewed, true mean 4.0
        interval = bootstrap(sample, resamples=1000, seed=trial)
        covered += interval.low <= 4.0 <= interval.high
    # A 95% interval; the percentile bootstrap runs a little narrow at n = 60 on skewed data.
    assert 0.90 <= covered / trials <= 0.985, covered / trials


def test_paired_interval_sees_a_small_shift_that_independent_intervals_miss():
    rng = np.random.default_rng(1)
    images = rng.normal(30, 4, size=100)  # per-image PSNR varies far more than the methods differ
    a, b = images + 0.3 + rng.normal(0, 0.2, 100), images + rng.normal(0, 0.2, 100)
    ia, ib = bootstrap(a), bootstrap(b)
    assert ia.low < ib.high and ib.low < ia.high  # independent intervals overlap
    diff = paired(a, b)
    assert diff.excludes_zero() and 0.2 < diff.mean < 0.4
    assert not paired(b + 0.0, b).excludes_zero()


def test_bad_input():
    with pytest.raises(ValueError, match="at least two"):
        bootstrap([1.0])
    with pytest.raises(ValueError, match="finite"):
        bootstrap([1.0, np.inf])
    with pytest.raises(ValueError, match="same items"):
        paired([1.0, 2.0], [1.0, 2.0, 3.0])


def test_demo_front_check_names_a_dominating_preset():
    from diffcache.eval.bench import BenchRow
    from diffcache.eval.demo import front_check

    rng = np.random.default_rng(2)
    base = rng.normal(40, 3, 50)

    def row(name, speedup, shift):
        return BenchRow(name, 25, 1.0, 1.0, speedup, speedup, 2.0, 2.0, 2.0, float((base + shift).mean()),
                        psnr_images=base + shift + rng.normal(0, 0.1, 50))

    searched = row("dp 2x", 2.0, 0.0)
    assert "on the measured front" in front_check(searched, [row("slower", 1.5, 5.0), row("worse", 2.1, -1.0)])
    line = front_check(searched, [row("uniform:interval=2", 1.99, 1.0)])  # within 3% as fast, 1 dB better
    assert "off the measured front: uniform:interval=2" in line and "-1.0" in line


def test_front_plot_writes_a_png(tmp_path):
    from diffcache.eval.plots import front_plot

    points = [("uniform:interval=2", 1.8, 45.6, 44.9, 46.4, False), ("dp 2x", 2.4, 47.6, 46.7, 48.3, True)]
    front_plot({"digits-dit": points, "digits-unet": points[:1]}, tmp_path / "front.png")
    assert (tmp_path / "front.png").stat().st_size > 5000


def test_measured_front_keeps_only_non_dominated_points():
    from diffcache.eval.plots import measured_front

    points = [(1.5, 50.0), (2.0, 48.0), (1.9, 47.0), (2.5, 44.0), (2.4, 44.5), (3.0, 40.0), (1.4, 49.0)]
    assert measured_front(points) == [0, 1, 4, 3, 5]  # (1.9, 47) and (1.4, 49) are dominated


def test_image_grid_has_column_headers_and_uncut_row_labels(tmp_path):
    from PIL import Image, ImageDraw, ImageFont

    from diffcache.eval.plots import image_grid

    name = "digits-dit uniform:interval=3,warmup=2,forecast=1"
    images = np.zeros((3, 8, 8, 3))
    image_grid({name: images, "full": images}, tmp_path / "g.png", scale=2, columns=["0", "1", "2"])
    grid = Image.open(tmp_path / "g.png")
    text = ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength(name, font=ImageFont.load_default(size=14))
    assert grid.width >= text + 3 * 16 and grid.height == 24 + 2 * 18  # header row + two rows of tiles


def test_clip_gif_and_strip_animate_the_grid(tmp_path):
    from PIL import Image

    from diffcache.eval.plots import clip_gif, clip_strip

    clips = np.zeros((3, 4, 8, 8, 1))
    for f in range(4):
        clips[:, f, :, f * 2:f * 2 + 2] = 1.0  # a bar moving right
    clip_gif({"full": clips, "cached": clips[::-1]}, tmp_path / "c.gif", scale=2, columns=["a", "b", "c"])
    gif = Image.open(tmp_path / "c.gif")
    assert gif.n_frames == 4
    frames = []
    for f in range(4):
        gif.seek(f)
        frames.append(np.asarray(gif.convert("L"), dtype=np.int16))
    assert all(np.abs(a - b).sum() > 0 for a, b in zip(frames, frames[1:]))  # every frame differs: it moves
    clip_strip({"full": clips}, tmp_path / "s.png", scale=2)
    strip = Image.open(tmp_path / "s.png")
    assert strip.width > 4 * 16 and strip.height >= 16
