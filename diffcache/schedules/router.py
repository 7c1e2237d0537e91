"""Learned routers: HarmoniCa (SDT + IEPO) and learning-to-cache, trained in CPU-minutes, exported as a Schedule.

A router is a logit per (step, unit, component) slot; ``r = sigmoid(logit)`` is the "recompute strength"
(specs/algorithms.md sections 2 and 3). Training blends each slot's output as ``r * fresh + (1 - r) * cached``
and refreshes the slot's cache only where ``r > threshold``, as inference would. Step 0 is fixed to recompute.

* **SDT** (step-wise denoising training): each epoch runs the real pipeline on calibration noise. At every
  denoiser call the full model gives the teacher output without touching the cache, the routed model gives
  the student output, the step's logits take one AdamW step on
  ``lambda_k * ||student - teacher||^2 / ||teacher||^2 + beta * mean(r_k)``, and the pipeline continues from
  the *student* output, so training sees the drift that earlier reuse causes at inference.
* **IEPO**: ``lambda_k`` is how much the final images change when step ``k`` is forced to recompute under the
  current router (one generation per step, refreshed every ``lambda_every`` epochs), normalized to mean 1.
  ``objective="mse"`` uses ``lambda_k = 1`` (learning-to-cache's loss on the SDT trajectory).

The static schedule keeps the slots with the highest ``r`` until the budget is spent (the threshold is chosen
by the budget rather than fixed at 0.1, so one trained router serves every budget). Transformers only (the
papers' setting); UNets have one nested skip branch per step, which `dp` and `ecad` search directly.
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ..adapters import BLOCK, Adapter, TransformerAdapter
from ..adapters.dit import block_input
from ..errors import SearchError, UnsupportedModelError
from ..schedule import Schedule
from .budget import Budget, CostModel
from ..data import CalibrationData
from .methods import SearchJob, register_search

logger = logging.getLogger(__name__)

_FIXED_LOGIT = 5.0  # step 0 always computes (sigmoid ~ 0.993), as in HarmoniCa
_CLAMP = 5.0


@dataclass(frozen=True)
class RouterConfig:
    """Router training settings (HarmoniCa's released run: lr 0.01, beta 7e-8 on un-normalized MSE, tau 0.1)."""

    epochs: int = 6
    lr: float = 0.1
    beta: float = 0.05
    objective: str = "iepo"
    lambda_every: int = 3
    threshold: float = 0.1
    seed: int = 0

    def __post_init__(self) -> None:
        if self.objective not in ("iepo", "mse"):
            raise SearchError(f"router objective must be 'iepo' or 'mse', got {self.objective!r}")
        if self.epochs < 1 or self.lambda_every < 1:
            raise SearchError("router epochs and lambda_every must be >= 1")


@dataclass
class Router:
    """Trained router scores ``(steps, units, components)`` in [0, 1] for one model layout."""

    scores: np.ndarray
    template: Schedule

    def schedule(self, cost_model: CostModel, budget: Budget) -> Schedule:
        """Recompute the highest-scoring slots, as many as ``budget`` allows (step 0 always)."""
        present = np.broadcast_to(self.template.present_mask, self.scores.shape)
        order = np.unique(self.scores[1:][present[1:]])
        best = None
        lo, hi = 0, len(order)  # recompute where score >= order[i]; cost falls as i grows
        while lo < hi:
            mid = (lo + hi) // 2
            candidate = self._at(order[mid])
            if cost_model.fits(candidate, budget):
                best, hi = candidate, mid
            else:
                lo = mid + 1
        if best is None:
            best = self._at(np.inf)
            if not cost_model.fits(best, budget):
                raise SearchError(f"budget {budget} is below the cheapest router schedule "
                                  f"({cost_model.fraction(best):.1%} of the full model); raise the budget")
        return best

    def _at(self, threshold: float) -> Schedule:
        grid = (self.scores >= threshold) | ~self.template.present_mask[None]
        grid[0] = True
        t = self.template
        return Schedule(grid, t.units, t.components, "router", {"threshold": float(threshold)}, t.model, {},
                        t.present)

    def save(self, path: str | os.PathLike) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, scores=self.scores)


