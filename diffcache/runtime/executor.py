"""The executor: turns a `Schedule` into per-call decisions that the hooks obey.

Step bookkeeping (ARCHITECTURE section 3): a generation starts when the pipeline's scheduler gets
``set_timesteps`` and a step ends when the scheduler's ``step`` is called; every denoiser call in between
belongs to the same step. Steps are network-call order, never timestep values (second-order solvers repeat
timesteps). A pipeline that starts part-way down the timesteps (img2img/inpaint ``strength``, an SDXL
refiner's ``denoising_start``) is noticed at its first ``step`` (the timestep it passes is not the first one)
and the plan is mapped to the steps that really run. A denoiser outside a pipeline has no scheduler: the caller
drives generations and steps (`runtime.generation`). Denoiser calls within one step are CFG branches: each
gets its own `CacheStore`, named by diffusers' ``cache_context`` when the pipeline sets one, else by call
position (``call0``, ``call1``).
"""

from __future__ import annotations

import itertools
import logging
import math
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..adapters.base import DENOISER_NAMES, Adapter
from ..errors import AccelerationStateError
from ..schedule import Schedule
from .stats import StatsRecorder
from .store import CacheStore

logger = logging.getLogger(__name__)


@dataclass
class CallTensors:
    """What the hooks of one denoiser call read that changes between calls: the step as a 0-d tensor (on the
    denoiser's device), the CFG branch's cache store and CacheQuant's ``(alpha, beta)`` for this step."""

    step: torch.Tensor
    store: CacheStore
    fix: tuple[torch.Tensor, torch.Tensor] | None = None


# Each executor's `CallTensors`, keyed by `Executor.key`, in a module-level table for compiled code to read: under
# inductor's freezing dynamo makes every tensor reached through a module (here: a hook's executor) a constant of the
# graph, so each new step index or cached feature compiled a new graph (and past the recompile limit ran eager).
# Reached from a global, the same tensors are graph inputs.
LIVE: dict[int, CallTensors] = {}
_KEYS = itertools.count()
STACK = ("stack",)
"""Store key of a transformer's whole-stack residual (last block's output minus first block's input)."""


