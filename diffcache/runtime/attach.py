"""The one attach/detach pair: every diffcache hook and wrapper goes on and comes off here.

Hooks live in diffusers' per-module ``HookRegistry`` under the names below; the scheduler *instance* gets
wrapped ``set_timesteps``/``step`` attributes (never its class). ``detach`` removes exactly what ``attach``
added, deletes registries and ``forward`` attributes that only diffcache created, and invalidates the
registries' cached child lists (diffusers' ``apply_*`` functions forget that, see STYLE.md).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers.hooks import HookRegistry

from ..adapters.base import Adapter
from ..errors import AccelerationStateError
from ..schedule import Schedule
from .executor import Executor
from .hooks import DenoiserHook
from .slicing import SLICE_HOOK

logger = logging.getLogger(__name__)

LEADER_HOOK = "diffcache.denoiser"
QUANT_HOOK = "diffcache.quant"
_SCHEDULER_METHODS = ("set_timesteps", "step")


@dataclass
class Attachment:
    """What `attach` changed, so `detach` can undo exactly that."""

    executor: Executor
    granularity: str
    hooked: list[tuple[torch.nn.Module, str, bool]] = field(default_factory=list)  # module, hook, new registry
    scheduler_saved: dict[str, Any] = field(default_factory=dict)
    extra: list[tuple[torch.nn.Module, Any, str]] = field(default_factory=list)  # `add_hooks`'s, kept for `suspended`
    inner: list[tuple[torch.nn.Module, Any]] = field(default_factory=list)  # hooks inside the cache hooks (slicing)
    released: bool = False  # the quantized layers' float weights were freed: nothing to detach back to


def check_detachable(denoiser: torch.nn.Module) -> None:
    """Raise `AccelerationStateError` if ``denoiser`` cannot run unaccelerated any more (its float weights were
    released)."""
    attachment = find_attachment(denoiser)
    if attachment is not None and attachment.released:
        raise AccelerationStateError(
            "the float weights of this quantized denoiser were released (accelerate(..., keep_float_weights=False)), "
            "so it cannot be restored, suspended or accelerated again; reload the model (from_pretrained) for that"
        )


def attach(denoiser: torch.nn.Module, executor: Executor, granularity: str,
           inner: Sequence[tuple[torch.nn.Module, Any]] = ()) -> Attachment:
    """Install the leader hook, the unit/component hooks for ``granularity`` and the scheduler wrapper.

    ``inner`` hooks (memory slicing) are registered before the unit/component hooks, so they run inside them: a
    reused unit skips them, a computed one runs through them."""
    attachment = Attachment(executor, granularity, inner=list(inner))
    leader = DenoiserHook(executor)
    leader.attachment = attachment
    _register(attachment, denoiser, leader, LEADER_HOOK)
    for module, hook in attachment.inner:
        _register(attachment, module, hook, SLICE_HOOK)
    for module, hook, name in executor.family.hooks(granularity):
        _register(attachment, module, hook, name)
    HookRegistry.check_if_exists_or_initialize(denoiser).invalidate_child_registries_cache()
    if executor.scheduler is not None:
        _wrap_scheduler(attachment)
    logger.debug("diffcache: %d hooks attached to %s", len(attachment.hooked), type(denoiser).__name__)
    return attachment


def add_hooks(denoiser: torch.nn.Module, hooks: list[tuple[torch.nn.Module, Any]], name: str) -> None:
    """Put more hooks (e.g. quantized layers) under ``denoiser``'s attachment, so `detach` removes them too."""
    attachment = find_attachment(denoiser)
    if attachment is None:
        raise AccelerationStateError("add_hooks needs an attached denoiser; call attach first")
    for module, hook in hooks:
        _register(attachment, module, hook, name)
        attachment.extra.append((module, hook, name))
    HookRegistry.check_if_exists_or_initialize(denoiser).invalidate_child_registries_cache()


def find_attachment(denoiser: torch.nn.Module) -> Attachment | None:
    registry = getattr(denoiser, "_diffusers_hook", None)
    hook = registry.get_hook(LEADER_HOOK) if registry is not None else None
    return hook.attachment if hook is not None else None


def detach(denoiser: torch.nn.Module) -> Executor | None:
    """Remove everything `attach` and `add_hooks` added to ``denoiser``; returns its executor, or None if nothing
    was attached. Raises `AccelerationStateError` where the float weights were released (see `check_detachable`)."""
    check_detachable(denoiser)
    attachment = find_attachment(denoiser)
    if attachment is None:
        return None
    for module, name, created in reversed(attachment.hooked):
        registry = module._diffusers_hook
        registry.remove_hook(name, recurse=False)
        if not registry.hooks:
            # remove_hook leaves the original bound method as an instance attribute; drop it.
            if getattr(module.__dict__.get("forward"), "__func__", None) is type(module).forward:
                del module.forward
            if created:
                del module._diffusers_hook
    registry = getattr(denoiser, "_diffusers_hook", None)
    if registry is not None:
        registry.invalidate_child_registries_cache()
    scheduler = attachment.executor.scheduler
    for method in _SCHEDULER_METHODS if scheduler is not None else ():
        if method in attachment.scheduler_saved:
            setattr(scheduler, method, attachment.scheduler_saved[method])
        else:
            scheduler.__dict__.pop(method, None)
    attachment.executor.release()
    return attachment.executor


