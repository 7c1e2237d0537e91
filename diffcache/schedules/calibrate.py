"""Calibration: run the full model on calibration prompts and record how every cached feature drifts over steps.

For each (unit, component) slot the recorder keeps exactly the tensor the executor would cache (a transformer
component's pre-gate output, a block's residual, a UNet branch feature ``F_b``), at every step, and reduces it
to step-by-step distance matrices ``d[a, t]`` = how far the feature at step ``t`` is from the one cached at
step ``a`` (specs/algorithms.md sections 5 and 7): mean absolute difference (CacheQuant's L1) and cosine
distance (BAC). The row ``a`` is "reuse the cache of step a", the diagonal above it the change to the previous
step, the last column the distance to the final step. The result is saved to disk and reused.

Feature distance alone misjudges *where* reuse hurts: an error at an early step is carried through every later
step. With ``sensitivity=True`` calibration also measures, for each step ``t``, how much the final images change
when only step ``t`` reuses every cache (one extra generation per step, on the first batch). Dividing by the
feature change at that step gives a per-step amplification that the DP methods use as a weight, so their
feature-error sum approximates the error in the output.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ..adapters import BLOCK, Adapter, denoiser_of, resolve_adapter
from ..errors import SearchError
from ..eval.cost import cache_root
from ..files import load_npz, save_npz
from ..runtime import QUANT_HOOK, Executor, add_hooks, attach, bind, detach, planned, suspended
from ..schedule import Schedule

logger = logging.getLogger(__name__)

METRICS = ("l1", "cosine")
_FORMAT = "diffcache.calibration/1"


@dataclass(frozen=True)
class CalibrationData:
    """The generations a search looks at: conditions (prompts or class ids), seeds and sampler settings.

    Every candidate schedule is judged on exactly these calls (common random numbers): batch ``i`` uses seed
    ``seed + i``.
    """

    conditions: list[str | int]
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    seed: int = 0
    batch_size: int = 16

    def __post_init__(self) -> None:
        if not self.conditions:
            raise SearchError("calibration needs at least one prompt or class label")
        if self.batch_size < 1:
            raise SearchError(f"batch_size must be >= 1, got {self.batch_size}")
        object.__setattr__(self, "conditions", list(self.conditions))

    def steps(self, pipe: Any) -> int:
        """``num_inference_steps``, or the pipeline's default when unset."""
        if self.num_inference_steps is not None:
            return self.num_inference_steps
        default = inspect.signature(pipe.__call__).parameters.get("num_inference_steps")
        if default is None or not isinstance(default.default, int):
            raise SearchError(f"{type(pipe).__name__} has no default num_inference_steps; pass num_inference_steps")
        return default.default

    def batches(self, pipe: Any) -> list[dict[str, Any]]:
        """Fresh call arguments for each batch (new generators, so every call sees the same noise)."""
        from ..loading import generation_kwargs

        size = self.batch_size
        chunks = [self.conditions[i : i + size] for i in range(0, len(self.conditions), size)]
        return [generation_kwargs(pipe, chunk, self.seed + i, self.steps(pipe), self.guidance_scale)
                for i, chunk in enumerate(chunks)]

    def key(self) -> str:
        """A stable identifier of these generations (for caches and checkpoints)."""
        fields = [self.conditions, self.num_inference_steps, self.guidance_scale, self.seed, self.batch_size]
        return hashlib.sha1(json.dumps(fields, default=str).encode()).hexdigest()[:16]


