"""Preset schedules and their tags: ``"none"``, ``"uniform:interval=N"``, ``"deepcache:interval=N,branch=B"``,
``"deepcache:interval=N,mode=quadratic"``, ``"fora:interval=N"``.

A tag is ``name[:key=value,...]``. Presets register with :func:`register_preset`; the parameters a tag may
set are the keyword arguments of the registered function (typed by their defaults), so adding a preset never
means editing a parser. Every tag also takes ``forecast=1`` or ``2`` (serve reuse steps a Taylor forecast of that
order instead of the cached feature, see `Schedule`). A schedule made from a preset keeps ``method``/``params`` and
is regenerated exactly at another step count.
"""

from __future__ import annotations

import inspect
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from ..adapters.base import BLOCK, Adapter, Layout
from ..errors import ScheduleError, SearchError
from ..schedule import Schedule

logger = logging.getLogger(__name__)

PresetFn = Callable[..., np.ndarray]


@dataclass(frozen=True)
class _Preset:
    fn: PresetFn
    granularity: str  # "block" or "component"; a ``granularity`` parameter of fn overrides it
    nested: bool | None  # True: only models whose units are nested shells (UNet branches); False: only flat ones
    defaults: dict[str, Any]


_PRESETS: dict[str, _Preset] = {}


def register_preset(name: str, granularity: str = BLOCK, nested: bool | None = None) -> Callable[[PresetFn], PresetFn]:
    """Register ``fn(layout, num_steps, **params) -> recompute`` under ``name``; ``nested=True`` limits it to
    models whose units are nested shells (`Layout.nested`, a UNet's DeepCache branches), ``False`` to flat ones
    (independent blocks), ``None`` (default) fits both."""

    def decorate(fn: PresetFn) -> PresetFn:
        if name in _PRESETS:
            raise ValueError(f"preset {name!r} is already registered")
        params = list(inspect.signature(fn).parameters.values())[2:]
        defaults = {p.name: p.default for p in params}
        _PRESETS[name] = _Preset(fn, granularity, nested, defaults)
        return fn

    return decorate


def is_preset(method: str) -> bool:
    return method in _PRESETS


def preset_names() -> list[str]:
    return sorted(_PRESETS)


def format_tag(method: str, params: dict[str, Any]) -> str:
    return method + (":" + ",".join(f"{k}={v}" for k, v in params.items()) if params else "")


def parse_tag(tag: str) -> tuple[str, dict[str, Any]]:
    """Split ``"deepcache:interval=3,branch=0"`` into the preset name and typed parameters."""
    if not isinstance(tag, str) or not tag.strip():
        raise ScheduleError(f"a schedule tag must be a non-empty string, got {tag!r}")
    name, _, rest = tag.strip().partition(":")
    if name not in _PRESETS:
        raise ScheduleError(
            f"unknown schedule tag {name!r}; known presets: {preset_names()} (or pass a Schedule or a JSON path)"
        )
    defaults = _PRESETS[name].defaults | {"forecast": 0}
    params: dict[str, Any] = {}
    for item in filter(None, (s.strip() for s in rest.split(","))):
        key, eq, value = item.partition("=")
        if not eq or key not in defaults:
            raise ScheduleError(f"tag {tag!r}: {item!r} is not key=value with key in {sorted(defaults)}")
        default = defaults[key]
        kind = type(default) if default is not None else int
        try:
            params[key] = kind(value)
        except ValueError:
            raise ScheduleError(f"tag {tag!r}: {key} must be {kind.__name__}, got {value!r}") from None
    return name, params


def _granularity(preset: _Preset, params: dict[str, Any]) -> str:
    return params.get("granularity", preset.defaults.get("granularity", preset.granularity))


