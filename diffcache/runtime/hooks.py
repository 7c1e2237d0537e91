"""The leader hook: on the denoiser, it opens and closes each call's decisions; the followers on units and
components, which obey them, belong to each family's runtime (`runtime/unet.py`, `runtime/transformer.py`).

All hooks subclass diffusers' ``ModelHook`` and are attached per instance through `runtime.attach`. Only the
leader is stateful (it owns the executor's per-generation caches); followers read the executor.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.hooks.hooks import BaseState, ModelHook, StateManager

from ..memory import PeakRSS, trim_heap
from .executor import Executor


class _NoState(BaseState):
    def reset(self, *args, **kwargs) -> None:
        pass


class ContextTracker(StateManager):
    """Receives diffusers' ``cache_context("cond"/"uncond")`` so split-CFG calls get their own caches.

    diffusers' ``_set_cache_context`` pushes the context into every ``StateManager`` attribute of the stateful
    hooks under the model, which is how a pipeline's ``with transformer.cache_context(...)`` reaches us.
    """

    def __init__(self) -> None:
        super().__init__(_NoState)

    @property
    def name(self) -> str | None:
        return self._context.name if self._context is not None else None


class DenoiserHook(ModelHook):
    """Leader on the denoiser: opens and closes each call's decisions."""

    _is_stateful = True

    def __init__(self, executor: Executor) -> None:
        super().__init__()
        self.executor = executor
        self.contexts = ContextTracker()

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        if self.executor.memory_note is None:
            return self._call(args, kwargs)
        stats = self.executor.stats
        if stats.start_rss is None:  # the generation's first call: free heap pages first, so growth shows
            trim_heap()
        with PeakRSS() as peak:
            output = self._call(args, kwargs)
        if peak.bytes is not None:
            stats.start_rss = peak.start if stats.start_rss is None else stats.start_rss
            stats.peak_rss = max(stats.peak_rss or 0, peak.bytes)
        return output

    def _call(self, args: tuple, kwargs: dict) -> Any:
        if not self.executor.begin_call(args, kwargs, self.contexts.name):
            return self.fn_ref.original_forward(*args, **kwargs)
        try:
            return self.fn_ref.original_forward(*args, **kwargs)
        finally:
            self.executor.end_call()

    def reset_state(self, module: torch.nn.Module) -> torch.nn.Module:
        # diffusers calls this at the end of a pipeline call (maybe_free_model_hooks): free the caches.
        self.executor.release()
        return module
