"""The public verbs: `accelerate`, `restore`, `accelerated`, `summary`."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

import torch

from .adapters import Adapter, denoiser_of, resolve_adapter, uncompiled
from .errors import DiffcacheError, QuantError, UnsupportedModelError
from .quant import CacheCorrection, QuantCalibration, QuantConfig, resolve_quant
from .runtime import (
    QUANT_HOOK,
    CacheSummary,
    Executor,
    add_hooks,
    attach,
    bind,
    check_detachable,
    detach,
    find_attachment,
    suspended,
)
from .runtime.mechanisms import mechanism_class
from .runtime.slicing import SliceConfig, slice_hooks
from .schedule import Schedule
from .schedules.presets import build_from_tag, resample, tag_of

logger = logging.getLogger(__name__)

Pipeline = TypeVar("Pipeline")
ScheduleLike = Schedule | str | os.PathLike

_VALIDATION_STEPS = 50  # step count at which a tag is built once up front, so bad tags fail in accelerate()


def accelerate(
    pipe: Pipeline,
    schedule: ScheduleLike,
    *,
    units: str | Sequence[str] | None = None,
    quant: QuantConfig | QuantCalibration | str | os.PathLike | None = None,
    correction: CacheCorrection | str | os.PathLike | None = None,
    keep_float_weights: bool = True,
    memory: str | SliceConfig | None = None,
    calibration: Sequence[str | int] | str | os.PathLike | None = None,
    num_inference_steps: int | None = None,
    guidance_scale: float | None = None,
) -> Pipeline:
    """Make ``pipe`` run with feature caching; the pipeline is changed **in place** and returned.

    Args:
        pipe: a diffusers pipeline with a ``unet`` or ``transformer`` and a ``scheduler``; or a denoiser
            ``nn.Module`` outside any pipeline (a diffusion policy, a video model), whose loop then marks
            generations and steps with `diffcache.runtime.generation`.
        schedule: a `Schedule`, a path to a schedule JSON file, or a preset tag such as
            ``"deepcache:interval=3,branch=0"``, ``"fora:interval=2"``, ``"uniform:interval=2"`` or ``"none"``.
            A schedule made for another step count is resampled (presets exactly, searched plans with a warning).
        units: glob patterns over the denoiser's module names (``"blocks.*"``) to cache those modules as whole
            blocks, for denoisers no built-in adapter knows.
        quant: also quantize the denoiser's Linear/Conv2d layers: a `diffcache.quant.QuantCalibration` (or the
            path of a saved one) for weights and per-step activations, or the weight-only preset ``"w8"``.
            8-bit layers run real int8 where a kernel exists (Linear and Conv2d with oneDNN on CPU, Linear with
            `torch._int_mm` on CUDA; float32 or bf16 models), the rest in simulation; `summary` says which.
        correction: a `diffcache.quant.CacheCorrection` (or its saved path) fitted for this schedule: CacheQuant's
            per-step, per-channel correction of the reused UNet branch feature, and, if it was fitted with
            ``quant=``, of the quantization error of the convolutions reading it (then pass that same ``quant``).
        calibration, num_inference_steps, guidance_scale: with a ``quant`` config or preset name (``"w8a8"``),
            calibrate it here on these prompts or class ids along ``schedule``'s trajectory, as
            `diffcache.quant.calibrate` does, for the step count and guidance you will generate with (a
            calibration holds for exactly that step count; default: the pipeline's). One call instead of two;
            calibrate separately to save the calibration and reuse it.
        memory: ``"sliced"`` (or ``"sliced:frames=2,tokens=1024"``, a `SliceConfig`): Streamlined Inference's
            Feature Slicer and Operator Grouping for video models, each cut layer run chunk by chunk (per-frame
            layers over frames, temporal layers over positions, feed-forwards over tokens) so that no full-size
            intermediate exists; the output equals the unsliced one up to float rounding. `summary` then reports
            the peak resident memory of the denoiser calls.
        keep_float_weights: with ``quant``, keep the quantized layers' float weights beside their int8 ones (the
            default), so `restore` is exact. ``False`` frees them, so the weights really shrink (int8 layers to a
            quarter of float32); the pipeline then cannot be restored or accelerated again (reload the model).

    Calling it on an already accelerated pipeline replaces the plan. `restore` undoes it bit-exactly.

    Raises:
        ScheduleError: the schedule is malformed or does not fit this model.
        UnsupportedModelError: no adapter applies to the denoiser (the message says how to pass ``units=``).
        QuantError: ``quant`` is unknown, unreadable, or calibrated for another model.
        AccelerationStateError: the pipeline's float weights were released by an earlier call.
        SliceError: ``memory`` is malformed, or asks to cut layers this model mixes (frames of a full-attention
            video transformer).
    """
    denoiser, scheduler = _parts(pipe)
    check_detachable(denoiser)
    adapter = resolve_adapter(denoiser, units)
    plan_for, granularity = _plan_source(schedule, adapter)
    sliced, memory_note = _slicing(adapter, memory)
    quant = resolve_quant(quant)
    if calibration is not None:
        quant = _calibrated(pipe, quant, calibration, schedule, num_inference_steps, guidance_scale)
    if correction is not None and not isinstance(correction, CacheCorrection):
        correction = CacheCorrection.load(correction)
    if correction is not None:
        correction.check(adapter, plan_for(correction.num_steps))
        correction.check_quant(quant)
    hooks, quant_note = [], None
    if quant is not None:  # built before anything changes, so a bad quantization leaves the pipeline as it was
        from .quant.hooks import quant_hooks

        hooks, quant_note = quant_hooks(adapter, quant, None)
        if correction is not None:
            correction.correct_layers(hooks)
        logger.info("diffcache: %s", quant_note)
    if quant is not None and not keep_float_weights:
        from .quant.hooks import float_weight_bytes

        quant_note += f"; float weights released ({float_weight_bytes(hooks) / 2**20:.1f} MiB freed)"
    executor = Executor(adapter, plan_for, scheduler, pipe if scheduler is not None else None,
                        correction=correction, quant_note=quant_note, memory_note=memory_note)
    bind(hooks, executor)
    detach(denoiser)
    attach(denoiser, executor, granularity, sliced)
    add_hooks(denoiser, hooks, QUANT_HOOK)
    if quant is not None and not keep_float_weights:
        from .quant.hooks import release_float_weights

        release_float_weights(hooks)
        find_attachment(denoiser).released = True
    if quant is not None:
        # The float weights just freed and the float copies the kernels were prepared from (and a calibration's
        # temporaries) sit as free blocks in glibc's heap, resident until trimmed: 1.4-1.9 GB at SD1.5 size.
        from .memory import trim_heap

        freed = trim_heap()
        if freed:
            logger.info("diffcache: %.0f MiB of freed memory returned to the system", freed / 2**20)
    logger.info("diffcache: %s accelerated with %s", type(denoiser).__name__, _describe(schedule))
    return pipe


def _slicing(adapter: Adapter, memory: str | SliceConfig | None) -> tuple[list, str | None]:
    """The memory-slicing hooks ``memory`` asks for (checked against the model) and their `summary` line."""
    if memory is None:
        return [], None
    config = SliceConfig.parse(memory)
    targets = adapter.slice_targets()
    config.check(targets, type(adapter.denoiser).__name__)
    hooks = slice_hooks(targets, config)
    return hooks, config.describe(hooks)


def _calibrated(pipe: Pipeline, quant: Any, prompts: Any, schedule: ScheduleLike, steps: int | None,
                guidance: float | None) -> Any:
    """``accelerate(..., quant="w8a8", calibration=prompts)``: the calibration `quant.calibrate` would make."""
    from .quant import calibrate

    if quant is None:
        raise QuantError("calibration= calibrates a quantization: pass quant= too (e.g. quant='w8a8')")
    if isinstance(quant, QuantCalibration):
        raise QuantError("quant= is already a calibration; drop calibration= (or pass the config name to recalibrate)")
    assert isinstance(quant, QuantConfig)
    if isinstance(schedule, (str, os.PathLike)) and os.path.isfile(schedule):
        schedule = Schedule.load(schedule)
    along = schedule if isinstance(schedule, (Schedule, str)) and schedule != "none" else None
    return calibrate(pipe, prompts, quant, schedule=along, num_inference_steps=steps, guidance_scale=guidance)


def restore(pipe: Pipeline) -> Pipeline:
    """Remove every diffcache hook and wrapper from ``pipe`` (in place); outputs are bit-identical to never
    having accelerated it, and cached tensors are freed. A pipeline that is not accelerated is left as is.
    Raises `AccelerationStateError` (and changes nothing) if ``keep_float_weights=False`` freed the float weights.

    A ``torch.compile``'d denoiser keeps graphs specialized to the cached steps; call ``torch._dynamo.reset()``
    after restoring it, or dynamo may hit its recompile limit and run parts of it uncompiled."""
    denoiser, _ = _parts(pipe)
    detach(denoiser)
    return pipe


@contextmanager
def accelerated(pipe: Pipeline, schedule: ScheduleLike, **kwargs: Any) -> Iterator[Pipeline]:
    """``with diffcache.accelerated(pipe, "deepcache:interval=3"): pipe(...)``; on exit the pipeline is back
    to what it was before (unaccelerated, or its previous plan)."""
    denoiser, _ = _parts(pipe)
    with suspended(denoiser):
        accelerate(pipe, schedule, **kwargs)
        yield pipe


def summary(pipe: Pipeline) -> CacheSummary:
    """Per-unit/step compute and reuse counts of the last generation, cache memory, and the plan's CUR.

    ``print(diffcache.summary(pipe))`` shows a table.

    Raises:
        DiffcacheError: ``pipe`` is not accelerated.
    """
    denoiser, _ = _parts(pipe)
    attachment = find_attachment(denoiser)
    if attachment is None:
        raise DiffcacheError("this pipeline is not accelerated; call diffcache.accelerate(pipe, schedule) first")
    executor = attachment.executor
    stats, plan = executor.stats, executor.plan
    if plan is None:
        plan = executor.plan_for(_VALIDATION_STEPS)
    return CacheSummary(
        method=plan.method,
        tag=tag_of(plan),
        units=list(plan.units),
        components=list(plan.components),
        num_steps=plan.num_steps,
        computed=stats.computed.copy(),
        reused=stats.reused.copy(),
        denoiser_calls=stats.calls,
        generations=stats.generations,
        planned_cache_usage_ratio=plan.cache_usage_ratio,
        cache_bytes=executor.cache_bytes,
        peak_cache_bytes=executor.peak_cache_bytes,
        schedule=plan,
        quant=executor.quant_note,
        memory=executor.memory_note,
        start_rss_bytes=stats.start_rss,
        peak_rss_bytes=stats.peak_rss,
    )


def _parts(pipe: Any) -> tuple[torch.nn.Module, Any]:
    """The denoiser and the scheduler that counts its steps (``None`` for a bare module: the caller counts)."""
    if isinstance(pipe, torch.nn.Module):
        return uncompiled(pipe), None
    denoiser = denoiser_of(pipe)
    scheduler = getattr(pipe, "scheduler", None)
    if scheduler is None or not callable(getattr(scheduler, "set_timesteps", None)):
        raise UnsupportedModelError(
            f"{type(pipe).__name__} has no scheduler with set_timesteps(); diffcache counts steps through it"
        )
    return denoiser, scheduler


def _plan_source(schedule: ScheduleLike, adapter: Adapter) -> tuple[Callable[[int], Schedule], str]:
    """A per-step-count plan factory (validated now) and the granularity its plans use."""
    if isinstance(schedule, str) and not _is_path(schedule):
        first = build_from_tag(schedule, adapter, _VALIDATION_STEPS)

        def build(num_steps: int) -> Schedule:
            return build_from_tag(schedule, adapter, num_steps)

    else:
        first = schedule if isinstance(schedule, Schedule) else Schedule.load(schedule)

        def build(num_steps: int) -> Schedule:
            return resample(first, num_steps)

    adapter.check_schedule(first)
    mechanism_class(first)  # an unknown reuse mechanism fails here, not in the pipeline's first step
    plans: dict[int, Schedule] = {first.num_steps: first}

    def plan_for(num_steps: int) -> Schedule:
        if num_steps not in plans:
            plans[num_steps] = build(num_steps)
            adapter.check_schedule(plans[num_steps])
        return plans[num_steps]

    return plan_for, first.granularity


def _is_path(text: str) -> bool:
    return text.endswith(".json") or os.sep in text or os.path.exists(text)


def _describe(schedule: ScheduleLike) -> str:
    if isinstance(schedule, Schedule):
        return tag_of(schedule) or f"a {schedule.method} schedule ({schedule.num_steps} steps)"
    return str(schedule)
