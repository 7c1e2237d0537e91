"""Tests for the tiny offline pipelines in ``diffcache.testing.pipelines``."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from torch import nn

from diffcache.testing import (
    BENCH_PIPELINE_NAMES,
    PIPELINE_NAMES,
    build_pipeline,
    call_kwargs,
    image_size,
)

TEXT_PIPELINES = ("sd", "sdxl", "pixart", "sd3", "flux")


def run(pipe, name: str, **overrides) -> np.ndarray:
    with torch.no_grad():
        return pipe(**call_kwargs(name, **overrides)).images


def baseline(name: str) -> np.ndarray:
    """4-step output of pipeline ``name`` built with seed 0. Cached per torch thread count: CPU
    conv/matmul results are bit-identical only for a fixed number of threads."""
    return _baseline(name, torch.get_num_threads())


@functools.cache
def _baseline(name: str, num_threads: int) -> np.ndarray:
    return run(build_pipeline(name, seed=0), name)


def middle_blocks(pipe) -> dict[str, nn.Module]:
    """The 'deep' blocks of the denoiser: UNet mid block or middle transformer block(s)."""
    if hasattr(pipe, "unet"):
        return {"mid_block": pipe.unet.mid_block}
    tr = pipe.transformer
    lists = ["transformer_blocks", "single_transformer_blocks"]
    return {k: getattr(tr, k)[len(getattr(tr, k)) // 2] for k in lists if hasattr(tr, k)}


def test_names() -> None:
    assert PIPELINE_NAMES == ("sd", "sdxl", "dit", "pixart", "sd3", "flux", "unet2d")
    assert set(BENCH_PIPELINE_NAMES) <= set(PIPELINE_NAMES)


@pytest.mark.parametrize("name", PIPELINE_NAMES)
def test_output_shape_and_finite(name: str) -> None:
    images = baseline(name)
    px = image_size(name)
    assert images.shape == (1, px, px, 3)
    assert np.isfinite(images).all()
    assert images.min() >= 0.0 and images.max() <= 1.0
    assert ((images > 0) & (images < 1)).mean() > 0.5, "output mostly saturated"


@pytest.mark.parametrize("name", PIPELINE_NAMES)
def test_pipeline_properties(name: str) -> None:
    pipe = build_pipeline(name)
    assert pipe.device.type == "cpu"
    modules = [m for m in pipe.components.values() if isinstance(m, nn.Module)]
    assert modules
    for module in modules:
        assert not module.training
        assert all(p.dtype == torch.float32 for p in module.parameters())
        # no linear/conv layer is left zero-initialised (every block must influence the output)
        for sub in module.modules():
            if isinstance(sub, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
                assert sub.weight.any()
    assert pipe._progress_bar_config.get("disable") is True


@pytest.mark.parametrize("name", PIPELINE_NAMES)
def test_same_seed_bit_identical(name: str) -> None:
    assert np.array_equal(run(build_pipeline(name, seed=0), name), baseline(name))


@pytest.mark.parametrize("name", PIPELINE_NAMES)
def test_different_seeds_differ(name: str) -> None:
    assert np.abs(run(build_pipeline(name, seed=1), name) - baseline(name)).max() > 1e-2
    assert np.abs(run(build_pipeline(name, seed=0), name, seed=1) - baseline(name)).max() > 1e-2


def test_build_leaves_global_rng_untouched() -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_pipeline("dit")
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("name", PIPELINE_NAMES)
def test_middle_block_matters(name: str) -> None:
    for block_name in middle_blocks(build_pipeline(name)):
        pipe = build_pipeline(name)
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in middle_blocks(pipe)[block_name].parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=gen))
        diff = np.abs(run(pipe, name) - baseline(name)).max()
        assert diff > 1e-2, f"{name}: perturbing {block_name} changed the output by only {diff}"


@pytest.mark.parametrize("name", [n for n in PIPELINE_NAMES if n not in ("flux", "unet2d")])
def test_cfg_active(name: str) -> None:
    assert call_kwargs(name)["guidance_scale"] > 1
    with torch.no_grad():
        no_cfg = build_pipeline(name)(**(call_kwargs(name) | {"guidance_scale": 1.0})).images
    assert np.abs(no_cfg - baseline(name)).max() > 1e-2


@pytest.mark.parametrize("name", PIPELINE_NAMES)
def test_batch_size_two(name: str) -> None:
    images = run(build_pipeline(name), name, batch_size=2, num_inference_steps=2)
    px = image_size(name)
    assert images.shape == (2, px, px, 3)
    assert np.isfinite(images).all()
    assert np.abs(images[0] - images[1]).max() > 1e-2


@pytest.mark.parametrize("name", TEXT_PIPELINES)
def test_tokenizers_produce_distinct_ids(name: str) -> None:
    pipe = build_pipeline(name)
    keys = [k for k in pipe.components if k.startswith("tokenizer")]
    pairs = [(k, pipe.components[k], pipe.components[k.replace("tokenizer", "text_encoder")]) for k in keys]
    assert pairs
    for key, tok, encoder in pairs:
        ids = tok("a red car", padding="max_length", max_length=16, truncation=True).input_ids
        special = {tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id} - {None}
        content = [i for i in ids if i not in special]
        assert len(set(content)) >= 3, f"{name}.{key}: {ids}"
        assert tok.pad_token_id is not None and ids[-1] == tok.pad_token_id
        assert encoder.config.vocab_size >= len(tok)
        assert tok.decode(content).replace(" ", "") == "aredcar"


@pytest.mark.parametrize("name", BENCH_PIPELINE_NAMES)
def test_bench_size(name: str) -> None:
    pipe = build_pipeline(name, size="bench")
    images = run(pipe, name, num_inference_steps=1, size="bench")
    px = image_size(name, "bench")
    assert px > image_size(name)
    assert images.shape == (1, px, px, 3) and np.isfinite(images).all()


def test_unknown_name_and_size() -> None:
    with pytest.raises(ValueError, match="sdxl"):
        build_pipeline("nope")
    with pytest.raises(ValueError, match="sdxl"):
        call_kwargs("nope")
    with pytest.raises(ValueError, match="size"):
        build_pipeline("sd", size="huge")
    with pytest.raises(ValueError, match="bench"):
        build_pipeline("flux", size="bench")


def test_call_kwargs() -> None:
    kw = call_kwargs("sd", num_inference_steps=3, seed=5, batch_size=3)
    assert kw["num_inference_steps"] == 3 and kw["output_type"] == "np"
    assert len(kw["prompt"]) == 3 and len(set(kw["prompt"])) == 3
    assert torch.equal(kw["generator"].get_state(), torch.Generator().manual_seed(5).get_state())
    labels = call_kwargs("dit", batch_size=2)["class_labels"]
    assert len(labels) == 2 and len(set(labels)) == 2 and all(0 <= c < 1000 for c in labels)
    assert call_kwargs("unet2d", batch_size=2)["batch_size"] == 2
    assert call_kwargs("flux")["height"] % 16 == 0
