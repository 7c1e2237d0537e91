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
from ..data import CalibrationData
from ..errors import SearchError
from ..files import cache_root, load_npz, save_npz
from ..runtime import Observer, planned, recording, suspended
from ..schedule import Schedule

logger = logging.getLogger(__name__)

METRICS = ("l1", "cosine")
_FORMAT = "diffcache.calibration/1"


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
    nested: bool  # the units are nested shells (`Layout.nested`): a step reuses a suffix of them
    model: dict[str, str]
    data_key: str
    distances: dict[str, np.ndarray]
    scale: np.ndarray
    step_error: np.ndarray | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.nested, bool):
            raise TypeError(f"Calibration.nested is a bool (the units are nested shells), got {self.nested!r}")

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
        adapter.check_made_for(self.model, "this calibration", "calibrate again", SearchError)

    def save(self, path: str | os.PathLike) -> None:
        """Write a single ``.npz`` (arrays plus JSON metadata), atomically."""
        header = {"units": self.units, "components": self.components, "nested": self.nested, "model": self.model,
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
            return cls(meta["units"], meta["components"], data["present"], meta["nested"], meta["model"],
                       meta["data_key"], distances, data["scale"], data.get("step_error"), meta["meta"])
        except (ValueError, KeyError) as err:
            raise SearchError(f"{os.fspath(path)!r} is not a readable diffcache calibration ({err}); "
                              "delete it and calibrate again") from None


class _FeatureDrift(Observer):
    """Keeps, per slot and step, a fixed strided subset of what the executor would cache (the full model runs)."""

    def __init__(self, max_elements: int) -> None:
        self.max_elements = max_elements
        self.features: dict[tuple[int, int], list[torch.Tensor]] = {}

    def start(self, executor: Any, num_steps: int) -> None:
        self.features = {}

    def observe(self, executor: Any, key: tuple[int, int], value: Any) -> None:
        parts = [v.detach().float().flatten(1) for v in (value if isinstance(value, tuple) else (value,))
                 if v is not None]
        flat = torch.cat(parts, dim=1)
        if flat.shape[1] > self.max_elements:  # a fixed strided subset: distances are means, so it estimates them
            index = torch.linspace(0, flat.shape[1] - 1, self.max_elements).long()
            flat = flat[:, index]
        self.features.setdefault(key, []).append(flat)


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
    layout = adapter.layout(granularity)
    present = layout.present if layout.present is not None else np.ones((len(layout.units),
                                                                           len(layout.components)), bool)
    drift = _FeatureDrift(max_elements)
    totals = {m: None for m in METRICS}
    scale = np.zeros(present.shape)
    samples = 0
    batches = data.batches(pipe)
    with recording(pipe, adapter, [drift], granularity, extra) as executor:
        for i, kwargs in enumerate(tqdm(batches, desc="calibration", disable=not progress)):
            outputs = data.generate(pipe, kwargs)
            if i == 0:
                reference = outputs
            num_steps = executor.plan.num_steps
            batch = _reduce(drift.features, present.shape, num_steps)
            weight = next(iter(drift.features.values()))[0].shape[0]
            for m in METRICS:
                totals[m] = batch[m] * weight if totals[m] is None else totals[m] + batch[m] * weight
            scale += batch["scale"] * weight
            samples += weight
            drift.features = {}
    step_error = None
    if sensitivity:
        step_error = _step_errors(pipe, adapter, layout, present, data, reference, num_steps, progress, extra)
    calibration = Calibration(
        layout.units, layout.components, present, layout.nested, adapter.model_info, data.key(),
        {m: totals[m] / samples for m in METRICS}, scale / samples, step_error,
        {"granularity": granularity, "num_steps": num_steps, "samples": samples},
    )
    try:
        calibration.save(path)
    except OSError as err:  # a read-only cache only costs a recalibration next time
        logger.debug("could not save the calibration at %s: %s", path, err)
    return calibration


def _step_errors(pipe: Any, adapter: Adapter, layout: Any, present: np.ndarray, data: CalibrationData,
                 reference: np.ndarray, num_steps: int, progress: bool, extra: Sequence[tuple[torch.nn.Module, Any]]
                 ) -> np.ndarray:
    """How far the final outputs move (`CalibrationData.compare`, RMS by default) when step ``t`` alone reuses
    every slot, for each ``t >= 1``."""
    errors = np.zeros(num_steps)
    kwargs = data.batches(pipe)[0]
    for step in tqdm(range(1, num_steps), desc="step sensitivity", disable=not progress):
        grid = np.ones((num_steps, *present.shape), dtype=bool)
        grid[step] = ~present
        with planned(pipe, adapter, Schedule(grid, layout.units, layout.components, present=layout.present), extra):
            kwargs["generator"].manual_seed(kwargs["generator"].initial_seed())
            outputs = data.generate(pipe, kwargs)
        errors[step] = data.compare(outputs, reference)
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


__all__ = ["METRICS", "Calibration", "calibrate"]