def build_from_tag(tag: str, adapter: Adapter, num_steps: int) -> Schedule:
    """The preset plan ``tag`` for ``adapter``'s model at ``num_steps`` steps."""
    name, params = parse_tag(tag)
    preset = _PRESETS[name]
    if preset.nested is not None and adapter.layout(BLOCK).nested != preset.nested:
        kind = "nested units (a UNet's skip branches)" if preset.nested else "independent blocks (transformers)"
        raise ScheduleError(
            f"preset {name!r} applies to denoisers with {kind}, but {type(adapter.denoiser).__name__}'s are not; "
            "try 'fora:interval=N' or 'uniform:interval=N' for transformers, 'deepcache:interval=N' for UNets"
        )
    layout = adapter.layout(_granularity(preset, params))
    schedule = _build(name, params, layout, num_steps, adapter.model_info)
    _warn_if_pointless(tag, schedule, params)
    return schedule


def _warn_if_pointless(tag: str, schedule: Schedule, params: dict[str, Any]) -> None:
    """A preset that reuses nothing (caching changes nothing) or recomputes nothing after its warm-up."""
    steps = schedule.num_steps
    if schedule.method != "none" and schedule.cache_usage_ratio == 0:
        logger.warning("%r reuses nothing at %d steps (warmup=%s covers them all): caching changes nothing; lower "
                       "the warm-up", tag, steps, params.get("warmup", 1))
    elif isinstance(params.get("interval"), int) and params["interval"] >= steps:
        logger.warning("%r: interval %d >= the %d steps, so after the warm-up no step refreshes the cache (%.0f%% "
                       "reuse); quality collapses, pick an interval well below the step count", tag, params["interval"],
                       steps, 100 * schedule.cache_usage_ratio)


def from_tag(tag: str, model: torch.nn.Module | Adapter, num_steps: int = 50) -> Schedule:
    """A preset plan for a denoiser or adapter: ``from_tag("fora:interval=3", pipe.transformer)``."""
    from ..adapters import resolve_adapter

    adapter = model if isinstance(model, Adapter) else resolve_adapter(model)
    return build_from_tag(tag, adapter, num_steps)


def tag_of(schedule: Schedule) -> str | None:
    """The preset tag that regenerates ``schedule`` (``"deepcache:interval=3,branch=0"``), or ``None``."""
    return format_tag(schedule.method, schedule.params) if is_preset(schedule.method) else None


def resample(schedule: Schedule, num_steps: int) -> Schedule:
    """The plan for another step count (a new object; ``schedule`` is unchanged).

    Presets are regenerated exactly from their parameters (unless their bits were edited by hand, which makes
    them custom plans). Other plans (searched ones) are mapped on the normalized time axis: old step ``k`` lands
    on new step ``floor(k * num_steps / schedule.num_steps)``, a new step recomputes a slot if any old step
    landing on it did, and step 0 always recomputes. Going to fewer steps therefore keeps every refresh (more
    recompute, never less); going to more steps keeps the refreshes at the same relative times. A warning is
    logged because a searched plan was optimized for its own step count.

    Raises:
        ScheduleError: ``num_steps`` is not a positive int.
    """
    if not isinstance(num_steps, int) or num_steps < 1:
        raise ScheduleError(f"num_steps must be a positive int, got {num_steps!r}")
    if num_steps == schedule.num_steps:
        return schedule
    if is_preset(schedule.method) and regenerate(schedule, schedule.num_steps) == schedule:
        return regenerate(schedule, num_steps)
    new = np.zeros((num_steps,) + schedule.recompute.shape[1:], dtype=bool)
    targets = (np.arange(schedule.num_steps) * num_steps) // schedule.num_steps
    for old, target in enumerate(targets):
        new[target] |= schedule.recompute[old]
    new[0] = True
    new |= ~schedule.present_mask[None]
    result = replace(schedule, recompute=new, meta=dict(schedule.meta, resampled_from=schedule.num_steps))
    logger.warning(
        "Schedule %r was made for %d steps and is resampled to %d: cache usage %.0f%% -> %.0f%%, key steps %d -> %d "
        "(%s). It was not searched for this step count; re-run `diffcache search` at %d steps for the best "
        "quality/speed.",
        schedule.method, schedule.num_steps, num_steps, 100 * schedule.cache_usage_ratio,
        100 * result.cache_usage_ratio, int(schedule.recompute.all(axis=(1, 2)).sum()),
        int(new.all(axis=(1, 2)).sum()),
        "more steps reuse between the same refreshes" if num_steps > schedule.num_steps
        else "every refresh is kept, so more is recomputed", num_steps,
    )
    return result