class Executor:
    """Per-pipeline state of an accelerated denoiser: the plan for this generation, caches and counters.

    Args:
        adapter: describes the denoiser's units/components.
        plan_for: returns the (validated) schedule for a step count.
        scheduler: the scheduler instance whose ``set_timesteps``/``step`` drive the step counter (``None``: the
            caller drives it, see `runtime.generation`).
        pipe: the pipeline (held weakly) whose ``scheduler`` attribute must stay that instance.
    """

    def __init__(
        self,
        adapter: Adapter,
        plan_for: Callable[[int], Schedule],
        scheduler: Any,
        pipe: Any | None = None,
    ) -> None:
        self.adapter = adapter
        self.plan_for = plan_for
        self.scheduler = scheduler
        self._pipe = _reference(pipe) if pipe is not None else None
        self.stats = StatsRecorder(len(adapter.unit_names))
        self.stores: dict[str, CacheStore] = {}
        self.cache_bytes = 0
        self.peak_cache_bytes = 0
        self.plan: Schedule | None = None
        self._rows: list[list[list[bool]]] = []
        self.needed: list[list[bool]] = []
        self.step = 0
        self.key = next(_KEYS)
        LIVE[self.key] = CallTensors(torch.zeros((), dtype=torch.long), CacheStore())
        weakref.finalize(self, LIVE.pop, self.key, None)
        self.open = False  # inside a generation: calls are planned (else they run uncached, with a warning)
        self._calls_in_step = 0
        self._warned: set[str] = set()
        self._compile_checked: set[int] = set()
        # Set for the duration of one denoiser call:
        self.in_call = False
        self.row: list[list[bool]] = []
        self.branch: int | None = None
        self.since: dict[Any, int] = {}
        self.written: list[Any] = []
        # Transformer block caching with whole steps only (every step computes or reuses every block): the stack's
        # residual is cached once instead of one per block, and a reuse step adds it at the first block (the others
        # pass their input on): one subtraction per computed step, one add (and forecast) per reused step, as
        # TaylorSeer's whole-body cache. Exact (up to rounding) when the blocks feed each other directly, which
        # the first computed call checks on `chain` (each block's inputs and outputs); otherwise per-block caching.
        self.fuse_blocks = False
        self.chain_checked = False
        self.fused = False
        self.chain: list[tuple[tuple, tuple]] = []
        # Optional CacheQuant correction of reused UNet branch features, and this call's (alpha, beta):
        self.correction: Any | None = None
        self.quant_note: str | None = None  # what the quantization hooks run, for `summary`

    # The per-call tensors live in `LIVE` (see there); these properties are how everything reads and sets them.
    @property
    def store(self) -> CacheStore:
        return LIVE[self.key].store

    @store.setter
    def store(self, store: CacheStore) -> None:
        LIVE[self.key].store = store

    @property
    def step_index(self) -> torch.Tensor:
        return LIVE[self.key].step

    @property
    def fix(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        return LIVE[self.key].fix

    # ------------------------------------------------------------------------------------- generation
    def start_generation(self, num_steps: int) -> None:
        """Called after ``scheduler.set_timesteps``: new plan, empty caches, step 0."""
        self._use_plan(self.plan_for(num_steps))
        if self.correction is not None:
            self.correction.check(self.adapter, self.plan)
        self._check_compiled_variants()
        self.release()
        self.stats.start(self.plan.num_steps)
        self.step = 0
        self.open = True
        self._calls_in_step = 0
        self._warned.clear()

    def run_steps(self, num_steps: int) -> None:
        """At the end of step 0: the generation really runs ``num_steps`` steps, not the ``set_timesteps`` count
        (img2img ``strength``); map the plan to them. Step 0 recomputes in every plan, so nothing ran wrong."""
        if self.plan is None or num_steps == self.plan.num_steps or self.step != 0:
            return
        logger.info("diffcache: the pipeline runs %d of its %d steps (strength / denoising_start); the schedule is "
                    "mapped to the %d steps that run", num_steps, self.plan.num_steps, num_steps)
        self._use_plan(self.plan_for(num_steps))
        self.stats.resize(num_steps)

    def _use_plan(self, plan: Schedule) -> None:
        self.plan = plan
        self._rows = plan.recompute.tolist()
        self._present = plan.present_mask.tolist()  # per plan, not per call: `_available_row` runs every call
        if self.adapter.family == "unet":
            self.needed = [[False] for _ in plan.units]
            for row in self._rows:
                branch = _first_reuse(row)
                if branch is not None:
                    self.needed[branch][0] = True
        else:
            self.needed = (~plan.recompute).any(axis=0).tolist()
        units = getattr(self.adapter, "units", [])
        reused_rows = (~plan.recompute).all(axis=(1, 2))
        self.fuse_blocks = (self.adapter.family == "transformer" and plan.granularity == "block"
                            and len({unit.streams for unit in units}) == 1 and bool(reused_rows.any())
                            and bool((reused_rows | plan.recompute.all(axis=(1, 2))).all()))
        self.chain_checked = False

    def _check_compiled_variants(self) -> None:
        """Warn once per plan when a torch.compile'd denoiser would need more graphs than dynamo keeps: each
        distinct row of bits is one graph (the hooks branch on them), and past the limit dynamo runs eager."""
        if id(self.plan) in self._compile_checked or not self._compiled():
            return
        self._compile_checked.add(id(self.plan))
        rows = self.plan.recompute.reshape(self.plan.num_steps, -1)
        variants = len(np.unique(rows, axis=0))
        limit = torch._dynamo.config.recompile_limit
        if variants > limit:
            logger.warning(
                "diffcache: this %d-step plan has %d distinct step patterns, and a compiled denoiser needs one graph "
                "each; torch._dynamo.config.recompile_limit is %d, so the rest would run uncompiled. Raise it (e.g. "
                "torch._dynamo.config.recompile_limit = %d) or use a preset", self.plan.num_steps, variants, limit,
                variants + 2)

    def _compiled(self) -> bool:
        denoiser = self.adapter.denoiser
        if getattr(denoiser, "_compiled_call_impl", None) is not None:  # nn.Module.compile()
            return True
        pipe = self._pipe() if self._pipe is not None else None
        return any(getattr(getattr(pipe, name, None), "_orig_mod", None) is denoiser for name in DENOISER_NAMES)

    def close_generation(self) -> None:
        """End a caller-driven generation: caches freed, later calls run uncached until the next one."""
        self.release()
        self.open = False

    def end_step(self) -> None:
        """Called after ``scheduler.step``; after the plan's last step the caches are of no further use."""
        self.step += 1
        self._calls_in_step = 0
        if self.plan is not None and self.step == self.plan.num_steps:
            self.release()

    def release(self) -> None:
        """Free every cached tensor (the generation is over, or the plan is being removed)."""
        for store in self.stores.values():
            store.clear()
        self.stores.clear()
        self.cache_bytes = 0

    # -------------------------------------------------------------------------------------- one call
    # The per-call bookkeeping reads the step counter; hidden from torch.compile, so compiled denoisers are not
    # specialized (and recompiled) per step. The hooks only read the resulting row of bits and the store.
    @torch.compiler.disable
    def begin_call(self, args: tuple, kwargs: dict, context: str | None) -> bool:
        """Prepare the decisions for one denoiser call; returns False when the call runs uncached.

        ``self.row`` is the plan's row for this step with every reuse whose cache is missing turned into a
        recompute (with a warning), so the hooks only follow it; compute/reuse counts are recorded here."""
        if self._pipe is not None:
            pipe = self._pipe()
            if pipe is not None and getattr(pipe, "scheduler", self.scheduler) is not self.scheduler:
                raise AccelerationStateError(
                    f"pipe.scheduler was replaced ({type(pipe.scheduler).__name__}) after diffcache.accelerate; "
                    "diffcache counts steps through the scheduler it wrapped. Call diffcache.accelerate(pipe, "
                    "schedule) again after changing the scheduler"
                )
        if not self.open:
            self.warn_once(
                "no-generation",
                "denoiser called outside a generation (no scheduler.set_timesteps, or outside "
                "`with diffcache.runtime.generation(model, num_steps)`); running it without caching",
            )
            return False
        name = context if context is not None else f"call{self._calls_in_step}"
        self._calls_in_step += 1
        self.store = self.stores.setdefault(name, CacheStore())
        signature = input_signature(args, kwargs)
        if self.store.signature != signature:
            if self.store.values:
                self.warn_once(
                    f"invalidate-{name}",
                    f"denoiser inputs changed within a generation (batch size, resolution, dtype or device) for "
                    f"branch {name!r}; its cached features are dropped and recomputed",
                )
                self.store.clear()
            self.store.signature = signature
        # Steps since each cached value was computed: what a forecast extrapolates over (read by `cached`/`put`).
        self.since = {key: self.step - step for key, step in self.store.steps.items()}
        self.written = []
        if self.step < self.plan.num_steps:
            self.row = self._rows[self.step]
        else:
            self.warn_once(
                "past-end",
                f"the denoiser ran more steps ({self.step + 1}) than the schedule has ({self.plan.num_steps}); "
                "extra steps recompute everything",
            )
            self.row = [[True] * len(self.plan.components) for _ in self.plan.units]
        like = next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), None)
        if self.adapter.family == "unet":
            self.branch = self._unet_branch()
            fix = self.correction is not None and self.branch is not None and like is not None
            LIVE[self.key].fix = self.correction.at(self.step, like) if fix else None
        else:
            self.branch = None
            self.fused = self.fuse_blocks and self.chain_checked and not any(any(bits) for bits in self.row)
            if self.fused and STACK not in self.store:
                self.warn_missing("the block stack")
                self.fused = False
                self.row = [[True] * len(bits) for bits in self.row]
            self.row = self._available_row(fused=self.fused)
            self.chain = []
        if not all(all(bits) for bits in self.row):
            self.adapter.prepare_reuse_call(kwargs, self.branch)
        self.stats.calls += 1
        LIVE[self.key].step = torch.tensor(self.step, device=like.device if like is not None else None)
        self.in_call = True
        return True

    @torch.compiler.disable
    def end_call(self) -> None:
        """Note the step of every value written in this call, and the cache memory."""
        if self.fuse_blocks and self.chain:
            self._cache_stack()
        for key in self.written:
            self.store.steps[key] = self.step
        self.cache_bytes = sum(store.bytes for store in self.stores.values())
        self.peak_cache_bytes = max(self.peak_cache_bytes, self.cache_bytes)
        self.in_call = False
        self.branch = None

    def _available_row(self, fused: bool = False) -> list[list[bool]]:
        """The step's row with reuses of uncached slots turned into recomputes; records the counts. ``fused``:
        the stack's residual serves every block (checked by the caller)."""
        row = []
        for unit, (planned, present) in enumerate(zip(self.row, self._present)):
            bits = [bit or (not fused and (unit, c) not in self.store) for c, bit in enumerate(planned)]
            for c, (was, now, here) in enumerate(zip(planned, bits, present)):
                if was != now and here:
                    self.warn_missing(f"{self.plan.units[unit]}.{self.plan.components[c]}")
            computed = sum(bit for bit, here in zip(bits, present) if here)
            self.stats.add(self.step, unit, computed, sum(present) - computed)
            row.append(bits)
        return row

    def _cache_stack(self) -> None:
        """After a call that computed every block: cache the stack's residual; the first time, check the chain."""
        chain, self.chain = self.chain, []
        chained = len(chain) == len(self.plan.units) and all(
            all(a is b for a, b in zip(inputs, previous_outputs))
            for (_, previous_outputs), (inputs, _) in zip(chain, chain[1:]))
        if not chained:  # something runs between blocks: cache block by block
            self.fuse_blocks = False
            self.needed = (~self.plan.recompute).any(axis=0).tolist()
            return
        if not self.chain_checked:  # from now on the per-block residuals are not needed
            self.chain_checked = True
            self.needed = [[False] * len(bits) for bits in self.needed]
            for key in [k for k in self.written if k != STACK]:
                self.store.values.pop(key, None)
            self.written = []
        inputs, outputs = chain[0][0], chain[-1][1]
        self.put(STACK, tuple(None if o is None else o - x for x, o in zip(inputs, outputs)))

    def _unet_branch(self) -> int | None:
        """The shallowest reused branch whose feature is cached; deeper units are skipped with it."""
        first = _first_reuse(self.row)
        branch = None
        if first is not None:
            for unit in range(first, len(self.row)):
                if ("F", unit) in self.store:
                    branch = unit
                    break
            if branch != first:
                self.warn_missing(self.plan.units[first])
        recorded = branch if branch is not None else len(self.row)
        self.stats.add(self.step, slice(0, recorded), 1, 0)
        self.stats.add(self.step, slice(recorded, None), 0, 1)
        return branch

    # ----------------------------------------------------------------------------------------- cache
    # Called by the hooks inside the denoiser's forward (traced when it is compiled): only dictionary reads and
    # writes, tensor math and integers that repeat across steps (``since``), so they add no graph break.
    def put(self, key: Any, value: Any) -> None:
        """Cache a freshly computed value; a forecasting plan also keeps its finite-difference derivatives (up to
        the plan's order) from the previous value and its derivatives."""
        order = self.plan.forecast
        if order:
            gap = self.since.get(key)
            derivatives: list[Any] = []
            if gap is not None:  # d_i = (d_{i-1} - previous d_{i-1}) / gap, as far as the previous value had them
                last, previous = self.store.values[key]
                current = value
                for before in (last, *previous)[:order]:
                    current = _slope(current, before, gap)
                    derivatives.append(current)
            value = (value, tuple(derivatives))
        self.store.values[key] = value
        self.written.append(key)

    def cached(self, key: Any) -> Any:
        """What a reuse step gets: the cached value, or its Taylor forecast to the current step."""
        if not self.plan.forecast:
            return self.store.values[key]
        value, derivatives = self.store.values[key]
        steps = self.since[key]
        for i, derivative in enumerate(derivatives, start=1):  # value + sum_i d_i * steps^i / i!
            value = _forecast(value, derivative, steps ** i / math.factorial(i))
        return value

    def warn_missing(self, what: str) -> None:
        self.warn_once(
            f"missing-{what}",
            f"schedule reuses {what} at step {self.step} but nothing is cached for it in this branch/shape; "
            "recomputing it instead",
        )

    def warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            logger.warning(message)


