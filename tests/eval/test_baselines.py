"""diffusers' own caches as baselines: they really skip work, stay consistent across calls, and leave no trace."""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import pytest
import torch
from diffusers.hooks import HookRegistry, ModelHook

from diffcache.eval.baselines import BASELINES, BaselineUnavailable, diffusers_cache, mag_ratios
from diffcache.models import load_pipeline

from ..conftest import psnr

STEPS = 10
# (model, baseline, params, deep leaf module): parameters that skip about half of the deep calls at 10 steps.
APPLICABLE = [
    ("digits-dit", "first_block_cache", {"threshold": 0.2}, "transformer_blocks.5.ff"),
    ("digits-dit", "taylorseer", {"cache_interval": 3}, "transformer_blocks.5.ff"),
    ("digits-unet", "taylorseer", {"cache_interval": 3}, "up_blocks.1.resnets.2"),
]
IDS = [f"{model}-{name}" for model, name, _, _ in APPLICABLE]


def pipeline(model: str):
    pipe = load_pipeline(model)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe, steps: int = STEPS) -> np.ndarray:
    return pipe(class_labels=[1, 2], num_inference_steps=steps, guidance_scale=2.0, output_type="np",
                generator=torch.Generator().manual_seed(0)).images


@contextmanager
def counting(pipe, leaf: str):
    """Counts real calls of a deep leaf module of the denoiser (a skipped block never reaches it)."""
    calls = [0]
    denoiser = getattr(pipe, "transformer", None) or pipe.unet
    handle = denoiser.get_submodule(leaf).register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    try:
        yield calls
    finally:
        handle.remove()


def hook_state(module: torch.nn.Module) -> dict[str, tuple]:
    """Every diffusers hook registry (its hook names) and instance ``forward`` attribute under ``module``."""
    state = {}
    for name, m in module.named_modules():
        registry = getattr(m, "_diffusers_hook", None)
        state[name] = (registry and tuple(registry._hook_order), m.__dict__.get("forward"))
    return state


@pytest.mark.parametrize(("model", "name", "params", "leaf"), APPLICABLE, ids=IDS)
def test_baseline_skips_deep_calls_and_stays_close(model, name, params, leaf):
    pipe = pipeline(model)
    with counting(pipe, leaf) as calls:
        full = generate(pipe)
        full_calls, calls[0] = calls[0], 0
        with diffusers_cache(pipe, name, **params):
            cached = generate(pipe)
    assert full_calls == STEPS
    assert 0 < calls[0] <= 0.6 * full_calls, f"{name} ran the deep leaf {calls[0]} of {full_calls} times"
    assert not np.array_equal(cached, full)
    # Measured 34-36 dB; a cache that predicts nothing (TaylorSeer's lite mode on DiT) gives 13 dB.
    assert psnr(cached, full) > 25.0


class _Identity(ModelHook):
    pass


@pytest.mark.parametrize(("model", "name", "params", "leaf"), APPLICABLE, ids=IDS)
def test_exit_restores_pipeline_bit_exactly(model, name, params, leaf):
    pipe = pipeline(model)
    denoiser = getattr(pipe, "transformer", None) or pipe.unet
    # A hook that was there before must survive, still chained, while everything the baseline added goes.
    HookRegistry.check_if_exists_or_initialize(denoiser).register_hook(_Identity(), "test.identity")
    before = hook_state(denoiser)
    full = generate(pipe)
    with diffusers_cache(pipe, name, **params):
        assert hook_state(denoiser) != before
        generate(pipe)
    assert hook_state(denoiser) == before
    assert "set_timesteps" not in pipe.scheduler.__dict__
    assert np.array_equal(generate(pipe), full)


@pytest.mark.parametrize(("model", "name", "params", "leaf"), APPLICABLE, ids=IDS)
def test_repeat_calls_and_new_step_count_are_fresh(model, name, params, leaf):
    pipe = pipeline(model)
    with diffusers_cache(pipe, name, **params):
        first, second, six_after = generate(pipe), generate(pipe), generate(pipe, steps=6)
    with diffusers_cache(pipe, name, **params):
        six_fresh = generate(pipe, steps=6)
    assert np.array_equal(first, second)
    assert np.array_equal(six_after, six_fresh)


