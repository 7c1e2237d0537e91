"""CacheQuant's decoupled error correction (specs/algorithms.md section 5, "DEC"), both halves.

Cache error: on a DeepCache step ``k`` the UNet reuses the branch feature ``F_b`` of the last key step ``a``.
CacheQuant replaces it with ``alpha_k * F_b(a) + beta_k``: one affine map per step and channel, fitted in closed
form (least squares over batch and positions) on the full model's own trajectory, ``X = F_b(a)`` (what the cache
holds) against ``Y = F_b(k)`` (what the step should have seen).

Quantization error (with ``quant=``): the convolutions that read the reused feature (``conv1`` and
``conv_shortcut`` of the decoder resnet consuming it) get one affine map per step and output channel, fitted from
their quantized output (``X``) to their float output (``Y``) on the same float inputs, and applied at every step,
as CacheQuant's code does. CacheQuant splits those convolutions into the cached and the fresh skip channels and
corrects the cached part only; here the concatenated input has one activation quantizer, so the correction is
fitted on the whole output.

Both cost a multiply-add per channel and ``2 x steps x channels`` numbers, and are tied to the schedule (and the
quantization calibration) they were fitted for.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ..adapters import Adapter, denoiser_of, resolve_adapter
from ..errors import QuantError, UnsupportedModelError
from ..files import load_npz, save_npz
from ..runtime import Executor, Mechanism, Observer, recording
from ..runtime.executor import LIVE
from ..schedule import Schedule
from ..schedules.presets import build_from_tag, resample, tag_of
from ..data import CalibrationData, conditions_from
from .calibration import QuantCalibration

_FORMAT = "diffcache.cache-correction/1"


@dataclass
class CacheCorrection:
    """Per-step affine corrections of the reused UNet branch feature (``alpha[k] = 1, beta[k] = 0`` where step
    ``k`` reuses nothing). ``plan`` is the schedule's bit string it was fitted for. ``layers`` maps the quantized
    convolutions reading that feature to their ``(alpha, beta)``, ``(steps, out_channels)`` each, fitted for the
    quantization calibration whose `QuantCalibration.key` is ``quant_key``."""

    model: dict[str, str]
    plan: str
    alpha: list[np.ndarray | None]
    beta: list[np.ndarray | None]
    layers: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    quant_key: str = ""

    @property
    def num_steps(self) -> int:
        return len(self.alpha)

    def mechanism(self, executor: Executor, inner: Mechanism) -> Mechanism:
        """The reuse mechanism that serves ``inner``'s values corrected (what the executor runs)."""
        return CorrectedReuse(executor, inner, self)

    def check(self, adapter: Adapter, schedule: Schedule) -> None:
        """Raise `QuantError` unless fitted for this model and exactly this schedule."""
        adapter.check_made_for(self.model, "this cache correction", "fit it again", QuantError)
        if _plan_key(schedule) != self.plan:
            raise QuantError(f"this cache correction was fitted for another schedule or step count ({self.num_steps} "
                             f"steps); fit it again for {tag_of(schedule) or schedule.method} at {schedule.num_steps} "
                             "steps with diffcache.quant.fit_cache_correction")
        if schedule.forecast:
            raise QuantError("a cache correction corrects copies of the cache; it does not apply to forecasts "
                             "(forecast=1 or 2)")

    def check_quant(self, quant: Any) -> None:
        """Raise `QuantError` unless the quantization-error part (if any) was fitted for ``quant``."""
        key = getattr(quant, "key", None)
        if self.layers and key != self.quant_key:
            raise QuantError("this correction's quantization-error part was fitted for "
                             + ("another quantization calibration" if key else "a quantized model")
                             + "; pass that calibration as quant=, or fit it again with "
                             "diffcache.quant.fit_cache_correction(..., quant=calibration)")

    def correct_layers(self, hooks: Sequence[tuple[torch.nn.Module, Any]]) -> None:
        """Give the quantized layers' hooks (`diffcache.quant.hooks.quant_hooks`) their output corrections."""
        for module, hook in hooks:
            if getattr(hook, "name", None) in self.layers:
                device = next(module.parameters()).device
                hook.out_fix = tuple(torch.as_tensor(t, device=device) for t in self.layers[hook.name])

    def at(self, step: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(alpha, beta)`` shaped ``(1, C, 1, 1)`` for step ``step`` (None where nothing is reused)."""
        if step >= self.num_steps or self.alpha[step] is None:
            return None
        shape = (1, -1, 1, 1)
        return (torch.as_tensor(self.alpha[step], dtype=like.dtype, device=like.device).view(shape),
                torch.as_tensor(self.beta[step], dtype=like.dtype, device=like.device).view(shape))

    def save(self, path: str | os.PathLike) -> None:
        header = {"model": self.model, "plan": self.plan, "steps": [a is not None for a in self.alpha],
                  "layers": list(self.layers), "quant_key": self.quant_key}
        arrays = {f"{name}_{k}": value for name, values in (("alpha", self.alpha), ("beta", self.beta))
                  for k, value in enumerate(values) if value is not None}
        arrays |= {f"layer_{kind}_{i}": pair[j] for i, pair in enumerate(self.layers.values())
                   for j, kind in enumerate(("alpha", "beta"))}
        save_npz(path, _FORMAT, header, arrays)

    @classmethod
    def load(cls, path: str | os.PathLike) -> CacheCorrection:
        try:
            header, data = load_npz(path, _FORMAT)
            used = header["steps"]
            alpha = [data[f"alpha_{k}"] if u else None for k, u in enumerate(used)]
            beta = [data[f"beta_{k}"] if u else None for k, u in enumerate(used)]
            layers = {name: (data[f"layer_alpha_{i}"], data[f"layer_beta_{i}"])
                      for i, name in enumerate(header["layers"])}
            return cls(header["model"], header["plan"], alpha, beta, layers, header["quant_key"])
        except (OSError, ValueError, KeyError) as err:
            raise QuantError(f"{os.fspath(path)!r} is not a readable diffcache cache correction ({err})") from None


class _BranchFeatures(Observer):
    """Keeps every branch feature the schedule reuses, at every step, while the full model runs."""

    def __init__(self, branches: set[int]) -> None:
        self.branches = branches
        self.features: dict[tuple[int, int], torch.Tensor] = {}

    def slots(self, executor: Executor) -> list[list[bool]]:
        return [[unit in self.branches] for unit in range(len(executor.plan.units))]

    def start(self, executor: Executor, num_steps: int) -> None:
        self.features = {}

    def observe(self, executor: Executor, key: tuple[int, int], value: Any) -> None:
        if key[0] in self.branches:
            self.features[(key[0], executor.step)] = value.detach()


class CorrectedReuse(Mechanism):
    """CacheQuant's cache-error correction as a reuse mechanism: serves ``alpha_k * F + beta_k`` for the inner
    mechanism's ``F`` (the copy; a correction refuses forecasts), with this step's per-channel ``(alpha, beta)``
    prepared before each call in the executor's per-call tensors (graph inputs under compile)."""

    def __init__(self, executor: Executor, inner: Mechanism, correction: CacheCorrection) -> None:
        super().__init__(executor, executor.plan)
        self.inner, self.correction = inner, correction
        self.needs_steps = inner.needs_steps

    def keep(self, value: Any, entry: Any, steps: int | None) -> Any:
        return self.inner.keep(value, entry, steps)

    def serve(self, entry: Any, steps: int) -> Any:
        feature = self.inner.serve(entry, steps)
        fix = self.executor.fix
        return feature if fix is None else feature * fix[0] + fix[1]

    def begin_call(self, like: torch.Tensor | None) -> None:
        self.inner.begin_call(like)
        step = self.executor.step
        LIVE[self.executor.key].fix = self.correction.at(step, like) if like is not None else None


def fit_cache_correction(
    pipe: Any,
    prompts: Sequence[str | int] | str | os.PathLike,
    schedule: Schedule | str,
    *,
    num_inference_steps: int | None = None,
    guidance_scale: float | None = None,
    seed: int = 0,
    batch_size: int = 8,
    quant: QuantCalibration | None = None,
    progress: bool = True,
) -> CacheCorrection:
    """Fit the per-step, per-channel correction of ``schedule``'s reused UNet branch features on ``prompts``;
    with ``quant``, also the quantization-error correction of the convolutions reading them (deploy with the
    same ``quant`` and ``schedule``: ``accelerate(pipe, schedule, quant=quant, correction=...)``).

    Raises:
        UnsupportedModelError: the denoiser is not a UNet (DeepCache branch features).
        QuantError: ``quant`` was calibrated for another model or step count.
    """
    denoiser = denoiser_of(pipe)
    adapter = resolve_adapter(denoiser)
    if not adapter.layout().nested:
        raise UnsupportedModelError("the cache correction fits UNet branch features (DeepCache); "
                                    f"{type(denoiser).__name__} is not a UNet")
    data = CalibrationData(conditions_from(prompts, pipe), num_inference_steps, guidance_scale, seed, batch_size)
    steps = data.steps(pipe)
    plan = build_from_tag(schedule, adapter, steps) if isinstance(schedule, str) else resample(schedule, steps)
    adapter.check_schedule(plan)
    pairs = _reuse_pairs(plan.recompute[:, :, 0])  # step -> (branch, key step)
    fits = {step: ChannelFit() for step in pairs}
    branches = {b for b, _ in pairs.values()}
    if quant is not None:
        quant.check(adapter)
        if quant.num_steps != steps:
            raise QuantError(f"the quantization calibration is for {quant.num_steps} steps, the correction for {steps}")
    recorder = _BranchFeatures(branches)
    with recording(pipe, adapter, [recorder], plan.granularity) as executor:
        layer_fits = _QuantErrorFits(adapter, branches, quant, executor, steps) if quant is not None else None
        try:
            for kwargs in tqdm(data.batches(pipe), desc="cache correction", disable=not progress):
                pipe(**kwargs)
                for step, (branch, key) in pairs.items():
                    fits[step].add(recorder.features[(branch, key)], recorder.features[(branch, step)])
        finally:
            if layer_fits is not None:
                layer_fits.remove()
    alpha: list[np.ndarray | None] = [None] * steps
    beta: list[np.ndarray | None] = [None] * steps
    for step, fit in fits.items():
        alpha[step], beta[step] = fit.solve()
    layers = layer_fits.solve() if layer_fits is not None else {}
    return CacheCorrection(adapter.model_info, _plan_key(plan), alpha, beta, layers,
                           quant.key if quant is not None else "")


class _QuantErrorFits:
    """Forward hooks on the quantized convolutions reading the reused branch features: at every step they run the
    layer quantized on the float input and accumulate the per-channel fit of the float output on it."""

    def __init__(self, adapter: Adapter, branches: set[int], quant: QuantCalibration, clock: Executor,
                 steps: int) -> None:
        from .hooks import layer_hook

        index = {name: i for i, name in enumerate(quant.layers)}
        names = {module: name for name, module in adapter.denoiser.named_modules()}
        convs = adapter.feature_readers(branches)
        self.fits = {names[conv]: [ChannelFit() for _ in range(steps)] for conv in convs if names[conv] in index}
        self.handles = []
        for conv in convs:
            name = names[conv]
            if name in self.fits:
                hook, _ = layer_hook(conv, name, index[name], len(quant.layers), quant, clock)
                self.handles.append(conv.register_forward_hook(self._recorder(hook, self.fits[name], clock)))

    @staticmethod
    def _recorder(hook: Any, fits: list[ChannelFit], clock: Executor) -> Any:
        def record(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> None:
            if clock.step < len(fits):
                fits[clock.step].add(hook.new_forward(module, *args), output)
        return record

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()

    def solve(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        solved = {}
        for name, fits in self.fits.items():
            pairs = [fit.solve() for fit in fits]
            solved[name] = (np.stack([a for a, _ in pairs]), np.stack([b for _, b in pairs]))
        return solved


class ChannelFit:
    """Least squares ``y ~ alpha_c * x + beta_c`` per channel (dim 1) over all other dims, from running sums."""

    def __init__(self) -> None:
        self.sums: list[torch.Tensor] | None = None

    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        dims = [d for d in range(x.dim()) if d != 1]
        x, y = x.double(), y.double()
        moments = [x.sum(dims), y.sum(dims), (x * x).sum(dims), (x * y).sum(dims),
                   torch.tensor(float(x.numel() // x.shape[1]), dtype=torch.float64)]
        self.sums = moments if self.sums is None else [a + b for a, b in zip(self.sums, moments)]

    def solve(self) -> tuple[np.ndarray, np.ndarray]:
        sx, sy, sxx, sxy, n = self.sums
        mx, my = sx / n, sy / n
        var = sxx / n - mx * mx
        alpha = torch.where(var > 1e-12, (sxy / n - mx * my) / var.clamp_min(1e-12), torch.ones_like(var))
        return alpha.float().numpy(), (my - alpha * mx).float().numpy()


def _reuse_pairs(bits: np.ndarray) -> dict[int, tuple[int, int]]:
    """For each step that reuses a branch: (the branch, the last earlier step that computed it)."""
    pairs = {}
    for step in range(1, len(bits)):
        reused = np.flatnonzero(~bits[step])
        if len(reused):
            branch = int(reused[0])
            key = max(k for k in range(step) if bits[k, branch])
            pairs[step] = (branch, key)
    return pairs


def _plan_key(schedule: Schedule) -> str:
    return "|".join("".join("1" if b else "0" for b in row) for row in schedule.recompute[:, :, 0])


__all__ = ["CacheCorrection", "fit_cache_correction"]
