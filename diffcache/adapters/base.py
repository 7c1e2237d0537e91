"""What every adapter provides: the units and components of a denoiser, and the registry that picks one.

An adapter only *describes* a model (ARCHITECTURE section 4); the executor in `diffcache.runtime` attaches
the hooks. Adapters register themselves with :func:`register_adapter`; :func:`resolve_adapter` tries them in
registration order and raises `UnsupportedModelError` naming what it found when none applies.
"""

from __future__ import annotations

import hashlib
import json
import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import numpy as np
import torch

from ..errors import ScheduleError, UnsupportedModelError

if TYPE_CHECKING:
    from ..schedule import Schedule

logger = logging.getLogger(__name__)

BLOCK = "block"
"""Component name of block-level caching (a transformer block's residual, or a UNet branch's deep feature)."""


@dataclass(frozen=True)
class Layout:
    """The (unit, component) grid a schedule for this model must have."""

    family: str
    units: list[str]
    components: list[str]
    present: np.ndarray | None = None


class Adapter(ABC):
    """Base class: maps a denoiser to named units (and, for transformers, their components).

    Subclasses set `family` and implement :meth:`layout`; they may extend :meth:`check_schedule`.
    """

    family: ClassVar[str] = ""
    granularities: ClassVar[tuple[str, ...]] = (BLOCK,)

    def __init__(self, denoiser: torch.nn.Module) -> None:
        self.denoiser = denoiser

    @property
    def model_info(self) -> dict[str, str]:
        """``{"class": ..., "fingerprint": ...}``: identifies the architecture a schedule was made for."""
        return {"class": type(self.denoiser).__name__, "fingerprint": config_fingerprint(self.denoiser)}

    @property
    def unit_names(self) -> list[str]:
        return self.layout(BLOCK).units

    @abstractmethod
    def layout(self, granularity: str = BLOCK) -> Layout:
        """The unit/component grid for ``granularity`` (``"block"`` or ``"component"``)."""

    def prepare_reuse_call(self, kwargs: dict, branch: int | None) -> None:  # noqa: B027 - most need nothing
        """Adjust (in place) the keyword inputs of a denoiser call that reuses cached features, or raise
        `UnsupportedModelError` if caching would get those inputs wrong. ``branch`` is a UNet's cache branch."""

    def check_schedule(self, schedule: Schedule) -> None:
        """Raise `ScheduleError` unless ``schedule`` fits this model (units, components, fingerprint)."""
        model = schedule.model
        if model is not None and model != self.model_info:
            raise ScheduleError(
                f"schedule was made for {model.get('class')} (config {model.get('fingerprint')}), but this denoiser "
                f"is {self.model_info['class']} (config {self.model_info['fingerprint']}); re-run `diffcache search` "
                "for this model, or use a preset tag"
            )
        granularity = schedule.granularity
        if granularity not in self.granularities:
            raise ScheduleError(
                f"{type(self.denoiser).__name__} supports {list(self.granularities)} caching, but the schedule "
                f"has components {schedule.components}"
            )
        expected = self.layout(granularity)
        if schedule.units != expected.units:
            unknown = [u for u in schedule.units if u not in expected.units]
            detail = f"unknown units {unknown[:5]}" if unknown else "units in another order"
            raise ScheduleError(
                f"schedule has {len(schedule.units)} units but {type(self.denoiser).__name__} has "
                f"{len(expected.units)} ({_span(expected.units)}); {detail}. Re-run `diffcache search` for this "
                "model or pass `units=` to match the schedule"
            )
        if schedule.components != expected.components:
            raise ScheduleError(
                f"schedule components {schedule.components} do not match this model's {expected.components}"
            )
        expected_present = expected.present if expected.present is not None else np.ones(
            (len(expected.units), len(expected.components)), dtype=bool
        )
        if not np.array_equal(schedule.present_mask, expected_present):
            raise ScheduleError("schedule marks different (unit, component) slots absent than this model has")


def config_fingerprint(module: torch.nn.Module) -> str:
    """Short hash of a diffusers model's config (architecture, not weights): LoRA or fine-tunes keep it."""
    config = getattr(module, "config", None)
    if config is None:
        payload = repr(module)
    else:
        items = {k: v for k, v in dict(config).items() if not k.startswith("_")}
        payload = json.dumps(items, sort_keys=True, default=str)
    return hashlib.sha1(payload.encode()).hexdigest()[:16]


DENOISER_NAMES = ("transformer", "unet")


def uncompiled(module: torch.nn.Module) -> torch.nn.Module:
    """The module a ``torch.compile(module)`` wrapper holds (hooks go there; the wrapper traces through them)."""
    return getattr(module, "_orig_mod", module)


def denoiser_of(pipe: object) -> torch.nn.Module:
    """The pipeline's denoiser (``pipe.transformer`` or ``pipe.unet``), unwrapped from ``torch.compile``.

    Raises:
        UnsupportedModelError: the pipeline has neither.
    """
    for name in DENOISER_NAMES:
        module = getattr(pipe, name, None)
        if isinstance(module, torch.nn.Module):
            return uncompiled(module)
    raise UnsupportedModelError(
        f"{type(pipe).__name__} has no `unet` or `transformer` module; diffcache.accelerate takes a diffusers "
        "pipeline (e.g. StableDiffusionPipeline, DiTPipeline, FluxPipeline)"
    )


_ADAPTERS: list[tuple[str, Callable[[torch.nn.Module], bool], type[Adapter]]] = []


def register_adapter(name: str, matches: Callable[[torch.nn.Module], bool]) -> Callable[[type[Adapter]], type[Adapter]]:
    """Class decorator: register an adapter for denoisers where ``matches(denoiser)`` is true."""

    def decorate(cls: type[Adapter]) -> type[Adapter]:
        if any(existing == name for existing, _, _ in _ADAPTERS):
            raise ValueError(f"an adapter named {name!r} is already registered")
        _ADAPTERS.append((name, matches, cls))
        return cls

    return decorate


def resolve_adapter(denoiser: torch.nn.Module, units: str | Sequence[str] | None = None) -> Adapter:
    """Pick the adapter for ``denoiser``; ``units`` (glob patterns) forces the generic block adapter.

    Raises:
        UnsupportedModelError: no registered adapter applies; the message names the model's top-level children.
    """
    from .generic import PatternAdapter

    if units is not None:
        return PatternAdapter(denoiser, units)
    for _name, matches, cls in _ADAPTERS:
        if matches(denoiser):
            return cls(denoiser)
    children = [f"{n} ({type(m).__name__})" for n, m in denoiser.named_children()]
    raise UnsupportedModelError(
        f"no diffcache adapter for {type(denoiser).__name__}: expected a UNet2DConditionModel/UNet2DModel or a "
        f"transformer with a ModuleList of blocks (transformer_blocks, single_transformer_blocks, blocks, layers); "
        f"found children {children[:12]}. Pass units='<glob>' (e.g. units='blocks.*') to cache those modules"
    )


def _span(names: list[str]) -> str:
    return names[0] if len(names) == 1 else f"{names[0]} .. {names[-1]}"