@pytest.mark.parametrize(("model", "name", "match"), [
    ("digits-unet", "first_block_cache", "needs a top-level ModuleList.*UNet2DModel has none"),
    ("digits-dit", "faster_cache", "class-conditional.*class_labels"),
    ("digits-unet", "faster_cache", "class-conditional.*class_labels"),
    ("digits-unet", "mag_cache", "mag_cache needs a top-level ModuleList.*UNet2DModel has none"),
])
def test_inapplicable_baseline_is_refused_before_running(model, name, match):
    pipe = pipeline(model)
    denoiser = getattr(pipe, "transformer", None) or pipe.unet
    before = hook_state(denoiser)
    with pytest.raises(BaselineUnavailable, match=match), diffusers_cache(pipe, name):
        pytest.fail("the with-block must not be entered")
    assert hook_state(denoiser) == before


def test_failure_inside_first_call_is_converted_and_cleaned_up():
    pipe = pipeline("digits-unet")
    before = hook_state(pipe.unet)
    # Down blocks return nested tuples, which TaylorSeer cannot record: diffusers fails at the first step.
    with pytest.raises(BaselineUnavailable, match="taylorseer failed on UNet2DModel: 'tuple'") as info, \
            diffusers_cache(pipe, "taylorseer", cache_identifiers=[r"down_blocks\.0"]):
        generate(pipe)
    assert isinstance(info.value.__cause__, AttributeError)
    assert hook_state(pipe.unet) == before


@pytest.mark.parametrize(("params", "match"), [
    ({"cache_identifiers": ["^transformer_blocks.*attn"]}, "hooked no module"),  # diffusers' default, fullmatch
    ({"use_lite_mode": True}, "lite mode predicts `proj_out`, which DiTTransformer2DModel lacks"),
    ({"skip_predict_identifiers": [r"transformer_blocks\.\d+"]}, "would predict nothing"),
])
def test_taylorseer_configs_that_predict_nothing_are_refused(params, match):
    pipe = pipeline("digits-dit")
    with pytest.raises(BaselineUnavailable, match=match), diffusers_cache(pipe, "taylorseer", **params):
        pytest.fail("the with-block must not be entered")


def test_taylorseer_without_warmup_is_refused():
    with pytest.raises(ValueError, match="disable_cache_before_step must be >= 1, got 0"):
        with diffusers_cache(pipeline("digits-dit"), "taylorseer", disable_cache_before_step=0):
            pass


def test_unknown_name_lists_baselines():
    with pytest.raises(ValueError, match=", ".join(BASELINES)):
        with diffusers_cache(pipeline("digits-dit"), "teacache"):
            pass


@pytest.mark.parametrize("order", [1, 2])
@pytest.mark.parametrize("model", ["digits-unet", "digits-dit"])
def test_diffcache_reproduces_taylorseer_at_its_key_steps(model, order):
    """TaylorSeer's compute pattern (`taylorseer_key_steps`) with the whole body forecast (a UNet's unit 0, every
    DiT block) gives TaylorSeer's images, at either order: the searches are seeded with it and priced against it."""
    import diffcache
    from diffcache.adapters import denoiser_of, resolve_adapter
    from diffcache.schedules.evolution import taylorseer_key_steps

    pipe = pipeline(model)
    params = {"cache_interval": 3, "disable_cache_before_step": 2, "max_order": order}
    leaf = next(leaf for m, name, _, leaf in APPLICABLE if m == model and name == "taylorseer")
    with counting(pipe, leaf) as calls:
        with diffusers_cache(pipe, "taylorseer", **params):
            theirs = generate(pipe)
    key = taylorseer_key_steps(STEPS, params["cache_interval"], params["disable_cache_before_step"])
    assert calls[0] == key.sum() and key.tolist()[:4] == [True, True, False, True]
    layout = resolve_adapter(denoiser_of(pipe)).layout()
    bits = np.broadcast_to(key[:, None, None], (STEPS, len(layout.units), 1))
    with diffcache.accelerated(pipe, diffcache.Schedule(bits, layout.units, layout.components, forecast=order)):
        ours = generate(pipe)
    full = generate(pipe)
    assert 25 < psnr(theirs, full) < 80
    if model == "digits-unet":  # both forecast the last up block's output: the same numbers
        assert np.array_equal(ours, theirs)
    else:  # TaylorSeer forecasts the last block's output, diffcache each block's residual on the fresh input
        assert 35 < psnr(ours, theirs) < 80