@contextmanager
def suspended(denoiser: torch.nn.Module) -> Iterator[None]:
    """Run ``denoiser`` unaccelerated inside the block (e.g. to measure the full model); its plan (and its
    quantized layers) come back after."""
    previous = find_attachment(denoiser)
    detach(denoiser)
    try:
        yield
    finally:
        detach(denoiser)
        if previous is not None:
            attach(denoiser, previous.executor, previous.granularity, previous.inner)
            for name in dict.fromkeys(name for _, _, name in previous.extra):
                add_hooks(denoiser, [(m, h) for m, h, n in previous.extra if n == name], name)


@contextmanager
def planned(pipe: Any, adapter: Adapter, schedule: Schedule | Callable[[int], Schedule],
            extra: Sequence[tuple[torch.nn.Module, Any]] = (), observers: Sequence[Any] = ()) -> Iterator[Executor]:
    """Run ``pipe`` with ``schedule`` (whatever the step count; or a step count -> plan function) inside the block,
    and yield its executor: for search loops that try many schedules and for observers, without
    `diffcache.accelerate`'s validation and logging. ``extra`` hooks (e.g. quantized layers, built once) are bound
    to the new executor and attached too. Everything comes off at the end, and ``pipe``'s own plan comes back."""
    plan_for = schedule if callable(schedule) else (lambda _steps: schedule)
    granularity = schedule.granularity if isinstance(schedule, Schedule) else plan_for(1).granularity
    with suspended(adapter.denoiser):
        executor = Executor(adapter, plan_for, pipe.scheduler, pipe, observers=observers)
        attach(adapter.denoiser, executor, granularity)
        add_hooks(adapter.denoiser, bind(extra, executor), QUANT_HOOK)
        yield executor


def bind(hooks: Sequence[tuple[torch.nn.Module, Any]], executor: Executor) -> list[tuple[torch.nn.Module, Any]]:
    """Point hooks that follow an executor's step (those with a ``clock``) at ``executor``."""
    for _, hook in hooks:
        if hasattr(hook, "clock"):
            hook.clock = executor
    return list(hooks)


def _steps_from(scheduler: Any, timestep: Any) -> int | None:
    """How many network calls are left in ``scheduler.timesteps`` from ``timestep`` on (None if not found)."""
    timesteps = getattr(scheduler, "timesteps", None)
    if not isinstance(timesteps, torch.Tensor) or timestep is None:
        return None
    value = torch.as_tensor(timestep).flatten()[:1].to("cpu", timesteps.dtype)
    matches = torch.nonzero(timesteps.to("cpu") == value).flatten()
    return len(timesteps) - int(matches[0]) if len(matches) else None


def _register(attachment: Attachment, module: torch.nn.Module, hook: Any, name: str) -> None:
    created = not hasattr(module, "_diffusers_hook")
    HookRegistry.check_if_exists_or_initialize(module).register_hook(hook, name)
    attachment.hooked.append((module, name, created))


def _wrap_scheduler(attachment: Attachment) -> None:
    executor = attachment.executor
    scheduler = executor.scheduler
    attachment.scheduler_saved = {m: scheduler.__dict__[m] for m in _SCHEDULER_METHODS if m in scheduler.__dict__}
    scheduler.set_timesteps = _SetTimesteps(executor, scheduler, scheduler.set_timesteps)
    scheduler.step = _Step(executor, scheduler, scheduler.step)


class _SchedulerMethod:
    """A scheduler method wrapped for one executor. Objects, not closures, so that a deep copy of the scheduler
    (diffusion-forcing pipelines keep one per frame) gets its *own* method back rather than a function that would
    step the original scheduler's state; see `__deepcopy__`."""

    def __init__(self, executor: Executor, scheduler: Any, original: Callable, primary: bool = True) -> None:
        self.executor, self.scheduler, self.original, self.primary = executor, scheduler, original, primary
        functools.update_wrapper(self, original)

    def __deepcopy__(self, memo: dict) -> Any:
        copied = memo.get(id(self.scheduler))  # the scheduler copy being built, registered before its state
        if copied is None:
            return self
        return type(self)(self.executor, copied, getattr(type(copied), self.original.__name__).__get__(copied),
                          primary=False)


class _SetTimesteps(_SchedulerMethod):
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        result = self.original(*args, **kwargs)
        if self.primary:  # a copy's schedule is not a new generation of the pipeline
            self.executor.start_generation(len(self.scheduler.timesteps))
        return result


class _Step(_SchedulerMethod):
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        executor = self.executor
        if not self.primary:  # one of several copies stepped after the same denoiser call: the step ends once
            result = self.original(*args, **kwargs)
            if executor.calls_in_step:
                executor.end_step()
            return result
        if executor.step == 0:
            remaining = _steps_from(self.scheduler, kwargs.get("timestep", args[1] if len(args) > 1 else None))
            if remaining is not None:
                executor.run_steps(remaining)
        result = self.original(*args, **kwargs)
        executor.end_step()
        return result