@dataclass
class Calibration:
    """Feature-drift statistics of one model on one `CalibrationData`.

    Attributes:
        distances: metric (``"l1"``, ``"cosine"``) -> array ``(units, components, steps, steps)``;
            ``[u, c, a, t]`` is the distance between the slot's feature at step ``a`` and at step ``t``
            (symmetric, zero on the diagonal; absent slots are zero).
        scale: ``(units, components)`` mean absolute feature value, to compare L1 across slots.
        step_error: ``(steps,)`` RMS change of the final images when only step ``t`` reuses every slot
            (``None`` unless calibrated with ``sensitivity=True``).
    """

    units: list[str]
    components: list[str]
    present: np.ndarray
    family: str
    model: dict[str, str]
    data_key: str
    distances: dict[str, np.ndarray]
    scale: np.ndarray
    step_error: np.ndarray | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def num_steps(self) -> int:
        return int(self.distances["l1"].shape[-1])

    @property
    def granularity(self) -> str:
        return BLOCK if self.components == [BLOCK] else "component"

    def normalized(self, metric: str) -> np.ndarray:
        """``distances[metric]`` comparable across slots: L1 divided by the slot's feature scale."""
        if metric not in METRICS:
            raise SearchError(f"unknown feature metric {metric!r}; choose from {list(METRICS)}")
        if metric == "l1":
            return self.distances["l1"] / np.maximum(self.scale, 1e-12)[:, :, None, None]
        return self.distances[metric]

    def step_weights(self, metric: str) -> np.ndarray:
        """Per-step amplification of a feature error into the output error (ones without ``step_error``)."""
        steps = self.num_steps
        if self.step_error is None:
            return np.ones(steps)
        change = self.normalized(metric).sum(axis=(0, 1))[np.arange(steps - 1), np.arange(1, steps)]
        weights = np.zeros(steps)
        weights[1:] = self.step_error[1:] / np.maximum(change, 1e-12)
        return weights

    def check_model(self, adapter: Adapter) -> None:
        """Raise `SearchError` unless this calibration was recorded on ``adapter``'s architecture."""
        if self.model != adapter.model_info:
            raise SearchError(
                f"this calibration was recorded on {self.model['class']} (config {self.model['fingerprint']}), not "
                f"on {adapter.model_info['class']} (config {adapter.model_info['fingerprint']}); calibrate again"
            )

    def save(self, path: str | os.PathLike) -> None:
        """Write a single ``.npz`` (arrays plus JSON metadata), atomically."""
        header = {"units": self.units, "components": self.components, "family": self.family, "model": self.model,
                  "data_key": self.data_key, "meta": self.meta}
        extra = {} if self.step_error is None else {"step_error": self.step_error}
        save_npz(path, _FORMAT, header, {"present": self.present, "scale": self.scale,
                                         **{f"d_{m}": d for m, d in self.distances.items()}, **extra})

    @classmethod
    def load(cls, path: str | os.PathLike) -> Calibration:
        """Inverse of :meth:`save`. Raises `SearchError` for a file that is not a diffcache calibration."""
        try:
            meta, data = load_npz(path, _FORMAT)
            distances = {m: data[f"d_{m}"] for m in METRICS}
            return cls(meta["units"], meta["components"], data["present"], meta["family"], meta["model"],
                       meta["data_key"], distances, data["scale"], data.get("step_error"), meta["meta"])
        except (ValueError, KeyError) as err:
            raise SearchError(f"{os.fspath(path)!r} is not a readable diffcache calibration ({err}); "
                              "delete it and calibrate again") from None


class _Recorder(Executor):
    """An executor that runs every slot and hands what it would cache to the recorder instead of a store."""

    def __init__(self, adapter: Adapter, granularity: str, pipe: Any, max_elements: int) -> None:
        layout = adapter.layout(granularity)
        self.layout = layout
        present = layout.present if layout.present is not None else np.ones((len(layout.units),
                                                                               len(layout.components)), bool)

        def plan_for(num_steps: int) -> Schedule:
            return Schedule(np.ones((num_steps, *present.shape), bool), layout.units, layout.components, "none",
                            present=layout.present)

        super().__init__(adapter, plan_for, pipe.scheduler, pipe)
        self.present = present
        self.max_elements = max_elements
        self.features: dict[tuple[int, int], list[torch.Tensor]] = {}

    def start_generation(self, num_steps: int) -> None:
        super().start_generation(num_steps)
        self.needed = self.present.tolist()
        self.features = {}

    def put(self, key: Any, value: Any) -> None:
        if key[0] == "F":  # a UNet branch feature and its memory format
            slot, value = (key[1], 0), value[0]
        else:
            slot = key
        parts = [v.detach().float().flatten(1) for v in (value if isinstance(value, tuple) else (value,))
                 if v is not None]
        flat = torch.cat(parts, dim=1)
        if flat.shape[1] > self.max_elements:  # a fixed strided subset: distances are means, so it estimates them
            index = torch.linspace(0, flat.shape[1] - 1, self.max_elements).long()
            flat = flat[:, index]
        self.features.setdefault(slot, []).append(flat)


def calibrate(
    pipe: Any,
    data: CalibrationData,
    granularity: str = BLOCK,
    *,
    cache_dir: str | os.PathLike | None = None,
    max_elements: int = 4096,
    sensitivity: bool = True,
    progress: bool = True,
    extra: Sequence[tuple[torch.nn.Module, Any]] = (),
    extra_key: str = "",
) -> Calibration:
    """Record feature drift of ``pipe``'s denoiser (full model, no caching) on ``data``.

    Args:
        granularity: ``"block"`` (UNet branches, transformer block residuals) or ``"component"``.
        cache_dir: where calibrations are kept and looked up (default ``$DIFFCACHE_CACHE/calibration``); the
            file is keyed by the model config, the data and the granularity.
        max_elements: per sample, distances are estimated on at most this many feature elements (fixed stride).
        sensitivity: also measure each step's effect on the output (``steps - 1`` extra generations of the first
            batch); the DP methods then weight feature errors by it.
        extra, extra_key: hooks that run with the model (quantized layers: features of the quantized model) and
            a name for them in the cache key.

    The pipeline must call its denoiser once per CFG branch per step (as diffusers pipelines do); a pipeline
    that is accelerated is run without its cache for the calibration and left accelerated.
    """
    denoiser = denoiser_of(pipe)
    adapter = resolve_adapter(denoiser)
    adapter.layout(granularity)  # raises for a granularity the model does not have
    key = json.dumps([adapter.model_info, data.key(), granularity, max_elements, data.steps(pipe), sensitivity,
                      *([extra_key] if extra_key else [])])
    path = Path(cache_dir or cache_root() / "calibration") / f"{hashlib.sha1(key.encode()).hexdigest()[:20]}.npz"
    if path.exists():
        try:
            cached = Calibration.load(path)
            logger.info("diffcache: reusing calibration %s", path)
            return cached
        except SearchError as err:
            logger.warning("%s; recalibrating", err)

    with suspended(denoiser):
        return _record(pipe, adapter, data, granularity, max_elements, sensitivity, path, progress, extra)