def test_mag_cache_calibrates_on_the_model_then_skips_steps_and_leaves_no_trace(capsys):
    pipe = pipeline("digits-dit")
    denoiser = pipe.transformer
    before = hook_state(denoiser)
    kwargs = {"class_labels": [1, 2], "num_inference_steps": STEPS, "guidance_scale": 2.0, "output_type": "np"}
    ratios = mag_ratios(pipe, kwargs | {"generator": torch.Generator().manual_seed(0)})
    assert len(ratios) == STEPS and ratios[0] == 1.0 and all(0.5 < r < 2.0 for r in ratios)
    assert capsys.readouterr().out == ""  # diffusers prints the ratios; diffcache reads its log record instead
    assert hook_state(denoiser) == before  # calibration skipped nothing and left nothing behind
    with counting(pipe, "transformer_blocks.5.ff") as calls:
        full = generate(pipe)
        calls[0] = 0
        with diffusers_cache(pipe, "mag_cache", mag_ratios=ratios, num_inference_steps=STEPS, threshold=0.25,
                             max_skip_steps=3, retention_ratio=0.2):
            first, second = generate(pipe), generate(pipe)
    assert 0 < calls[0] / 2 <= 0.8 * STEPS, f"mag_cache ran the last block {calls[0] / 2} of {STEPS} steps"
    assert np.array_equal(first, second) and not np.array_equal(first, full)
    assert psnr(first, full) > 25.0
    assert hook_state(denoiser) == before
    assert np.array_equal(generate(pipe), full)


@pytest.mark.parametrize(("params", "match"), [
    ({"num_inference_steps": STEPS}, "needs this model's mag_ratios"),
    ({"mag_ratios": [1.0] * STEPS}, "needs num_inference_steps"),
])
def test_mag_cache_without_its_ratios_or_step_count_is_refused(params, match):
    pipe = pipeline("digits-dit")
    before = hook_state(pipe.transformer)
    with pytest.raises(ValueError, match=match), diffusers_cache(pipe, "mag_cache", **params):
        pytest.fail("the with-block must not be entered")
    assert hook_state(pipe.transformer) == before


def test_cache_dit_dbcache_skips_blocks_resets_per_call_and_leaves_no_trace(capsys):
    pytest.importorskip("cache_dit")
    from diffcache.eval.baselines import cache_dit_cache

    pipe = pipeline("digits-dit")
    keys, before = set(pipe.transformer.state_dict()), hook_state(pipe.transformer)
    with counting(pipe, "transformer_blocks.5.ff") as calls:
        full = generate(pipe, 25)
        calls[0] = 0
        with cache_dit_cache(pipe, Fn_compute_blocks=1, Bn_compute_blocks=0, residual_diff_threshold=0.12,
                             max_warmup_steps=4, taylorseer_order=1):
            first, second = generate(pipe, 25), generate(pipe, 25)
    assert 0 < calls[0] / 2 < 25, f"DBCache ran the last block {calls[0] / 2} of 25 steps"
    assert np.array_equal(first, second) and psnr(first, full) > 30.0  # measured 51.9 dB, 14 of 25 steps
    assert set(pipe.transformer.state_dict()) == keys and hook_state(pipe.transformer) == before
    assert np.array_equal(generate(pipe, 25), full)
    assert "cache" not in capsys.readouterr().out.lower()  # its INFO lines go to stdout unless silenced


def test_cache_dit_refuses_the_unet_and_leaves_it_unchanged():
    pytest.importorskip("cache_dit")
    from diffcache.eval.baselines import cache_dit_cache

    pipe = pipeline("digits-unet")
    full, call = generate(pipe), type(pipe).__call__
    with pytest.raises(BaselineUnavailable, match="cache-dit does not run on DigitsUNetPipeline"), \
            cache_dit_cache(pipe, Fn_compute_blocks=1):
        pytest.fail("the with-block must not be entered")
    assert type(pipe).__call__ is call and np.array_equal(generate(pipe), full)
