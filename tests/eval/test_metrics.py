"""Metrics on inputs with known answers."""

import numpy as np
import pytest
import torch

from diffcache.errors import MetricUnavailableError
from diffcache.eval import metrics


def images(seed: int, n: int = 16) -> np.ndarray:
    return np.random.RandomState(seed).rand(n, 16, 16, 3).astype(np.float32)


def test_psnr_and_ssim():
    a = images(0)
    assert metrics.psnr(a, a) == metrics.PSNR_CAP_DB
    assert metrics.ssim(a, a) == pytest.approx(1.0)
    noisy = np.clip(a + 0.01 * np.random.RandomState(1).randn(*a.shape), 0, 1)
    # Gaussian noise of std 0.01 (a bit less after clipping): PSNR close to 40 dB.
    assert 39.5 < metrics.psnr(noisy, a) < 41.5
    assert 0.9 < metrics.ssim(noisy, a) < 1.0
    with pytest.raises(ValueError, match="differ in shape"):
        metrics.psnr(a[:2], a[:3])


def test_fid_with_custom_features():
    torch.manual_seed(0)
    extractor = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 16 * 16, 8))
    a, b = images(0, 64), images(1, 64)
    shifted = np.clip(a * 0.5 + 0.5, 0, 1)
    same = metrics.fid(a, a, extractor)
    assert abs(same) < 1e-6
    assert metrics.fid(b, a, extractor) < metrics.fid(shifted, a, extractor)  # same distribution vs shifted


def test_accuracy_and_input_formats():
    classifier = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.LazyLinear(2))
    batch = torch.zeros(4, 1, 4, 4)
    classifier(batch)
    with torch.no_grad():
        classifier[1].weight.zero_()
        classifier[1].bias.copy_(torch.tensor([0.0, 1.0]))  # always predicts class 1
    assert metrics.accuracy(batch, [1, 1, 0, 1], classifier) == 0.75
    assert metrics.as_tensor(np.zeros((2, 5, 6, 1))).shape == (2, 1, 5, 6)


def test_missing_models_name_the_option(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(MetricUnavailableError, match="--clip-model"):
        metrics.clip_score(images(0, 2), ["a", "b"], model=str(tmp_path / "no-clip"))


def test_frechet_distance_of_shifted_gaussians_is_the_squared_shift():
    from diffcache.eval.metrics import frechet_distance

    gen = torch.Generator().manual_seed(0)
    a = torch.randn(4000, 3, generator=gen, dtype=torch.float64)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)
    shifted = a + torch.tensor([3.0, 0.0, 4.0], dtype=torch.float64)
    assert frechet_distance(a, shifted) == pytest.approx(25.0, rel=1e-9)
    spread = a * torch.tensor([1.0, 1.0, 3.0], dtype=torch.float64)  # variance 1 -> 9 on one axis: (3-1)^2 = 4
    assert frechet_distance(a, spread) == pytest.approx(4.0, rel=0.05)


def test_video_psnr_is_one_value_per_clip_over_all_its_frames():
    rng = np.random.default_rng(0)
    clips = rng.random((3, 4, 8, 8, 1)).astype(np.float32)
    noisy = clips.copy()
    noisy[1, 2] += 0.1  # one frame of one clip differs
    values = metrics.psnr_per_image(np.clip(noisy, 0, 1), clips)
    mse = np.mean((np.clip(noisy[1], 0, 1) - clips[1]) ** 2)
    assert values.shape == (3,)
    assert values[0] == values[2] == metrics.PSNR_CAP_DB
    assert values[1] == pytest.approx(10 * np.log10(1 / mse), abs=1e-3)
