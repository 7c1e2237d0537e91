"""Cost model: MACs of each (unit, component) slot of a denoiser, and what a schedule saves.

MACs come from ``torch.utils.flop_counter.FlopCounterMode`` on one real denoiser call captured from the
pipeline (so resolution, batch and CFG layout are the user's), attributed to modules by name, and are cached on
disk per architecture and input shape. A schedule's
cost at step ``k`` is the full call minus the slots it reuses (for a UNet the reused branch units; their
modules do not run). "Theoretical speedup" is MACs(full) / MACs(schedule), separate from wall-clock.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from ..adapters import BLOCK, Adapter, denoiser_of, resolve_adapter
from ..files import cache_root, write_atomic
from ..runtime.executor import input_signature
from ..schedule import Schedule

logger = logging.getLogger(__name__)


def _sdpa_macs(query_shape: Any, key_shape: Any, value_shape: Any, *args: Any, out_shape: Any = None,
               **kwargs: Any) -> int:
    """QK^T and AV of one attention call (FLOPs, as torch's own SDPA formulas count them)."""
    return sdpa_flop_count(query_shape, key_shape, value_shape)


# torch's FlopCounterMode has formulas for the CUDA attention kernels and for the math path (two bmm), but none
# for the fused CPU kernel diffusers' attention dispatches to, so CPU profiles missed every QK^T and AV matmul
# (SD1.5's UNet: 338.6 instead of 401.6 GMACs). Counted here, a profile is the same on every device.
ATTENTION_FORMULAS = {op: _sdpa_macs for op in (
    getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None),
    getattr(torch.ops.aten, "_scaled_dot_product_fused_attention_overrideable", None)) if op is not None}
_MACS_VERSION = 2  # saved MACs profiles from before attention was counted are measured again


@dataclass(frozen=True)
class CostProfile:
    """Cost of one denoiser call, total and per (unit, component) slot (``slot_cost[u, c]``).

    ``measure`` is ``"macs"`` (from the FLOP counter) or ``"ms"`` (measured latency on this machine).
    """

    units: list[str]
    components: list[str]
    slot_cost: np.ndarray
    total: float
    measure: str

    def step_cost(self, schedule: Schedule) -> np.ndarray:
        """Cost of each step's denoiser call under ``schedule`` (one entry per step)."""
        if schedule.units != self.units or schedule.components != self.components:
            raise ValueError("the cost profile was measured for other units/components than the schedule's")
        return self.total - (~schedule.recompute * self.slot_cost[None]).sum(axis=(1, 2))

    def speedup(self, schedule: Schedule) -> float:
        """Theoretical denoiser speedup: cost(all steps full) / cost(schedule)."""
        return float(self.total * schedule.num_steps / self.step_cost(schedule).sum())


def profile_macs(pipe: Any, call_kwargs: dict[str, Any], granularity: str = BLOCK) -> CostProfile:
    """Measure per-slot MACs of ``pipe``'s denoiser on the inputs of its first call in ``pipe(**call_kwargs)``.

    The pipeline is run once to capture those inputs; pass a small ``num_inference_steps``. The pipeline must
    not be accelerated.
    """
    denoiser = denoiser_of(pipe)
    captured: list[tuple[tuple, dict]] = []
    handle = denoiser.register_forward_pre_hook(
        lambda _m, args, kwargs: captured.append((args, kwargs)) if not captured else None, with_kwargs=True
    )
    try:
        pipe(**call_kwargs)
    finally:
        handle.remove()
    args, kwargs = captured[0]
    adapter = resolve_adapter(denoiser)
    # The slots' module lists key the file too: an adapter that maps units differently must not read old profiles.
    slots = sorted(adapter.slot_modules(granularity).items())
    signature = repr((adapter.model_info, granularity, input_signature(args, kwargs), slots, _MACS_VERSION))
    path = cache_root() / "cost" / f"{hashlib.sha1(signature.encode()).hexdigest()[:20]}.json"
    cached = _load(path)
    if cached is not None:
        return cached
    counter = FlopCounterMode(display=False, custom_mapping=ATTENTION_FORMULAS)
    with torch.no_grad(), counter:
        denoiser(*args, **kwargs)
    flops = {name: sum(ops.values()) for name, ops in counter.get_flop_counts().items()}
    prefix = type(denoiser).__name__
    cost = np.zeros(_shape(adapter, granularity))
    for (u, c), names in adapter.slot_modules(granularity).items():
        cost[u, c] = sum(flops.get(f"{prefix}.{name}", 0) for name in names) // 2
    layout = adapter.layout(granularity)
    profile = CostProfile(layout.units, layout.components, cost, flops[prefix] // 2, "macs")
    _save(path, profile)
    return profile


def profile_latency(pipe: Any, call_kwargs: dict[str, Any], granularity: str = BLOCK) -> CostProfile:
    """Measure per-slot wall time (ms per denoiser call, averaged over the calls of ``pipe(**call_kwargs)``).

    Search can optimise this instead of MACs: elementwise work (norms, gates) has no MACs but costs time.
    The timing hooks add a few microseconds per module; run a warm pipeline.
    """
    denoiser = denoiser_of(pipe)
    adapter = resolve_adapter(denoiser)
    modules = dict(denoiser.named_modules())
    cost = np.zeros(_shape(adapter, granularity))
    total = [0.0, 0]
    handles = []

    def timed(module: torch.nn.Module, add: Any) -> None:
        start: list[float] = []
        handles.append(module.register_forward_pre_hook(lambda *_: start.append(time.perf_counter())))
        handles.append(module.register_forward_hook(lambda *_: add(time.perf_counter() - start.pop())))

    def add_slot(u: int, c: int) -> Any:
        return lambda seconds: cost.__setitem__((u, c), cost[u, c] + seconds)

    for (u, c), names in adapter.slot_modules(granularity).items():
        for name in names:
            timed(modules[name], add_slot(u, c))
    timed(denoiser, lambda seconds: total.__setitem__(slice(None), [total[0] + seconds, total[1] + 1]))
    try:
        pipe(**call_kwargs)
    finally:
        for handle in handles:
            handle.remove()
    layout = adapter.layout(granularity)
    calls = max(total[1], 1)
    return CostProfile(layout.units, layout.components, cost * 1000 / calls, total[0] * 1000 / calls, "ms")


def _save(path: Path, profile: CostProfile) -> None:
    data = {"units": profile.units, "components": profile.components, "slot_cost": profile.slot_cost.tolist(),
            "total": profile.total, "measure": profile.measure}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, json.dumps(data))
    except OSError as err:  # a read-only home only costs a re-measurement next time
        logger.debug("could not cache the MAC profile at %s: %s", path, err)


def _load(path: Path) -> CostProfile | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return CostProfile(data["units"], data["components"], np.array(data["slot_cost"]), data["total"],
                           data["measure"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _shape(adapter: Adapter, granularity: str) -> tuple[int, int]:
    layout = adapter.layout(granularity)
    return len(layout.units), len(layout.components)