def regenerate(schedule: Schedule, num_steps: int) -> Schedule:
    """Rebuild a preset schedule at another step count (same units, components, params)."""
    layout = Layout("", schedule.units, schedule.components, schedule.present)
    built = _build(schedule.method, schedule.params, layout, num_steps, schedule.model, schedule.meta,
                   schedule.forecast)
    return replace(built, reuse=schedule.reuse) if schedule.reuse else built


def whole_steps(layout: Layout, key: np.ndarray, method: str = "whole-steps") -> Schedule:
    """The plan whose ``key`` steps compute every slot and whose other steps reuse every slot that exists
    (TaylorSeer's compute pattern; with only step 0 as key, the cheapest plan there is)."""
    key = np.asarray(key, dtype=bool)
    present = layout.present if layout.present is not None else np.ones((len(layout.units), len(layout.components)),
                                                                          bool)
    recompute = key[:, None, None] | ~present[None]
    return Schedule(recompute, layout.units, layout.components, method, present=layout.present)


def _build(
    name: str,
    params: dict[str, Any],
    layout: Layout,
    num_steps: int,
    model: dict[str, str] | None,
    meta: dict[str, Any] | None = None,
    forecast: int | None = None,
) -> Schedule:
    if not isinstance(num_steps, int) or num_steps < 1:
        raise ScheduleError(f"num_steps must be a positive int, got {num_steps!r}")
    shape_params = {k: v for k, v in params.items() if k != "forecast"}
    recompute = np.asarray(_PRESETS[name].fn(layout, num_steps, **shape_params), dtype=bool)
    if layout.present is not None:
        recompute = recompute | ~layout.present[None]
    return Schedule(recompute, layout.units, layout.components, name, params, model, meta or {}, layout.present,
                    params.get("forecast", 0) if forecast is None else forecast)


def _grid(layout: Layout, num_steps: int) -> np.ndarray:
    return np.ones((num_steps, len(layout.units), len(layout.components)), dtype=bool)


def _check_interval(interval: int) -> None:
    if interval < 1:
        raise ScheduleError(f"interval must be >= 1 (1 = recompute every step), got {interval}")


def _every(num_steps: int, interval: int, warmup: int = 1) -> np.ndarray:
    """Key steps: the first ``warmup`` steps, then every ``interval`` steps after the last of them."""
    _check_interval(interval)
    if warmup < 1:
        raise ScheduleError(f"warmup must be >= 1 (step 0 always computes), got {warmup}")
    steps = np.arange(num_steps)
    return (steps < warmup) | ((steps - warmup + 1) % interval == 0)


@register_preset("none")
def none(layout: Layout, num_steps: int) -> np.ndarray:
    """Recompute everything: identical to the unaccelerated model (a baseline and a correctness check)."""
    return _grid(layout, num_steps)


@register_preset("uniform")
def uniform(layout: Layout, num_steps: int, interval: int = 2, granularity: str = BLOCK, warmup: int = 1
            ) -> np.ndarray:
    """Every unit recomputes at steps 0, N, 2N, ... and reuses its cache in between.

    ``warmup=W`` computes the first W steps in full and counts the interval from the last of them (W = 2 gives a
    forecast its two points right away, as TaylorSeer's warm-up does).

    ``granularity="block"`` caches whole units (on a UNet the whole body but its output head, as diffusers'
    TaylorSeerCache does, i.e. ``deepcache:branch=-1``; a transformer block's residual); ``"component"``
    caches transformer sub-modules.
    """
    if granularity not in (BLOCK, "component"):
        raise ScheduleError(f"granularity must be 'block' or 'component', got {granularity!r}")
    grid = _grid(layout, num_steps)
    grid[~_every(num_steps, interval, warmup)] = False
    return grid


@register_preset("fora", granularity="component", nested=False)
def fora(layout: Layout, num_steps: int, interval: int = 2, warmup: int = 1) -> np.ndarray:
    """FORA: every block's attention and feed-forward outputs (pre-gate) refreshed every N steps (after
    ``warmup`` full steps, as in ``uniform``)."""
    grid = _grid(layout, num_steps)
    grid[~_every(num_steps, interval, warmup)] = False
    return grid


