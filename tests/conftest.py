"""Shared helpers: tiny pipelines are built fresh per test (no state leaks between tests)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from diffcache.testing import PIPELINE_NAMES, call_kwargs

UNET_PIPELINES = ("sd", "sdxl", "unet2d")
TRANSFORMER_PIPELINES = tuple(n for n in PIPELINE_NAMES if n not in UNET_PIPELINES)
STEPS = 6


@pytest.fixture(autouse=True)
def _private_cost_cache(tmp_path_factory, monkeypatch):
    # MAC profiles are cached on disk; keep the tests' out of the user's cache and independent of it.
    monkeypatch.setenv("DIFFCACHE_CACHE", str(tmp_path_factory.getbasetemp() / "diffcache-cache"))


@pytest.fixture(autouse=True)
def _single_thread():
    # Deterministic, and the 2-core CI machine is shared: one thread avoids OpenMP stalls.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def run(pipe, name: str, steps: int = STEPS, **overrides) -> np.ndarray:
    """One deterministic call (seed 0) of a `diffcache.testing` pipeline; returns the images array."""
    kwargs = call_kwargs(name, num_inference_steps=steps, batch_size=overrides.pop("batch_size", 1))
    kwargs.update(overrides)
    return pipe(**kwargs).images


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(1.0 / mse)


class WeightCalls(TorchFunctionMode):
    """Counts real ``F.linear``/``F.conv2d`` calls per weight: a module served from a cache never reaches them,
    even when the module itself is the leaf whose ``__call__`` diffcache's hook intercepts."""

    def __init__(self, modules: list[torch.nn.Module]) -> None:
        super().__init__()
        self.index = {id(m.weight): i for i, m in enumerate(modules)}
        self.counts = [0] * len(modules)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (F.linear, F.conv2d):
            weight = args[1] if len(args) > 1 else kwargs.get("weight")
            i = self.index.get(id(weight))
            if i is not None:
                self.counts[i] += 1
        return func(*args, **kwargs)


def first_weight_leaf(module: torch.nn.Module) -> torch.nn.Module:
    return next(m for m in module.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)))


def plan_leaves(adapter, plan) -> tuple[list[torch.nn.Module], np.ndarray]:
    """A transformer plan's leaves to watch (one weight per cached slot) and ``(steps, leaves)`` when each must
    compute: per component slot, or per block (a weight inside its first component)."""
    if plan.granularity == "component":
        slots = [(u, c) for u, unit in enumerate(adapter.units) for c, comp in enumerate(plan.components)
                 if comp in unit.components]
        leaves = [first_weight_leaf(adapter.units[u].components[plan.components[c]]) for u, c in slots]
        return leaves, np.stack([plan.recompute[:, u, c] for u, c in slots], axis=1)
    # Inside the attention: DiT reads block 0's norm1 embedding outside the block too.
    leaves = [first_weight_leaf(next(iter(unit.components.values()))) for unit in adapter.units]
    return leaves, plan.recompute[:, :, 0]


def first_call_inputs(model: torch.nn.Module, generate) -> tuple[tuple, dict]:
    """The ``(args, kwargs)`` of ``model``'s first call while ``generate()`` runs."""
    captured = []
    handle = model.register_forward_pre_hook(
        lambda _m, a, k: captured.append((a, k)) if not captured else None, with_kwargs=True)
    generate()
    handle.remove()
    return captured[0]


def full_then_reused(model: torch.nn.Module, executor, args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Output of a full step, then of a reuse step with the very same inputs (what the wrapped scheduler's
    ``set_timesteps`` / ``step`` would do around them)."""
    executor.start_generation(4)
    with torch.no_grad():
        full = model(*args, **kwargs)[0]
        executor.end_step()
        return full, model(*args, **kwargs)[0]


def assert_reuse_reproduces_full(pipe, model: torch.nn.Module, args: tuple, kwargs: dict, tags: list[str]) -> None:
    """For each tag: a reuse step fed the full step's very inputs reproduces its output (exactly, except block
    residuals, where x + (f(x) - x) rounds once)."""
    import diffcache
    from diffcache.runtime import find_attachment

    for tag in tags:
        diffcache.accelerate(pipe, tag)
        full, reused = full_then_reused(model, find_attachment(model).executor, args, kwargs)
        assert diffcache.summary(pipe).reused[1].sum() > 0
        if tag.startswith("uniform"):
            torch.testing.assert_close(reused, full, rtol=1e-5, atol=1e-5)
        else:
            assert torch.equal(reused, full), tag
