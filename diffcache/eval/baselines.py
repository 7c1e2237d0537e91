"""diffusers' own cache hooks as comparison baselines, applied to a pipeline for the duration of a with-block.

DiT and UNet denoisers are not ``CacheMixin``: nothing sets the cache context or timestep diffusers' hooks read or
resets them between calls, ``apply_*`` has no inverse, and some configurations match nothing or fail cryptically
(``specs/anchor-measurements.md``). :func:`diffusers_cache` supplies that glue and refuses what cannot apply::

    with diffusers_cache(pipe, "first_block_cache", threshold=0.2):
        images = pipe(class_labels=[1, 2], num_inference_steps=25).images
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import io
import logging
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from diffusers import DiffusionPipeline
from diffusers.hooks import (
    FasterCacheConfig,
    FirstBlockCacheConfig,
    HookRegistry,
    MagCacheConfig,
    TaylorSeerCacheConfig,
    apply_faster_cache,
    apply_first_block_cache,
    apply_mag_cache,
    apply_taylorseer_cache,
)
from diffusers.hooks._common import _ALL_TRANSFORMER_BLOCK_IDENTIFIERS
from diffusers.hooks._helpers import TransformerBlockRegistry
from diffusers.hooks.hooks import CacheContext, ModelHook, _set_cache_context

from ..adapters import denoiser_of
from ..errors import DiffcacheError, UnsupportedModelError

logger = logging.getLogger(__name__)

BASELINES: tuple[str, ...] = ("first_block_cache", "taylorseer", "faster_cache", "mag_cache")
CONTEXT_HOOK = "diffcache.baseline_context"
_CONTEXT_NAME = "cond_uncond"  # both pipelines batch the two CFG branches into one denoiser call


class BaselineUnavailable(DiffcacheError, RuntimeError):
    """A diffusers cache baseline does not apply to this pipeline's denoiser."""


class _ContextHook(ModelHook):
    """Outermost hook on the denoiser: gives diffusers' hooks the cache context and timestep of each call."""

    def __init__(self, scheduler: Any) -> None:
        super().__init__()
        self.scheduler = scheduler
        self.step_index = 0  # denoiser calls since the last ``set_timesteps``
        self.timestep: float | None = None  # for FasterCache's ``current_timestep_callback``
        self.calls = 0  # denoiser calls started
        self.generations = 0  # generations whose every step ran

    def pre_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> tuple[tuple, dict]:
        timestep = kwargs.get("timestep", args[1] if len(args) > 1 else None)
        if timestep is None:  # not passed: the scheduler's, assuming one denoiser call per step
            timestep = self.scheduler.timesteps[self.step_index]
        self.timestep = float(torch.as_tensor(timestep).flatten()[0])
        self.calls += 1
        num_steps = len(self.scheduler.timesteps)
        _set_cache_context(module, CacheContext(_CONTEXT_NAME, self.step_index, num_steps, self.timestep))
        return args, kwargs

    def post_forward(self, module: torch.nn.Module, output: Any) -> Any:
        _set_cache_context(module, None)
        self.step_index += 1
        self.generations += self.step_index == len(self.scheduler.timesteps)
        return output


def _block_names(denoiser: torch.nn.Module) -> list[str]:
    """The blocks FirstBlockCache walks: every top-level ModuleList with a name diffusers knows."""
    return [f"{name}.{i}" for name, child in denoiser.named_children()
            if name in _ALL_TRANSFORMER_BLOCK_IDENTIFIERS and isinstance(child, torch.nn.ModuleList)
            for i in range(len(child))]


def _check_blocks(denoiser: torch.nn.Module, name: str) -> None:
    """Refuse a block-list cache (FirstBlockCache, MagCache) where diffusers would find or read no blocks."""
    blocks = _block_names(denoiser)
    if len(blocks) < 2:  # FirstBlockCache fails with "IndexError: pop from empty list", MagCache only warns
        raise BaselineUnavailable(
            f"{name} needs a top-level ModuleList of at least 2 blocks named one of "
            f"{sorted(_ALL_TRANSFORMER_BLOCK_IDENTIFIERS)}; {type(denoiser).__name__} has {blocks or 'none'} "
            f"(UNets have no block list). Use taylorseer or diffcache's own methods instead.")
    try:
        for block in blocks:
            TransformerBlockRegistry.get(type(denoiser.get_submodule(block)))
    except ValueError as error:  # diffusers' "Model class ... not registered."
        raise BaselineUnavailable(f"{name} cannot read this block's outputs: {error}") from error