def _record(pipe: Any, adapter: Adapter, data: CalibrationData, granularity: str, max_elements: int,
            sensitivity: bool, path: Path, progress: bool, extra: Sequence[tuple[torch.nn.Module, Any]]
            ) -> Calibration:
    denoiser = adapter.denoiser
    recorder = _Recorder(adapter, granularity, pipe, max_elements)
    attach(denoiser, recorder, granularity)
    add_hooks(denoiser, bind(extra, recorder), QUANT_HOOK)
    shape = recorder.present.shape
    totals = {m: None for m in METRICS}
    scale = np.zeros(shape)
    samples = 0
    batches = data.batches(pipe)
    try:
        for i, kwargs in enumerate(tqdm(batches, desc="calibration", disable=not progress)):
            images = pipe(**kwargs).images
            if i == 0:
                reference = np.asarray(images)
            num_steps = recorder.plan.num_steps
            batch = _reduce(recorder.features, shape, num_steps)
            weight = next(iter(recorder.features.values()))[0].shape[0]
            for m in METRICS:
                totals[m] = batch[m] * weight if totals[m] is None else totals[m] + batch[m] * weight
            scale += batch["scale"] * weight
            samples += weight
            recorder.features = {}
    finally:
        detach(denoiser)
    step_error = None
    if sensitivity:
        step_error = _step_errors(pipe, adapter, recorder, data.batches(pipe)[0], reference, num_steps, progress,
                                  extra)
    layout = recorder.layout
    calibration = Calibration(
        layout.units, layout.components, recorder.present, adapter.family, adapter.model_info, data.key(),
        {m: totals[m] / samples for m in METRICS}, scale / samples, step_error,
        {"granularity": granularity, "num_steps": num_steps, "samples": samples},
    )
    try:
        calibration.save(path)
    except OSError as err:  # a read-only cache only costs a recalibration next time
        logger.debug("could not save the calibration at %s: %s", path, err)
    return calibration


def _step_errors(pipe: Any, adapter: Adapter, recorder: _Recorder, kwargs: dict[str, Any], reference: np.ndarray,
                 num_steps: int, progress: bool, extra: Sequence[tuple[torch.nn.Module, Any]]) -> np.ndarray:
    """RMS change of the final images when step ``t`` alone reuses every slot, for each ``t >= 1``."""
    layout, errors = recorder.layout, np.zeros(num_steps)
    for step in tqdm(range(1, num_steps), desc="step sensitivity", disable=not progress):
        grid = np.ones((num_steps, *recorder.present.shape), dtype=bool)
        grid[step] = ~recorder.present
        with planned(pipe, adapter, Schedule(grid, layout.units, layout.components, present=layout.present), extra):
            kwargs["generator"].manual_seed(kwargs["generator"].initial_seed())
            images = np.asarray(pipe(**kwargs).images)
        errors[step] = float(np.sqrt(np.mean((images.astype(np.float64) - reference) ** 2)))
    return errors


def _reduce(features: dict[tuple[int, int], list[torch.Tensor]], shape: tuple[int, int], num_steps: int
            ) -> dict[str, np.ndarray]:
    """Distance matrices of one batch, averaged over its samples."""
    out = {m: np.zeros((*shape, num_steps, num_steps)) for m in METRICS}
    out["scale"] = np.zeros(shape)
    for (u, c), steps in features.items():
        if len(steps) != num_steps:
            raise SearchError(
                f"slot {u}/{c} was computed {len(steps)} times in a {num_steps}-step generation; calibration needs "
                "one denoiser call per step and CFG branches batched in one call"
            )
        x = torch.stack(steps)  # (steps, samples, elements)
        out["l1"][u, c] = torch.cdist(x.transpose(0, 1), x.transpose(0, 1), p=1).mean(0).numpy() / x.shape[2]
        unit = torch.nn.functional.normalize(x, dim=2)
        cosine = torch.einsum("asd,tsd->ats", unit, unit).mean(2)
        out["cosine"][u, c] = (1 - cosine).clamp_min(0).numpy()
        out["scale"][u, c] = x.abs().mean().item()
    return out


def conditions_from(prompts: Sequence[str | int] | str | os.PathLike, pipe: Any) -> list[str | int]:
    """Prompts or class ids, given as a list or as a prompt file (one per line)."""
    from ..loading import parse_conditions, read_prompt_file

    if isinstance(prompts, os.PathLike) or (isinstance(prompts, str) and os.path.isfile(prompts)):
        return parse_conditions(pipe, read_prompt_file(prompts))
    if isinstance(prompts, str):
        prompts = [prompts]
    return parse_conditions(pipe, [str(p) for p in prompts])


__all__ = ["METRICS", "Calibration", "CalibrationData", "calibrate", "conditions_from"]