class _Slots:
    """Torch forward hooks on every routed slot: teacher (pass through), student (blend + cache) or off."""

    def __init__(self, adapter: TransformerAdapter, template: Schedule) -> None:
        self.mode = "off"
        self.step = 0
        self.logits: list[torch.Tensor] = []
        self.forced: int | None = None  # a step that recomputes everything (IEPO)
        self.threshold = 0.1
        self.cache: dict[tuple[int, int], Any] = {}
        self.handles = []
        block = template.components == [BLOCK]
        for u, unit in enumerate(adapter.units):
            if block:
                self.handles.append(unit.module.register_forward_hook(self._block_hook(u, unit), with_kwargs=True))
                continue
            for c, name in enumerate(template.components):
                if name in unit.components:
                    self.handles.append(unit.components[name].register_forward_hook(self._component_hook(u, c)))

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()

    def _route(self, slot: tuple[int, int], fresh: tuple) -> tuple:
        if self.mode != "student":
            return fresh
        cached = self.cache.get(slot)
        if cached is None or self.step == self.forced:
            out = fresh
            refresh = True
        else:
            r = torch.sigmoid(self.logits[self.step][slot])
            out = tuple(None if f is None else r * f + (1 - r) * c for f, c in zip(fresh, cached))
            refresh = bool(r > self.threshold)
        if refresh:
            self.cache[slot] = tuple(None if o is None else o.detach() for o in out)
        return out

    def _component_hook(self, u: int, c: int) -> Any:
        def hook(_module: torch.nn.Module, _args: tuple, output: Any) -> Any:
            single = not isinstance(output, tuple)
            out = self._route((u, c), (output,) if single else output)
            return out[0] if single else out

        return hook

    def _block_hook(self, u: int, spec: Any) -> Any:
        streams = spec.streams

        def hook(_module: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
            outputs = output if spec.outputs is not None else (output,)
            inputs = [block_input(spec, s, args, kwargs) for s in streams]
            residuals = tuple(None if o is None else o - i for o, i in zip(outputs, inputs))
            routed = self._route((u, 0), residuals)
            result = tuple(None if d is None else i + d for i, d in zip(inputs, routed))
            return result if spec.outputs is not None else result[0]

        return hook


def _sample(output: Any) -> torch.Tensor:
    """The prediction tensor of a denoiser output (a tuple or a diffusers output object)."""
    return output[0] if isinstance(output, tuple) else output.sample


@contextmanager
def _denoiser_wrapped(denoiser: torch.nn.Module, on_call: Any) -> Any:
    original = denoiser.forward
    denoiser.forward = lambda *args, **kwargs: on_call(original, args, kwargs)
    try:
        yield
    finally:
        del denoiser.forward


def train_router(pipe: Any, adapter: Adapter, data: CalibrationData, granularity: str,
                 config: RouterConfig = RouterConfig(), progress: bool = True) -> Router:
    """Train a HarmoniCa router for ``pipe``'s transformer on ``data`` (the pipeline must be unaccelerated)."""
    if not adapter.routable:
        raise UnsupportedModelError(
            f"router search trains per-block routers for transformers; {type(adapter.denoiser).__name__}'s units "
            "are not independent blocks. Use method='dp' or 'ecad'"
        )
    layout = adapter.layout(granularity)
    steps = data.steps(pipe)
    shape = (steps, len(layout.units), len(layout.components))
    template = Schedule(np.ones(shape, bool), layout.units, layout.components, "none", {}, adapter.model_info,
                        present=layout.present)
    generator = torch.Generator().manual_seed(config.seed)
    # One parameter per step: AdamW skips parameters without a gradient, so a step's momentum never moves the
    # logits of steps that did not run in this iteration.
    logits = [torch.full(shape[1:], _FIXED_LOGIT)] + [
        torch.nn.Parameter(torch.randn(shape[1:], generator=generator)) for _ in range(1, steps)
    ]
    optimizer = torch.optim.AdamW(logits[1:], lr=config.lr, weight_decay=0.0)
    present = torch.from_numpy(np.broadcast_to(template.present_mask, shape).copy())
    slots = _Slots(adapter, template)
    slots.logits, slots.threshold = logits, config.threshold
    weights = torch.ones(steps)
    denoiser = adapter.denoiser
    frozen = [p for p in denoiser.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)

    def generate(kwargs: dict[str, Any], seed: int) -> np.ndarray:
        slots.cache, slots.step = {}, 0
        kwargs["generator"].manual_seed(seed)
        images = data.generate(pipe, kwargs)
        if slots.step != steps:
            raise SearchError(f"the denoiser ran {slots.step} times in a {steps}-step generation; router training "
                              "needs one batched (CFG) denoiser call per step")
        return images

    def routed_call(original: Any, args: tuple, kwargs: dict) -> Any:
        slots.mode = "student"
        output = original(*args, **kwargs)
        slots.step += 1
        return output

    def training_call(original: Any, args: tuple, kwargs: dict) -> Any:
        k = slots.step
        if k == 0:
            return routed_call(original, args, kwargs)
        slots.mode = "teacher"
        teacher = _sample(original(*args, **kwargs)).detach()
        slots.mode = "student"
        with torch.enable_grad():
            output = original(*args, **kwargs)
            student = _sample(output)
            r = torch.sigmoid(logits[k])[present[k]]
            error = (student - teacher).pow(2).mean() / teacher.pow(2).mean().clamp_min(1e-12)
            loss = weights[k] * error + config.beta * r.mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
        optimizer.step()
        with torch.no_grad():
            logits[k].clamp_(-_CLAMP, _CLAMP)
        slots.step += 1
        return _detached(output)

    batches = data.batches(pipe)
    try:
        for epoch in tqdm(range(config.epochs), desc="router epochs", disable=not progress):
            kwargs = batches[epoch % len(batches)]
            seed = data.seed + 7919 * (epoch + 1)
            if config.objective == "iepo" and epoch % config.lambda_every == 0:
                with torch.no_grad(), _denoiser_wrapped(denoiser, routed_call):
                    weights = _iepo_weights(generate, slots, kwargs, seed, steps)
            with _denoiser_wrapped(denoiser, training_call):
                generate(kwargs, seed)
    finally:
        slots.remove()
        for p in frozen:
            p.requires_grad_(True)
    scores = torch.sigmoid(torch.stack([row.detach() for row in logits])).numpy()
    scores[0] = 1.0
    return Router(scores, template)


def _iepo_weights(generate: Any, slots: _Slots, kwargs: dict[str, Any], seed: int, steps: int) -> torch.Tensor:
    """``lambda_k``: squared change of the final images when step ``k`` recomputes fully, normalized to mean 1."""
    slots.forced = None
    base = generate(kwargs, seed)
    weights = torch.zeros(steps)
    for k in range(1, steps):
        slots.forced = k
        weights[k] = float(np.mean((generate(kwargs, seed) - base) ** 2))
    slots.forced = None
    mean = weights[1:].mean()
    return weights / mean if mean > 0 else torch.ones(steps)


def _detached(output: Any) -> Any:
    if isinstance(output, tuple):
        return tuple(o.detach() if isinstance(o, torch.Tensor) else o for o in output)
    output.sample = output.sample.detach()
    return output


@register_search("router")
def _router(job: SearchJob, options: dict[str, Any]) -> Schedule:
    try:
        config = RouterConfig(**options)
    except TypeError as err:
        raise SearchError(f"router options: {err}; see diffcache.schedules.router.RouterConfig") from None
    router = train_router(job.pipe, job.adapter, job.data, job.granularity, config, progress=job.progress)
    if job.out is not None:
        router.save(job.out / "router.npz")
    return router.schedule(job.cost_model, job.budget)


__all__ = ["Router", "RouterConfig", "train_router"]
