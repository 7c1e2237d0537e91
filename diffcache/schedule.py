"""`Schedule`: the one serializable cache plan every diffcache method produces and the executor runs.

A schedule is a boolean tensor ``recompute[step, unit, component]`` (ARCHITECTURE section 2):
``step`` is the network-call order in one generation (0 = noisiest), ``unit`` a transformer block or a
UNet skip branch, ``component`` a cached sub-module (``attn1``, ``ff``...) or ``"block"``. ``True`` runs the
slot and refreshes its cache, ``False`` reuses the cached output. Step 0 is always ``True``.

On disk it is versioned JSON with one line per step, units separated by spaces and one character per
component (``1`` recompute, ``0`` reuse, ``-`` the unit has no such component), so two schedules diff well.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .errors import ScheduleError
from .files import write_atomic

FORMAT = "diffcache.schedule/1"
FORECAST_ORDERS = (0, 1, 2)  # what a reuse step serves: the cached feature, or its Taylor forecast of that order
_BIT_CHARS = {"1": True, "0": False, "-": None}


@dataclass(frozen=True, eq=False)
class Schedule:
    """A static cache plan: which (step, unit, component) slots recompute and which reuse the cache.

    Args:
        recompute: bool array of shape ``(num_steps, len(units), len(components))``.
        units: unit names as the model's adapter reports them (e.g. ``"transformer_blocks.3"``).
        components: component names (``["block"]`` for block/branch-level caching).
        method: the method that produced the plan (a preset name such as ``"deepcache"``, or a search method).
        params: the method's parameters; for presets they regenerate the plan at another step count.
        model: ``{"class": ..., "fingerprint": ...}`` of the denoiser the plan was made for, or ``None``.
        meta: free-form JSON-native metadata (search scores, resolution, ...).
        present: bool array ``(len(units), len(components))``; ``False`` where a unit lacks a component
            (Flux single blocks have no ``ff_context``). ``None`` means every slot exists.
        forecast: what a reuse step serves: ``0`` the cached feature as computed (DeepCache, FORA, ECAD);
            ``1`` a first-order Taylor forecast from the slot's last two computed values,
            ``F_last + (k - k_last) * (F_last - F_prev) / (k_last - k_prev)`` (TaylorSeer, order 1), which
            keeps two features per slot in memory; ``2`` adds the second-order term from the last three
            (finite differences of the derivatives, ``+ d2 * (k - k_last)^2 / 2``; TaylorSeer's ``max_order=2``),
            three features per slot.
        reuse: the registered reuse mechanism that serves reuse steps (`diffcache.runtime.mechanisms`); empty
            means ``"taylor"`` with a forecast and ``"copy"`` (the cached value) without.

    Raises:
        ScheduleError: wrong shape or dtype, duplicate names, a reuse at step 0, or a reuse in an absent slot.
    """

    recompute: np.ndarray
    units: list[str]
    components: list[str]
    method: str = "custom"
    params: dict[str, Any] = field(default_factory=dict)
    model: dict[str, str] | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    present: np.ndarray | None = None
    forecast: int = 0
    reuse: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.reuse, str):
            raise ScheduleError(f"reuse must be the name of a reuse mechanism (a string), got {self.reuse!r}")
        if self.forecast not in FORECAST_ORDERS or isinstance(self.forecast, bool):
            raise ScheduleError(f"forecast must be 0 (reuse the cached feature), 1 or 2 (Taylor forecast of that "
                                f"order), got {self.forecast!r}")
        recompute = np.asarray(self.recompute)
        if recompute.dtype != np.bool_:
            if recompute.size and not np.isin(recompute, (0, 1)).all():
                raise ScheduleError(
                    f"recompute must hold booleans (True = recompute, False = reuse); got dtype {recompute.dtype} "
                    "with values other than 0/1"
                )
            recompute = recompute.astype(bool)
        units, components = list(self.units), list(self.components)
        expected = (len(units), len(components))
        if recompute.ndim != 3 or recompute.shape[1:] != expected or recompute.shape[0] < 1:
            raise ScheduleError(
                f"recompute has shape {tuple(recompute.shape)}, expected (num_steps >= 1, {expected[0]} units, "
                f"{expected[1]} components) for units {_abbrev(units)} and components {components}"
            )
        for kind, names in (("unit", units), ("component", components)):
            if len(set(names)) != len(names) or not all(isinstance(n, str) and n for n in names):
                raise ScheduleError(f"{kind} names must be unique non-empty strings, got {_abbrev(names)}")
        present = None if self.present is None else np.asarray(self.present, dtype=bool)
        if present is not None:
            if present.shape != expected:
                raise ScheduleError(f"present has shape {present.shape}, expected {expected}")
            if not present.any(axis=1).all():
                raise ScheduleError("every unit needs at least one present component")
            absent_reuse = ~recompute & ~present[None]
            if absent_reuse.any():
                step, unit, comp = np.argwhere(absent_reuse)[0]
                raise ScheduleError(
                    f"step {step}: unit {units[unit]!r} has no component {components[comp]!r}, so it cannot be "
                    "reused; mark absent slots True (or '-' in JSON)"
                )
            if present.all():
                present = None
        if not recompute[0].all():
            unit = int(np.argwhere(~recompute[0])[0][0])
            raise ScheduleError(
                f"step 0 reuses unit {units[unit]!r}, but nothing is cached before the first step; "
                "step 0 must recompute every slot"
            )
        recompute = recompute.copy()
        recompute.flags.writeable = False
        object.__setattr__(self, "recompute", recompute)
        object.__setattr__(self, "units", units)
        object.__setattr__(self, "components", components)
        object.__setattr__(self, "present", present)
        object.__setattr__(self, "params", dict(self.params))
        object.__setattr__(self, "meta", dict(self.meta))

    # ----------------------------------------------------------------------------------------- derived numbers
    @property
    def num_steps(self) -> int:
        """Number of denoiser steps (network calls per CFG branch) the plan covers."""
        return int(self.recompute.shape[0])

    @property
    def present_mask(self) -> np.ndarray:
        """``(units, components)`` bool mask of slots that exist."""
        if self.present is None:
            return np.ones(self.recompute.shape[1:], dtype=bool)
        return self.present

    @property
    def granularity(self) -> str:
        """``"block"`` (whole units: residuals, UNet branches) or ``"component"`` (transformer sub-modules)."""
        return "block" if self.components == ["block"] else "component"

    @property
    def cache_usage_ratio(self) -> float:
        """Fraction of existing (step, unit, component) slots that reuse the cache (CUR, as in L2C/HarmoniCa)."""
        slots = np.broadcast_to(self.present_mask, self.recompute.shape)
        return float((~self.recompute & slots).sum() / slots.sum())

    @property
    def recompute_fraction(self) -> float:
        """``1 - cache_usage_ratio``: the fraction of slots that run."""
        return 1.0 - self.cache_usage_ratio

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Schedule):
            return NotImplemented
        return self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        return (
            f"Schedule(method={self.method!r}, params={self.params}, num_steps={self.num_steps}, "
            f"units={len(self.units)}, components={self.components}, cache_usage_ratio={self.cache_usage_ratio:.3f})"
        )

    # --------------------------------------------------------------------------------------- serialization
    def to_dict(self) -> dict[str, Any]:
        """JSON-native dict (``"format": "diffcache.schedule/1"``), one bit string per step."""
        present = self.present_mask
        steps = []
        for row in self.recompute:
            steps.append(
                " ".join(
                    "".join(("1" if bit else "0") if has else "-" for bit, has in zip(unit_bits, unit_present))
                    for unit_bits, unit_present in zip(row, present)
                )
            )
        return {
            "format": FORMAT,
            "method": self.method,
            "params": self.params,
            "model": self.model,
            "units": self.units,
            "components": self.components,
            "num_steps": self.num_steps,
            "steps": steps,
            "meta": self.meta,
        } | ({"forecast": self.forecast} if self.forecast else {}) | ({"reuse": self.reuse} if self.reuse else {})

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Schedule:
        """Inverse of :meth:`to_dict`; rejects unknown formats and malformed bit strings with `ScheduleError`."""
        if not isinstance(data, dict):
            raise ScheduleError(f"a schedule must be a JSON object, got {type(data).__name__}")
        fmt = data.get("format")
        if fmt != FORMAT:
            raise ScheduleError(f"unknown schedule format {fmt!r}; this diffcache reads {FORMAT!r}")
        missing = [k for k in ("units", "components", "steps") if k not in data]
        if missing:
            raise ScheduleError(f"schedule is missing {missing}; expected keys units, components, steps")
        units, components, steps = data["units"], data["components"], data["steps"]
        if not (isinstance(units, list) and isinstance(components, list) and isinstance(steps, list) and steps):
            raise ScheduleError("units and components must be lists and steps a non-empty list of bit strings")
        if "num_steps" in data and data["num_steps"] != len(steps):
            raise ScheduleError(f"num_steps says {data['num_steps']} but {len(steps)} step lines are given")
        recompute = np.zeros((len(steps), len(units), len(components)), dtype=bool)
        present = None
        for k, line in enumerate(steps):
            groups = line.split() if isinstance(line, str) else None
            if groups is None or len(groups) != len(units) or any(len(g) != len(components) for g in groups):
                raise ScheduleError(
                    f"step {k}: expected {len(units)} space-separated groups of {len(components)} characters "
                    f"from '1', '0', '-', got {line!r}"
                )
            bits = [[_BIT_CHARS.get(ch, "bad") for ch in group] for group in groups]
            if any(b == "bad" for group in bits for b in group):
                raise ScheduleError(f"step {k}: only '1', '0' and '-' are allowed, got {line!r}")
            step_present = np.array([[b is not None for b in group] for group in bits])
            if present is None:
                present = step_present
            elif not np.array_equal(present, step_present):
                raise ScheduleError(f"step {k}: '-' (absent component) positions differ from step 0")
            recompute[k] = [[b is not False for b in group] for group in bits]
        return cls(
            recompute=recompute,
            units=units,
            components=components,
            method=str(data.get("method", "custom")),
            params=dict(data.get("params") or {}),
            model=data.get("model"),
            meta=dict(data.get("meta") or {}),
            present=present,
            forecast=data.get("forecast", 0),
            reuse=data.get("reuse", ""),
        )

    def save(self, path: str | os.PathLike) -> None:
        """Write the plan as JSON (atomically: a crash never leaves a half-written file)."""
        write_atomic(path, json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> Schedule:
        """Read a plan written by :meth:`save`.

        Raises:
            FileNotFoundError: no file at ``path``.
            ScheduleError: the file is not valid schedule JSON.
        """
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except FileNotFoundError:
            raise FileNotFoundError(
                f"no schedule file at {os.fspath(path)!r}; pass an existing JSON path or a preset tag "
                "such as 'deepcache:interval=3'"
            ) from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ScheduleError(f"{os.fspath(path)!r} is not valid JSON ({err}); was the file truncated?") from None
        return cls.from_dict(data)


def _abbrev(names: list[Any], limit: int = 6) -> str:
    names = list(names)
    if len(names) <= limit:
        return str(names)
    return f"[{', '.join(map(repr, names[:3]))}, ..., {', '.join(map(repr, names[-2:]))}] ({len(names)})"
