"""docs/ARCHITECTURE.md's newcomer checklists, shown true: a toy model family (adapter + runtime), a toy reuse
mechanism and a toy output kind, all defined in this file only, accelerate, restore, calibrate and search
through the package's own code."""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler
from diffusers.hooks.hooks import ModelHook

import diffcache
from diffcache.adapters import BLOCK, Adapter, Layout, register_adapter, resolve_adapter
from diffcache.runtime import FamilyRuntime, Mechanism, register_mechanism, register_runtime
from diffcache.schedules.presets import from_tag

STEPS = 6


class ToyPolicy(torch.nn.Module):
    """A diffusion-policy-shaped denoiser: an action chunk through a stack of residual MLP stages."""

    def __init__(self, width: int = 8, depth: int = 3) -> None:
        super().__init__()
        self.stages = torch.nn.ModuleList(
            torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.Tanh()) for _ in range(depth))
        self.time = torch.nn.Linear(1, width)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        h = x + self.time(t.float().view(1, 1) / 1000)
        for stage in self.stages:
            h = h + stage(h)
        return h - x


class ToyPolicyPipeline:
    """Steps a DDIM scheduler over an action chunk; returns ``.actions`` (no images anywhere)."""

    def __init__(self) -> None:
        torch.manual_seed(0)
        self.transformer = ToyPolicy()
        self.scheduler = DDIMScheduler(num_train_timesteps=1000)

    def __call__(self, prompt: list[str] | str, generator: torch.Generator | None = None, output_type: str = "np",
                 num_inference_steps: int = STEPS, guidance_scale: float | None = None) -> Any:
        prompts = [prompt] if isinstance(prompt, str) else prompt
        x = torch.randn(len(prompts), 8, generator=generator)
        self.scheduler.set_timesteps(num_inference_steps)
        with torch.no_grad():
            for t in self.scheduler.timesteps:
                x = self.scheduler.step(self.transformer(x, t), t, x).prev_sample
        return SimpleNamespace(actions=x.numpy())


# ---- the toy family: one adapter (what the units are) and one runtime (how a plan runs on them)
@register_adapter("toy-policy", lambda module: isinstance(module, ToyPolicy))
class ToyAdapter(Adapter):
    family = "toy-policy"

    def layout(self, granularity: str = BLOCK) -> Layout:
        return Layout(self.family, [f"stages.{i}" for i in range(len(self.denoiser.stages))], [BLOCK])

    def slot_modules(self, granularity: str = BLOCK) -> dict[tuple[int, int], list[str]]:
        return {(u, 0): [f"stages.{u}"] for u in range(len(self.denoiser.stages))}


class StageHook(ModelHook):
    """A stage's output is the slot's value: a reuse step serves it instead of running the stage."""

    def __init__(self, executor: Any, unit: int) -> None:
        super().__init__()
        self.executor, self.unit = executor, unit

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        ex = self.executor
        if not ex.in_call:
            return self.fn_ref.original_forward(*args, **kwargs)
        if not ex.row[self.unit][0]:
            return ex.cached((self.unit, 0))
        output = self.fn_ref.original_forward(*args, **kwargs)
        if ex.wanted[self.unit][0]:
            ex.put((self.unit, 0), output)
        return output


@register_runtime(ToyAdapter)
class ToyRuntime(FamilyRuntime):
    def hooks(self, granularity: str) -> list:
        return [(stage, StageHook(self.executor, u), "diffcache.unit")
                for u, stage in enumerate(self.adapter.denoiser.stages)]


# ---- the toy mechanism: serve half of the cached value
@register_mechanism("toy-half")
class Half(Mechanism):
    def serve(self, entry: Any, steps: int) -> Any:
        return entry * 0.5


def actions(pipe: ToyPolicyPipeline, seed: int = 0) -> np.ndarray:
    return pipe(["a", "b"], generator=torch.Generator().manual_seed(seed)).actions


def test_toy_family_accelerates_and_restores_exactly():
    pipe = ToyPolicyPipeline()
    full = actions(pipe)
    diffcache.accelerate(pipe, "none")
    assert np.array_equal(actions(pipe), full)  # all-recompute is the model itself
    diffcache.accelerate(pipe, "uniform:interval=2")
    cached = actions(pipe)
    summary = diffcache.summary(pipe)
    assert summary.reused.sum() == 3 * 3 and not np.array_equal(cached, full)  # steps 1, 3, 5 reuse 3 units
    assert np.isfinite(cached).all()
    diffcache.restore(pipe)
    assert np.array_equal(actions(pipe), full)
    assert type(resolve_adapter(pipe.transformer)) is ToyAdapter


def test_toy_mechanism_serves_reuse_steps():
    model = ToyPolicy()
    x, t0, t1 = torch.randn(2, 8), torch.tensor(900), torch.tensor(700)
    outputs = []
    handles = [stage.register_forward_hook(lambda m, a, out: outputs.append(out)) for stage in model.stages]
    with torch.no_grad():
        first = model(x, t0)
    for handle in handles:
        handle.remove()
    # Step 1 reuses every stage: each serves half of its step-0 output.
    want = x + model.time(t1.float().view(1, 1) / 1000) + 0.5 * sum(outputs) - x
    plan = from_tag("uniform:interval=2", model, 2)
    diffcache.accelerate(model, replace(plan, reuse="toy-half"))
    with torch.no_grad(), diffcache.runtime.generation(model, num_steps=2) as gen:
        assert torch.equal(model(x, t0), first)
        gen.step()
        served = model(x, t1)
    torch.testing.assert_close(served, want)
    diffcache.accelerate(model, plan)  # the copy: a different output, so the check above can fail
    with torch.no_grad(), diffcache.runtime.generation(model, num_steps=2) as gen:
        model(x, t0)
        gen.step()
        assert not torch.allclose(model(x, t1), want)
    diffcache.restore(model)
    with pytest.raises(diffcache.ScheduleError, match="not a registered reuse mechanism.*toy-half"):
        diffcache.accelerate(model, replace(plan, reuse="toy-twice"))


def test_toy_outputs_calibrate_and_search_through_the_same_code(tmp_path):
    pipe = ToyPolicyPipeline()
    schedule = diffcache.search(pipe, ["a", "b", "c", "d"], method="dp", budget="recompute:0.6",
                                num_inference_steps=STEPS, batch_size=2, out_dir=tmp_path, progress=False)
    assert schedule.recompute_fraction <= 0.6 and schedule.units == ["stages.0", "stages.1", "stages.2"]
    full = actions(pipe)
    diffcache.accelerate(pipe, schedule)
    searched = actions(pipe)
    assert diffcache.summary(pipe).reused.sum() > 0 and not np.array_equal(searched, full)