@register_preset("deepcache", nested=True)
def deepcache(
    layout: Layout,
    num_steps: int,
    interval: int = 3,
    branch: int = 0,
    mode: str = "uniform",
    center: int = -1,
    power: float = 1.2,
    warmup: int = 1,
) -> np.ndarray:
    """DeepCache: full steps at key steps; other steps reuse the deep feature of skip branch ``branch``.

    Args:
        interval: N in "1:N" (one full step per N).
        branch: cache branch id, 0 = shallowest (only ``conv_in``/``conv_out`` and the last decoder layer run on
            partial steps); larger keeps more of the UNet fresh (slower, closer to full); -1 reuses the whole body
            and runs only the output head (fastest; the cut of diffusers' TaylorSeerCache).
        mode: ``"uniform"`` (key steps 0, N, 2N, ...) or ``"quadratic"`` (DeepCache's non-uniform 1:N,
            key steps denser around ``center``).
        center: quadratic mode's densest step; default -1 means ``int(0.4 * num_steps)``.
        power: quadratic mode's starting exponent; lowered by 0.02 until ``ceil(T/N)`` distinct key steps fit.
        warmup: uniform mode: full steps before the interval starts counting (as in ``uniform``).
    """
    check_branch(layout.units, branch)
    if mode == "uniform":
        key = _every(num_steps, interval, warmup)
    elif mode == "quadratic":
        _check_interval(interval)
        key = np.zeros(num_steps, dtype=bool)
        key[quadratic_key_steps(num_steps, interval, center if center >= 0 else int(0.4 * num_steps), power)] = True
    else:
        raise ScheduleError(f"deepcache mode must be 'uniform' or 'quadratic', got {mode!r}")
    grid = _grid(layout, num_steps)
    grid[~key, branch_unit(branch):] = False
    return grid


def branch_unit(branch: int) -> int:
    """The UNet unit index of DeepCache's ``cache_branch_id`` (unit 0, branch -1, is the whole body)."""
    return branch + 1


def search_branch(layout: Layout, branch: int) -> int:
    """A search's ``branch`` option: the first unit its reuse steps reuse (a DeepCache branch of nested units; 0
    for flat units, which all reuse). Raises `SearchError` for a bad branch or one given to flat units."""
    if not layout.nested:
        if branch:
            raise SearchError("branch= applies to UNets (DeepCache skip branches); transformers reuse every block")
        return 0
    check_branch(layout.units, branch, SearchError)
    return branch_unit(branch)


def check_branch(units: list[str], branch: int, error: type[Exception] = ScheduleError) -> None:
    """Raise ``error`` unless ``branch`` is a DeepCache branch id of a UNet with these units."""
    deepest = len(units) - 2
    if not -1 <= branch <= deepest:
        raise error(
            f"branch must be in -1..{deepest} for this UNet (0 = shallowest DeepCache branch; -1 = the whole body, "
            f"only the output head runs; {deepest} = mid block only: {units[-1]}), got {branch}"
        )


def quadratic_key_steps(num_steps: int, interval: int, center: int, power: float) -> list[int]:
    """DeepCache's non-uniform key steps (sign-preserving power spacing around ``center``)."""
    count = math.ceil(num_steps / interval)
    if count >= num_steps:
        return list(range(num_steps))
    if not 0 <= center <= num_steps:
        raise ScheduleError(f"center must be in 0..{num_steps}, got {center}")
    p = power
    while p > 1:
        axis = np.linspace(-(center ** (1 / p)), (num_steps - center) ** (1 / p), count + 1)
        points = np.sign(axis) * np.abs(axis) ** p + center
        inner = sorted({int(x) for x in points})[1:-1]
        steps = sorted({0, *inner})
        if len(steps) == count and steps[-1] < num_steps:
            return steps
        p -= 0.02
    raise ScheduleError(
        f"no quadratic DeepCache schedule with {count} key steps in {num_steps} steps (center {center}, "
        f"power {power}); raise power or use mode=uniform"
    )
