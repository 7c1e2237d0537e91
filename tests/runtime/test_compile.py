"""torch.compile together with accelerate: same outputs as the eager accelerated run, and a number of graphs that
does not grow with steps or generations (diffcache's per-step bookkeeping is hidden from dynamo)."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from torch._dynamo.utils import counters

import diffcache
from diffcache import Schedule
from diffcache.testing import build_pipeline
from diffcache.schedules.presets import from_tag

from ..conftest import run


def graphs() -> int:
    return counters["stats"]["unique_graphs"]


def graph_breaks() -> list[str]:
    return list(counters["graph_break"])


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def test_compiled_accelerated_dit_matches_eager_with_bounded_graphs():
    pipe = diffcache.accelerate(build_pipeline("dit"), "fora:interval=2")
    eager = {steps: run(pipe, "dit", steps=steps) for steps in (6, 9)}
    pipe.transformer.compile(backend="eager")  # dynamo's tracing and guards; the backend does not matter here
    assert np.array_equal(run(pipe, "dit", steps=6), eager[6])
    first = graphs()
    assert np.array_equal(run(pipe, "dit", steps=6), eager[6])
    assert np.array_equal(run(pipe, "dit", steps=9), eager[9])
    assert graphs() == first  # no recompilation for later steps, generations or step counts
    assert all("torch.compiler.disable" in reason for reason in graph_breaks())  # only our bookkeeping
    assert diffcache.summary(pipe).hits > 0


def test_accelerate_a_compiled_wrapper_and_restore():
    pipe = build_pipeline("dit")
    full = run(pipe, "dit")
    with diffcache.accelerated(pipe, "uniform:interval=3"):
        eager = run(pipe, "dit")
    pipe.transformer = torch.compile(pipe.transformer, backend="eager")
    diffcache.accelerate(pipe, "uniform:interval=3")
    assert np.array_equal(run(pipe, "dit"), eager)
    diffcache.restore(pipe)
    assert np.array_equal(run(pipe, "dit"), full)


def test_plans_with_many_patterns_warn_under_compile(caplog):
    pipe = build_pipeline("dit")
    plan = from_tag("fora:interval=2", pipe.transformer, 12)
    bits = plan.recompute.copy()
    for step in range(1, 12):  # every step reuses another set of slots: 12 patterns
        bits[step] = np.array([(step >> i) & 1 for i in range(bits[step].size)], bool).reshape(bits[step].shape)
    varied = Schedule(bits, plan.units, plan.components, "custom", model=plan.model)
    diffcache.accelerate(pipe, varied)
    pipe.transformer.compile(backend="eager")
    with caplog.at_level(logging.WARNING, logger="diffcache"):
        run(pipe, "dit", steps=12)
    assert "recompile_limit" in caplog.text


@pytest.fixture
def frozen(request):
    """Inductor's ``freezing`` (read by dynamo too, whatever the backend) for one test, default on. Through
    ``config.patch``: pytest 9's monkeypatch deletes a config module's entry when it undoes."""
    with torch._inductor.config.patch(freezing=getattr(request, "param", True)):
        yield


def test_frozen_compile_of_unet_deepcache_keeps_its_graphs(frozen):
    pipe = diffcache.accelerate(build_pipeline("sd"), "deepcache:interval=3")
    eager = run(pipe, "sd", steps=6)
    pipe.unet.compile(backend="eager")
    assert np.array_equal(run(pipe, "sd", steps=6), eager)
    first = graphs()
    assert np.array_equal(run(pipe, "sd", steps=6), eager)
    assert graphs() == first <= 3  # full step, reuse step (and the scheduler-less first call), not one per step


@pytest.mark.slow
def test_inductor_compiled_unet_deepcache():
    pipe = diffcache.accelerate(build_pipeline("sd"), "deepcache:interval=3,branch=1")
    eager = run(pipe, "sd")
    pipe.unet.compile()
    first_run = run(pipe, "sd")
    first = graphs()
    out, again = run(pipe, "sd"), run(pipe, "sd")
    assert graphs() == first
    assert np.array_equal(out, again)  # (the compiling generation itself differs in the 6th decimal)
    for images in (first_run, out):
        assert np.abs(images - eager).max() < 1e-4  # inductor reorders float math; nothing more
    assert all("torch.compiler.disable" in reason for reason in graph_breaks())


@pytest.mark.parametrize("frozen", [False, True], indirect=True)
def test_compiled_quantized_and_cached_dit_keeps_its_graphs(frozen):
    """With inductor's freezing, dynamo bakes every tensor reached through a module into the graph (guarded by
    identity): the step index and cached features must reach compiled code another way, or each step and each
    refreshed cache compiles a new graph (past the recompile limit: eager)."""
    from diffcache.quant import calibrate

    pipe = build_pipeline("dit")
    calibration = calibrate(pipe, [1, 2], "w8a8", num_inference_steps=6, guidance_scale=4.0, progress=False)
    diffcache.accelerate(pipe, "fora:interval=2", quant=calibration)
    eager = run(pipe, "dit")
    pipe.transformer.compile(backend="eager")
    assert np.array_equal(run(pipe, "dit"), eager)
    first = graphs()
    assert np.array_equal(run(pipe, "dit"), eager)
    # Per-step activation ranges are read through a step tensor and the timestep table is matched with tensor ops:
    # the graphs follow the plan's step patterns (compute, reuse), not the 6 steps, and a second generation adds none.
    assert graphs() == first <= 4
    assert all("torch.compiler.disable" in reason for reason in graph_breaks())


def test_inductor_runs_the_int8_kernels_of_a_bf16_dit(frozen):
    """Inductor, not just dynamo: the int8 GEMMs/convolutions (opaque ops) with the activation rounding fused
    around them, in a bf16 model, with freezing (what bf16 needs to prepack its own weights; inductor's own
    lowering of oneDNN's qlinear failed here without the opaque ops; checked without freezing too)."""
    from diffcache.quant import calibrate

    pipe = build_pipeline("dit")
    calibration = calibrate(pipe, [1, 2], "w8a8", num_inference_steps=6, guidance_scale=4.0, progress=False)
    pipe.to(torch.bfloat16)
    diffcache.accelerate(pipe, "fora:interval=2", quant=calibration)
    assert "0 simulated" in diffcache.summary(pipe).quant
    eager = run(pipe, "dit")
    pipe.transformer.compile()
    compiled = run(pipe, "dit")
    assert np.abs(compiled - eager).max() < 0.05  # bf16 fusions round differently, the integers are the same
    assert all("torch.compiler.disable" in reason for reason in graph_breaks())
