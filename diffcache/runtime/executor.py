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

What differs between model families (which hooks, how a call's row of bits becomes what they do) is the
family's `FamilyRuntime` (`runtime/unet.py`, `runtime/transformer.py`); how a reused slot is served is the plan's
reuse `Mechanism` (`runtime/mechanisms.py`); who else sees the computed values is a list of `Observer`s
(`runtime/observe.py`). The executor keeps steps, caches and statistics only.
"""

from __future__ import annotations

import itertools
import logging
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..adapters.base import DENOISER_NAMES, Adapter
from ..errors import AccelerationStateError
from ..schedule import Schedule
from .family import runtime_for
from .mechanisms import Mechanism, mechanism_for
from .stats import StatsRecorder
from .store import CacheStore

if TYPE_CHECKING:
    from .observe import Observer

logger = logging.getLogger(__name__)


@dataclass
class CallTensors:
    """What the hooks of one denoiser call read that changes between calls: the step as a 0-d tensor (on the
    denoiser's device), the CFG branch's cache store and the reuse mechanism's tensors for this step (CacheQuant's
    ``(alpha, beta)``)."""

    step: torch.Tensor
    store: CacheStore
    fix: tuple[torch.Tensor, torch.Tensor] | None = None


# Each executor's `CallTensors`, keyed by `Executor.key`, in a module-level table for compiled code to read: under
# inductor's freezing dynamo makes every tensor reached through a module (here: a hook's executor) a constant of the
# graph, so each new step index or cached feature compiled a new graph (and past the recompile limit ran eager).
# Reached from a global, the same tensors are graph inputs.
LIVE: dict[int, CallTensors] = {}
_KEYS = itertools.count()


class Executor:
    """Per-pipeline state of an accelerated denoiser: the plan for this generation, caches and counters.

    Args:
        adapter: describes the denoiser's units/components.
        plan_for: returns the (validated) schedule for a step count.
        scheduler: the scheduler instance whose ``set_timesteps``/``step`` drive the step counter (``None``: the
            caller drives it, see `runtime.generation`).
        pipe: the pipeline (held weakly) whose ``scheduler`` attribute must stay that instance.
        correction: wraps the plan's reuse mechanism (CacheQuant's correction, `diffcache.quant.CacheCorrection`):
            anything with ``check(adapter, plan)`` and ``mechanism(executor, inner) -> Mechanism``.
        observers: see every value the executor would cache (`runtime.recording`).
        quant_note: what the quantization hooks run, for `summary`.
        memory_note: what the memory slicing hooks cut, for `summary`; when set, each generation also measures
            the process's peak resident memory during its denoiser calls (`summary`'s ``peak_rss_bytes``).
    """

    def __init__(
        self,
        adapter: Adapter,
        plan_for: Callable[[int], Schedule],
        scheduler: Any,
        pipe: Any | None = None,
        *,
        correction: Any | None = None,
        observers: Sequence[Observer] = (),
        quant_note: str | None = None,
        memory_note: str | None = None,
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
        self.needed: list[list[bool]] = []  # per slot: does the plan ever reuse it (so its values are kept)
        self.wanted: list[list[bool]] = []  # per slot: does any hook have to hand its value to `put`
        self.correction = correction
        self.observers = list(observers)
        self.quant_note = quant_note
        self.memory_note = memory_note
        self.mechanism: Mechanism | None = None
        self.family = runtime_for(adapter)(self)
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
        self.since: dict[Any, int] = {}
        self.written: list[Any] = []

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
        """The reuse mechanism's tensors for this call (CacheQuant's ``(alpha, beta)``), or ``None``."""
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
        for observer in self.observers:
            observer.start(self, self.plan.num_steps)

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
        self._present = plan.present_mask.tolist()  # per plan, not per call: `available_row` runs every call
        self.mechanism = mechanism_for(self, plan)
        if self.correction is not None:
            self.mechanism = self.correction.mechanism(self, self.mechanism)
        self.set_needed(self.family.use_plan(plan))

    def set_needed(self, needed: list[list[bool]]) -> None:
        """Which slots' values are kept from now on; observers see the slots they ask for as well."""
        self.needed = needed
        self.wanted = needed
        for observer in self.observers:
            mask = observer.slots(self)
            self.wanted = [[w or m for w, m in zip(ws, ms)] for ws, ms in zip(self.wanted, mask)]

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

    @property
    def calls_in_step(self) -> int:
        """Denoiser calls since the current step began."""
        return self._calls_in_step

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
        self.family.begin_call(args, kwargs)
        self.mechanism.begin_call(like)
        self.stats.calls += 1
        LIVE[self.key].step = torch.tensor(self.step, device=like.device if like is not None else None)
        self.in_call = True
        return True

    @torch.compiler.disable
    def end_call(self) -> None:
        """Note the step of every value written in this call, and the cache memory."""
        self.family.end_call()
        for key in self.written:
            self.store.steps[key] = self.step
        self.cache_bytes = sum(store.bytes for store in self.stores.values())
        self.peak_cache_bytes = max(self.peak_cache_bytes, self.cache_bytes)
        self.in_call = False

    def available_row(self, fused: bool = False) -> list[list[bool]]:
        """The step's row with reuses of uncached slots turned into recomputes; records the counts. ``fused``:
        one value serves every slot (a transformer's stack residual, checked by the caller)."""
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

    # ----------------------------------------------------------------------------------------- cache
    # Called by the hooks inside the denoiser's forward (traced when it is compiled): only dictionary reads and
    # writes, tensor math and integers that repeat across steps (``since``), so they add no graph break.
    def put(self, key: Any, value: Any) -> None:
        """A freshly computed value: observers see it, and the mechanism keeps what it needs (with a forecast,
        the finite-difference derivatives from the previous value) where the plan reuses the slot."""
        if self.observers:
            for observer in self.observers:
                observer.observe(self, key, value)
            if isinstance(key[0], int) and not self.needed[key[0]][key[1]]:
                return
        mechanism = self.mechanism
        if mechanism.needs_steps:  # only read when used: compiled code guards on what it reads
            gap = self.since.get(key)
            value = mechanism.keep(value, self.store.values[key] if gap is not None else None, gap)
        else:
            value = mechanism.keep(value, None, None)
        self.store.values[key] = value
        self.written.append(key)

    def cached(self, key: Any) -> Any:
        """What a reuse step gets: the mechanism's serving of the cached entry (a copy, or a forecast to now)."""
        mechanism = self.mechanism
        return mechanism.serve(self.store.values[key], self.since[key] if mechanism.needs_steps else 0)

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


def input_signature(args: tuple, kwargs: dict) -> tuple:
    """Shapes, dtypes and devices of the tensor inputs: what a cached feature is only valid for."""
    items = list(enumerate(args)) + list(kwargs.items())
    return tuple(
        (key, tuple(value.shape), value.dtype, value.device)
        for key, value in items
        if isinstance(value, torch.Tensor)
    )
