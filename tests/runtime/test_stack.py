"""Whole-step block caching of transformers: the stack's residual is cached once and added once."""

from __future__ import annotations

import numpy as np
import pytest

import diffcache
from diffcache.runtime import Executor
from diffcache.runtime.attach import find_attachment
from diffcache.runtime.transformer import STACK, TransformerRuntime
from diffcache.testing import build_pipeline

from ..conftest import run


def per_block(monkeypatch) -> None:
    """Run plans block by block, as if the stack could not be fused."""
    use_plan = TransformerRuntime.use_plan

    def without_fusing(self, plan):
        needed = use_plan(self, plan)
        self.fuse_blocks = False
        return needed

    monkeypatch.setattr(TransformerRuntime, "use_plan", without_fusing)


def executor(pipe) -> Executor:
    return find_attachment(pipe.transformer).executor


@pytest.mark.parametrize("name", ["dit", "sd3"])  # one stream; two streams (joint blocks), the last without context
@pytest.mark.parametrize("tag", ["uniform:interval=3", "uniform:interval=3,warmup=2,forecast=1"])
def test_whole_step_reuse_caches_the_stack_once(name, tag, monkeypatch):
    pipe = build_pipeline(name)
    diffcache.accelerate(pipe, tag)
    fused = run(pipe, name, steps=7)
    ex = executor(pipe)
    assert ex.family.fuse_blocks and ex.family.chain_checked
    fused_peak = ex.peak_cache_bytes
    diffcache.accelerate(pipe, tag)
    with monkeypatch.context() as patch:
        per_block(patch)
        blockwise = run(pipe, name, steps=7)
        assert not executor(pipe).family.fuse_blocks
        blockwise_peak = executor(pipe).peak_cache_bytes
    # Adding the stack's residual once is adding each block's, up to float rounding.
    np.testing.assert_allclose(fused, blockwise, atol=2e-5)
    assert not np.array_equal(fused, run(pipe, name, steps=7, guidance_scale=1.5))  # the check can fail
    units = len(pipe.transformer.transformer_blocks)
    assert 0 < fused_peak * (units - 1) < blockwise_peak  # one residual (per stream) instead of one per block


def test_stack_is_what_the_store_holds_and_a_new_batch_size_recomputes():
    pipe = build_pipeline("dit")
    diffcache.accelerate(pipe, "uniform:interval=2")
    stores = []
    ex = executor(pipe)
    end_call = ex.end_call

    def spy():
        end_call()
        stores.append(sorted(map(str, ex.store.values)))

    ex.end_call = spy
    run(pipe, "dit", steps=4)
    assert stores and all(keys == [str(STACK)] for keys in stores)
    # Another batch size after that generation: nothing stale is reused (same images as a fresh pipeline).
    two = run(pipe, "dit", steps=4, class_labels=[1, 2])
    fresh = build_pipeline("dit")
    with diffcache.accelerated(fresh, "uniform:interval=2"):
        assert np.array_equal(run(fresh, "dit", steps=4, class_labels=[1, 2]), two)


def test_blocks_that_do_not_feed_each_other_are_cached_one_by_one(monkeypatch):
    """Feed-forwards of successive blocks are not chained (norms and attention run between them): the first
    computed step finds that, and caching goes on block by block, exactly as without fusing."""
    pipe = build_pipeline("dit")
    diffcache.accelerate(pipe, "uniform:interval=2", units="transformer_blocks.*.ff")
    fallback = run(pipe, "dit", steps=6)
    assert not executor(pipe).family.fuse_blocks
    with monkeypatch.context() as patch:
        per_block(patch)
        diffcache.accelerate(pipe, "uniform:interval=2", units="transformer_blocks.*.ff")
        assert np.array_equal(run(pipe, "dit", steps=6), fallback)
