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
from collections.abc import Callable
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
    """The (unit, component) grid a schedule for this model must have.

    ``nested``: the units are nested shells, shallowest first (a UNet's DeepCache branches): reusing a unit
    reuses every deeper one, so a step's bits are a run of ``True`` then ``False``. Otherwise every slot is
    computed or reused on its own (transformer blocks and their components).
    """

    family: str
    units: list[str]
    components: list[str]
    present: np.ndarray | None = None
    nested: bool = False


SLICE_KINDS = ("frames", "positions", "positions-folded", "tokens")


@dataclass(frozen=True)
class SliceRule:
    """A module whose chunks are independent, and how to cut it (`runtime.slicing`; ``kind`` is one of
    `SLICE_KINDS`, ``input`` names the sliced argument)."""

    kind: str
    input: str = "hidden_states"
    companions: tuple[str, ...] = ()
    """Arguments cut with the input: along dim 0 when their batch equals the input's (``frames``), or at the same
    positions (``positions-folded``'s context)."""

    @property
    def axis(self) -> int:
        """The dimension of ``input`` that is cut."""
        return 1 if self.kind in ("tokens", "positions-folded") else 0


class Adapter(ABC):
    """Base class: maps a denoiser to named units (and, for transformers, their components).

    Subclasses set `family` and implement :meth:`layout` and :meth:`slot_modules`; they may extend
    :meth:`check_schedule`. How the family *runs* a plan (its hooks) is its `diffcache.runtime.FamilyRuntime`.
    """

    family: ClassVar[str] = ""
    granularities: ClassVar[tuple[str, ...]] = (BLOCK,)
    routable: ClassVar[bool] = False
    """Every slot is one module whose output a learned router can blend (HarmoniCa's router search)."""

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

    @abstractmethod
    def slot_modules(self, granularity: str = BLOCK) -> dict[tuple[int, int], list[str]]:
        """Names (relative to the denoiser) of the modules a reused (unit, component) slot does not run: what the
        cost model prices."""

    def feature_readers(self, units: set[int]) -> list[torch.nn.Module]:
        """The layers that read the cached features of ``units`` on a reuse step (CacheQuant's quantization-error
        correction fits them).

        Raises:
            UnsupportedModelError: the family has no such correction.
        """
        raise UnsupportedModelError(
            f"the cache correction fits the layers reading a reused UNet branch feature (DeepCache); "
            f"{type(self.denoiser).__name__} is not a UNet"
        )

    def slice_targets(self) -> list[tuple[torch.nn.Module, SliceRule]]:
        """The modules `accelerate(..., memory="sliced")` may run in chunks without changing the math.

        Raises:
            UnsupportedModelError: the family has none (image models: nothing to slice over).
        """
        raise UnsupportedModelError(
            f"memory slicing cuts video models' per-frame layers, temporal layers and feed-forwards; "
            f"{type(self.denoiser).__name__} is not a video model diffcache knows; drop memory="
        )

    def check_made_for(self, model: dict[str, str] | None, what: str, remedy: str,
                       error: type[Exception] = ScheduleError) -> None:
        """Raise ``error`` unless ``model`` (the `model_info` something saved was made for; ``None``: any model)
        is this denoiser's architecture. The one fingerprint check of schedules, calibrations and corrections."""
        if model is not None and model != self.model_info:
            raise error(
                f"{what} was made for {model.get('class')} (config {model.get('fingerprint')}), but this denoiser "
                f"is {self.model_info['class']} (config {self.model_info['fingerprint']}); {remedy}"
            )

    def check_schedule(self, schedule: Schedule) -> None:
        """Raise `ScheduleError` unless ``schedule`` fits this model (units, components, fingerprint)."""
        self.check_made_for(schedule.model, "the schedule",
                            "re-run `diffcache search` for this model, or use a preset tag")
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


def register_adapter(name: str, matches: Callable[[torch.nn.Module], bool],
                     before: str | None = None) -> Callable[[type[Adapter]], type[Adapter]]:
    """Class decorator: register an adapter for denoisers where ``matches(denoiser)`` is true, tried after those
    registered earlier, or just before the adapter named ``before`` (a more specific adapter than it)."""

    def decorate(cls: type[Adapter]) -> type[Adapter]:
        names = [existing for existing, _, _ in _ADAPTERS]
        if name in names:
            raise ValueError(f"an adapter named {name!r} is already registered")
        if before is not None and before not in names:
            raise ValueError(f"no adapter named {before!r} to register {name!r} before; registered: {names}")
        _ADAPTERS.insert(names.index(before) if before is not None else len(_ADAPTERS), (name, matches, cls))
        return cls

    return decorate


def registered_adapters() -> list[tuple[str, Callable[[torch.nn.Module], bool], type[Adapter]]]:
    """``(name, matches, adapter class)`` in registration order (the order `resolve_adapter` tries them)."""
    return list(_ADAPTERS)


def _span(names: list[str]) -> str:
    return names[0] if len(names) == 1 else f"{names[0]} .. {names[-1]}"
