"""The cost model: per-slot MACs add up, schedules save what they skip, profiles are cached."""

import numpy as np
import pytest
import torch

from diffcache.adapters import UNetAdapter, resolve_adapter
from diffcache.eval import cost
from diffcache.schedules.presets import from_tag
from diffcache.testing import build_pipeline, call_kwargs


def test_macs_profile_and_schedule_savings(monkeypatch):
    pipe = build_pipeline("dit")
    kwargs = call_kwargs("dit", num_inference_steps=1)
    block = cost.profile_macs(pipe, kwargs, "block")
    component = cost.profile_macs(pipe, kwargs, "component")
    assert block.measure == "macs" and block.total > block.slot_cost.sum() > 0
    # Components are inside their blocks: less than the blocks, more than nothing.
    assert 0.5 * block.slot_cost.sum() < component.slot_cost.sum() < block.slot_cost.sum()
    every_other = from_tag("uniform:interval=2", pipe.transformer, 10)
    saved = block.total * 10 - block.step_cost(every_other).sum()
    assert saved == pytest.approx(5 * block.slot_cost.sum())  # 5 of 10 steps reuse every block
    assert block.speedup(from_tag("none", pipe.transformer, 10)) == 1.0

    # The second call reads the cache: measuring again would need the FLOP counter.
    monkeypatch.setattr(cost, "FlopCounterMode", None)
    again = cost.profile_macs(pipe, kwargs, "block")
    assert np.array_equal(again.slot_cost, block.slot_cost) and again.total == block.total


def test_unet_branch_costs_grow_shallow_to_deep_share():
    pipe = build_pipeline("sd")
    profile = cost.profile_macs(pipe, call_kwargs("sd", num_inference_steps=1), "block")
    branch0 = from_tag("deepcache:interval=2,branch=0", pipe.unet, 4)
    branch5 = from_tag("deepcache:interval=2,branch=5", pipe.unet, 4)
    body = from_tag("deepcache:interval=2,branch=-1", pipe.unet, 4)  # reuse steps run the head alone
    assert profile.speedup(body) > profile.speedup(branch0) > profile.speedup(branch5) > 1.0
    head = profile.step_cost(body)[1] / profile.total  # time embedding, conv_norm_out, conv_out
    assert 0 < head < 0.1, head


def test_latency_profile_is_positive():
    pipe = build_pipeline("dit")
    profile = cost.profile_latency(pipe, call_kwargs("dit", num_inference_steps=2), "component")
    present = resolve_adapter(pipe.transformer).layout("component").present  # DiT blocks have no attn2
    assert profile.measure == "ms" and profile.total > profile.slot_cost.sum()
    assert (profile.slot_cost[present] > 0).all() and (profile.slot_cost[~present] == 0).all()


def test_saved_macs_profile_is_not_read_for_another_unit_mapping(monkeypatch):
    """Profiles are saved per model and inputs; an adapter that maps its units to other modules (as the UNet's
    whole-body unit did) must measure again instead of reading a profile of the old layout."""
    pipe = build_pipeline("sd")
    kwargs = call_kwargs("sd", num_inference_steps=1)
    first = cost.profile_macs(pipe, kwargs, "block")
    slot_modules = UNetAdapter.slot_modules

    def without_conv_in(adapter, granularity):
        slots = slot_modules(adapter, granularity)
        slots[0, 0] = [name for name in slots[0, 0] if name != "conv_in"]
        return slots

    monkeypatch.setattr(UNetAdapter, "slot_modules", without_conv_in)
    again = cost.profile_macs(pipe, kwargs, "block")
    assert again.slot_cost[0, 0] < first.slot_cost[0, 0] and np.array_equal(again.slot_cost[1:], first.slot_cost[1:])


def _dit(device: str, sample_size: int, **sizes):
    from diffusers import DiTTransformer2DModel

    with torch.device(device):
        torch.manual_seed(0)
        model = DiTTransformer2DModel(in_channels=4, out_channels=8, sample_size=sample_size, patch_size=2,
                                      num_embeds_ada_norm=1000, norm_type="ada_norm_zero", **sizes)
        inputs = (torch.randn(1, 4, sample_size, sample_size), torch.tensor([10]), torch.tensor([1]))
    return model, inputs


def _macs(model, inputs) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False, custom_mapping=cost.ATTENTION_FORMULAS)
    with torch.no_grad(), counter:
        model(inputs[0], timestep=inputs[1], class_labels=inputs[2])
    return counter.get_total_flops() / 2


def test_attention_is_counted_on_cpu_as_on_any_device():
    """The fused CPU attention kernel has no torch formula: without ours a CPU profile misses QK^T and AV. On the
    meta device attention runs as two bmm (counted by torch), so the two counts agree only if ours is right."""
    sizes = {"num_attention_heads": 2, "attention_head_dim": 8, "num_layers": 2}
    cpu, meta = _macs(*_dit("cpu", 16, **sizes)), _macs(*_dit("meta", 16, **sizes))
    assert cpu == meta
    from torch.utils.flop_counter import FlopCounterMode

    model, inputs = _dit("cpu", 16, **sizes)
    plain = FlopCounterMode(display=False)
    with torch.no_grad(), plain:
        model(inputs[0], timestep=inputs[1], class_labels=inputs[2])
    assert plain.get_total_flops() / 2 < cpu  # the check can fail: torch alone misses attention on CPU


@pytest.mark.parametrize(("size", "published"), [(32, 118.6), (64, 524.6)])  # DiT paper, Table 4: 256 / 512 px
def test_dit_xl_2_macs_match_the_published_figures(size, published):
    model, inputs = _dit("meta", size, num_attention_heads=16, attention_head_dim=72, num_layers=28)
    assert _macs(model, inputs) / 1e9 == pytest.approx(published, rel=0.01)


def test_profile_macs_counts_attention():
    pipe = build_pipeline("dit")
    kwargs = call_kwargs("dit", num_inference_steps=1)
    profile = cost.profile_macs(pipe, kwargs, "component")
    attn = profile.components.index("attn1")
    model = pipe.transformer
    block = model.transformer_blocks[0]
    tokens = (model.config.sample_size // model.config.patch_size) ** 2
    batch = 2  # CFG
    inner = block.attn1.inner_dim if hasattr(block.attn1, "inner_dim") else model.inner_dim
    projections = 4 * batch * tokens * inner * inner  # q, k, v, out
    attention = 2 * batch * tokens * tokens * inner  # QK^T and AV
    assert profile.slot_cost[0, attn] == projections + attention