def _reference(obj: Any) -> Callable[[], Any]:
    """A weak reference where the object allows one (pipelines do), else a strong one."""
    try:
        return weakref.ref(obj)
    except TypeError:
        return lambda: obj


def _slope(value: Any, previous: Any, steps: int) -> Any:
    """``(value - previous) / steps`` for tensors, element-wise through tuples; anything else is ``None``."""
    if isinstance(value, torch.Tensor):
        return (value - previous) / steps
    if isinstance(value, tuple):
        return tuple(_slope(a, b, steps) for a, b in zip(value, previous))
    return None


def _forecast(value: Any, slope: Any, steps: int) -> Any:
    """``value + steps * slope`` (one fused op per tensor); non-tensors are kept as they are."""
    if isinstance(value, torch.Tensor):
        return torch.add(value, slope, alpha=steps)
    if isinstance(value, tuple):
        return tuple(_forecast(a, b, steps) for a, b in zip(value, slope))
    return value


def _first_reuse(row: list[list[bool]]) -> int | None:
    for unit, bits in enumerate(row):
        if not bits[0]:
            return unit
    return None


def input_signature(args: tuple, kwargs: dict) -> tuple:
    """Shapes, dtypes and devices of the tensor inputs: what a cached feature is only valid for."""
    items = list(enumerate(args)) + list(kwargs.items())
    return tuple(
        (key, tuple(value.shape), value.dtype, value.device)
        for key, value in items
        if isinstance(value, torch.Tensor)
    )