def _first_block_cache(denoiser: torch.nn.Module, params: dict, context: _ContextHook) -> None:
    _check_blocks(denoiser, "first_block_cache")
    apply_first_block_cache(denoiser, FirstBlockCacheConfig(**params))


def _mag_cache(denoiser: torch.nn.Module, params: dict, context: _ContextHook) -> None:
    _check_blocks(denoiser, "mag_cache")
    if params.get("mag_ratios") is None and not params.get("calibrate"):
        raise ValueError("mag_cache needs this model's mag_ratios (they are checkpoint-dependent): measure them with "
                         "diffcache.eval.baselines.mag_ratios(pipe, call_kwargs) and pass mag_ratios=...")
    if "num_inference_steps" not in params:  # diffusers' default of 28 would stretch the ratios silently
        raise ValueError("mag_cache needs num_inference_steps= (the step count its ratios and retention refer to)")
    apply_mag_cache(denoiser, MagCacheConfig(**params))


def mag_ratios(pipe: DiffusionPipeline, call_kwargs: dict[str, Any]) -> list[float]:
    """MagCache's calibration on ``pipe``: diffusers' own per-step residual magnitude ratios from one full
    generation with ``call_kwargs`` (which must hold ``num_inference_steps``); nothing is skipped meanwhile.

    diffusers prints the ratios and logs them; this reads them from its log record and keeps stdout quiet.
    """
    steps = call_kwargs["num_inference_steps"]
    found: list[list[float]] = []

    class _Catch(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            message = record.getMessage()
            if message.startswith("MagCache Calibration Results:"):
                found.append([float(v) for v in message.split(":", 1)[1].strip(" []").split(",")])

    mag_logger = logging.getLogger("diffusers.hooks.mag_cache")
    handler, level, propagate = _Catch(), mag_logger.level, mag_logger.propagate
    mag_logger.addHandler(handler)
    mag_logger.setLevel(logging.INFO)
    mag_logger.propagate = False  # diffusers' own handler would echo every INFO line of the hook
    try:
        with contextlib.redirect_stdout(io.StringIO()), \
                diffusers_cache(pipe, "mag_cache", calibrate=True, num_inference_steps=steps):
            pipe(**call_kwargs)
    finally:
        mag_logger.removeHandler(handler)
        mag_logger.setLevel(level)
        mag_logger.propagate = propagate
    if len(found) != 1 or len(found[0]) != steps:
        raise BaselineUnavailable(f"mag_cache calibration gave no ratios for {steps} steps (got {found})")
    return found[0]


def _taylorseer_plan(denoiser: torch.nn.Module) -> tuple[list[str], list[str]]:
    """Modules to skip (zeros) and to predict on cached steps: the whole body, predicted at its last block.

    diffusers' defaults (``^transformer_blocks.*attn`` under ``re.fullmatch``) hook nothing on DiT, and its lite
    mode predicts ``proj_out``, which DiT lacks (``proj_out_1``/``proj_out_2``): both silently change nothing.
    """
    blocks = _block_names(denoiser)
    if blocks:
        return blocks[:-1], blocks[-1:]
    if all(getattr(denoiser, name, None) is not None for name in ("down_blocks", "mid_block", "up_blocks")):
        # Down blocks return nested tuples, which TaylorSeer cannot record: skip their layers instead.
        down = [name for name, _ in denoiser.down_blocks.named_modules(prefix="down_blocks") if name.count(".") == 3]
        up = [f"up_blocks.{i}" for i in range(len(denoiser.up_blocks))]
        return [*down, "mid_block", *up[:-1]], up[-1:]
    return [], []


def _taylorseer(denoiser: torch.nn.Module, params: dict, context: _ContextHook) -> None:
    warmup = params.get("disable_cache_before_step", 1)
    if warmup < 1:  # diffusers would fail at step 0: nothing to predict from
        raise ValueError(f"taylorseer: disable_cache_before_step must be >= 1, got {warmup}")
    if not {"skip_predict_identifiers", "cache_identifiers", "use_lite_mode"} & params.keys():
        skip, predict = _taylorseer_plan(denoiser)
        params["skip_predict_identifiers"] = [re.escape(name) for name in skip]
        params["cache_identifiers"] = [re.escape(name) for name in predict]
    if params.get("use_lite_mode") and not hasattr(denoiser, "proj_out"):
        raise BaselineUnavailable(f"taylorseer's lite mode predicts `proj_out`, which {type(denoiser).__name__} "
                                  f"lacks: its blocks would return zeros and nothing be predicted. Leave it off.")
    if not (params.get("cache_identifiers") or params.get("use_lite_mode")):
        raise BaselineUnavailable(f"taylorseer would predict nothing in {type(denoiser).__name__}: pass "
                                  f"cache_identifiers= (regexes, re.fullmatch on module names)")
    # bfloat16 factors (diffusers' default) would add their own error to a float32 model's baseline.
    params.setdefault("taylor_factors_dtype", denoiser.dtype)
    apply_taylorseer_cache(denoiser, TaylorSeerCacheConfig(**params))


def _faster_cache(denoiser: torch.nn.Module, params: dict, context: _ContextHook) -> None:
    class_embeds = any(denoiser.config.get(key) is not None for key in ("num_class_embeds", "num_embeds_ada_norm"))
    if class_embeds and "class_labels" in inspect.signature(denoiser.forward).parameters:
        raise BaselineUnavailable(
            f"faster_cache skips the unconditional CFG half by splitting only the inputs "
            f"{list(FasterCacheConfig._unconditional_conditional_input_kwargs_identifiers)} and assumes that half "
            f"comes first; {type(denoiser).__name__} is class-conditional, its pipelines pass the CFG branches as "
            f"`class_labels` (conditional first), so diffusers fails with a batch-size mismatch.")
    params.setdefault("tensor_format", "BCHW")
    apply_faster_cache(denoiser, FasterCacheConfig(current_timestep_callback=lambda: context.timestep, **params))


_APPLY: dict[str, Callable[[torch.nn.Module, dict, _ContextHook], None]] = {
    "first_block_cache": _first_block_cache, "taylorseer": _taylorseer, "faster_cache": _faster_cache,
    "mag_cache": _mag_cache}


@contextmanager
def cache_dit_cache(pipe: DiffusionPipeline, taylorseer_order: int = 0, **params: Any) -> Iterator[DiffusionPipeline]:
    """cache-dit's DBCache (``pip install "diffcache[baselines]"``) on ``pipe`` for the duration of the with-block.

    ``params`` are ``cache_dit.DBCacheConfig`` fields (``Fn_compute_blocks``, ``Bn_compute_blocks``,
    ``residual_diff_threshold``, ``max_warmup_steps``, ...); ``taylorseer_order`` > 0 adds its TaylorSeer
    calibrator. cache-dit resets its state at every pipeline call. On exit its cache is disabled and what its
    DiT adapter leaves behind (a patched ``forward``, a ``_norm1_emb`` alias that adds state-dict keys) is removed,
    so the pipeline computes bit-identically to before.

    Raises:
        MissingExtraError: cache-dit is not installed.
        BaselineUnavailable: cache-dit does not support this pipeline (e.g. UNets), checked before the block.
    """
    from ..optional import require

    cache_dit = require("cache_dit", "baselines", "the cache-dit baseline")
    denoiser = denoiser_of(pipe)
    attributes = {name: name in denoiser.__dict__ or name in denoiser._modules
                  for name in ("forward", "_norm1_emb", "_is_patched")}
    handler = getattr(cache_dit.logger, "_default_handler", None)  # it logs to stdout at INFO
    level = handler.level if handler is not None else None
    if handler is not None:
        handler.setLevel(logging.ERROR)
    calibrator = cache_dit.TaylorSeerCalibratorConfig(taylorseer_order=taylorseer_order) if taylorseer_order else None
    call = type(pipe).__call__
    try:
        try:
            cache_dit.enable_cache(pipe, cache_config=cache_dit.DBCacheConfig(**params), calibrator_config=calibrator)
        except (ValueError, RuntimeError, AttributeError) as error:
            raise BaselineUnavailable(f"cache-dit does not run on {type(pipe).__name__}: {error}") from error
        yield pipe
    finally:
        with contextlib.suppress(Exception):
            cache_dit.disable_cache(pipe)
        type(pipe).__call__ = call  # a failed enable can leave the class's __call__ wrapped
        for name, existed in attributes.items():
            if not existed and (name in denoiser.__dict__ or name in denoiser._modules):
                delattr(denoiser, name)
        if handler is not None:
            handler.setLevel(level)


def _hooks(denoiser: torch.nn.Module) -> dict[torch.nn.Module, tuple[str, ...]]:
    return {m: tuple(m._diffusers_hook._hook_order) for m in denoiser.modules() if hasattr(m, "_diffusers_hook")}


@contextmanager
def diffusers_cache(pipe: DiffusionPipeline, name: str, **params: Any) -> Iterator[DiffusionPipeline]:
    """Apply diffusers' own cache ``name`` to ``pipe``'s denoiser, in place, for the duration of the with-block.

    Each pipeline call inside starts from a fresh cache state (reset at ``scheduler.set_timesteps``), and each
    denoiser call gets the cache context and timestep the hooks read. On exit every hook and wrapper is removed:
    the pipeline computes bit-identically to before.

    Args:
        pipe: a pipeline with a ``transformer`` or ``unet`` and a ``scheduler``.
        name: one of :data:`BASELINES`.
        **params: fields of ``FirstBlockCacheConfig`` (``threshold``), ``TaylorSeerCacheConfig`` (``cache_interval``,
            ``max_order``, ``disable_cache_before_step``, ...; without identifiers, all blocks but the last are
            skipped and the last is predicted, in the model's dtype) or ``FasterCacheConfig``.

    Raises:
        ValueError: an unknown ``name``, or a parameter diffusers cannot run with.
        BaselineUnavailable: the baseline does not apply to this denoiser (checked before anything runs), or
            diffusers failed during the first pipeline call (the original error is chained).
    """
    if name not in BASELINES:
        raise ValueError(f"unknown baseline {name!r}; expected one of {', '.join(BASELINES)}")
    try:
        denoiser = denoiser_of(pipe)
    except UnsupportedModelError as error:
        raise BaselineUnavailable(str(error)) from None
    scheduler = pipe.scheduler
    before = _hooks(denoiser)
    forwards = {m: m.__dict__.get("forward") for m in denoiser.modules()}
    saved_set_timesteps = scheduler.__dict__.get("set_timesteps")
    context = _ContextHook(scheduler)
    try:
        _APPLY[name](denoiser, dict(params), context)
        added = [m for m, hooks in _hooks(denoiser).items() if set(hooks) - set(before.get(m, ()))]
        if not added:
            raise BaselineUnavailable(f"{name} hooked no module of {type(denoiser).__name__}")
        logger.debug("%s: hooks on %d modules of %s", name, len(added), type(denoiser).__name__)
        registry = HookRegistry.check_if_exists_or_initialize(denoiser)
        registry.register_hook(context, CONTEXT_HOOK)  # registered last = outermost: runs before the others
        registry.invalidate_child_registries_cache()  # apply_* forgets it; contexts and resets would miss hooks
        original_set_timesteps = scheduler.set_timesteps

        @functools.wraps(original_set_timesteps)
        def set_timesteps(*args: Any, **kwargs: Any) -> Any:
            result = original_set_timesteps(*args, **kwargs)
            registry.reset_stateful_hooks()
            context.step_index = 0
            return result

        scheduler.set_timesteps = set_timesteps
        try:
            yield pipe
        except Exception as error:
            if context.calls and not context.generations:
                raise BaselineUnavailable(f"diffusers' {name} failed on {type(denoiser).__name__}: {error}") from error
            raise
    finally:
        _remove(denoiser, before, forwards)
        if saved_set_timesteps is None:
            scheduler.__dict__.pop("set_timesteps", None)
        else:
            scheduler.set_timesteps = saved_set_timesteps


def _remove(denoiser: torch.nn.Module, before: dict, forwards: dict) -> None:
    """Remove every hook added since ``before``; put ``forward`` attributes and registries back as they were."""
    for module, hooks in _hooks(denoiser).items():
        for hook in reversed(hooks):
            if hook not in before.get(module, ()):
                module._diffusers_hook.remove_hook(hook, recurse=False)
        if module not in before:
            del module._diffusers_hook
        if forwards.get(module) is None:
            module.__dict__.pop("forward", None)  # remove_hook leaves the bound method as an instance attribute
        else:
            module.forward = forwards[module]
    if hasattr(denoiser, "_diffusers_hook"):
        denoiser._diffusers_hook.invalidate_child_registries_cache()
