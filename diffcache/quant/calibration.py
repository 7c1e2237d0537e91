"""Activation ranges per layer and per step, recorded on calibration prompts, saved and reloaded.

Every ``nn.Linear`` and ``nn.Conv2d`` of the denoiser (minus ``config.skip``) gets an observer on its input;
the pipeline runs the calibration generations (optionally under the cache schedule that will be deployed: its
cached steps see other inputs, CacheQuant's point) and each layer keeps the low/high of its input at every
step. Weights need no calibration data: their scales are computed from the weights when quantizing, so a saved
calibration plus the same weights reproduce the quantized model exactly.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from diffusers.hooks.hooks import ModelHook
from tqdm.auto import tqdm

from ..adapters import Adapter, denoiser_of, resolve_adapter
from ..errors import QuantError
from ..files import load_npz, save_npz
from ..kernels.int4 import pack_int4, unpack_int4
from ..runtime import Executor, planned
from ..schedule import Schedule
from ..data import CalibrationData, conditions_from
from .config import QuantConfig, quantizable_layers
from .quantizers import act_params, mse_act_range, weight_scales
from .reconstruction import learn_rounding, temporal_layers

logger = logging.getLogger(__name__)

_FORMAT = "diffcache.quant-calibration/1"
_OBSERVER_HOOK = "diffcache.quant-observer"
_SAMPLES_PER_CALL = 4096  # input elements kept per call for percentile ranges (fixed stride)


def temporal_modules(denoiser: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """``(name, module)`` of the timestep MLPs (diffusers' ``TimestepEmbedding``), whose output depends on t only."""
    from diffusers.models.embeddings import TimestepEmbedding

    return [(name, module) for name, module in denoiser.named_modules() if isinstance(module, TimestepEmbedding)]


@dataclass
class QuantCalibration:
    """Input ranges of the quantized layers: ``ranges[layer, step] = (low, high)``.

    With ``config.per_step=False`` every step holds the range over all steps. ``temporal`` maps each timestep
    MLP's name to its full-precision ``(inputs, outputs)`` rows seen at calibration (``config.temporal_lookup``).
    ``rounding`` maps temporal layers to their learned weight rounding (``up``, boolean like the weight;
    ``config.time_reconstruction``). ``scales`` keeps each layer's per-channel weight scales (the MSE search is
    minutes on a large model; accelerating again reuses them).

    A fine-tuned calibration (`diffcache.quant.finetune`, ``method="efficientdm"``) also carries the model it
    learned: ``codes`` (each layer's integer weights, the LoRA update merged in) and ``act`` (the learned
    per-step activation ``(scale, zero_point)``, ``[layer, step, 2]``), which replace what PTQ derives from the
    float weights and ``ranges``.
    """

    config: QuantConfig
    model: dict[str, str]
    layers: list[str]
    ranges: np.ndarray
    data_key: str = ""
    temporal: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    rounding: dict[str, np.ndarray] = field(default_factory=dict)
    scales: dict[str, np.ndarray] = field(default_factory=dict)
    codes: dict[str, np.ndarray] = field(default_factory=dict)
    act: np.ndarray | None = None
    method: str = "ptq"
    training: dict = field(default_factory=dict)
    weights: np.ndarray | None = None  # `weight_sample` of the model calibrated (None: files from before)

    @property
    def num_steps(self) -> int:
        return int(self.ranges.shape[1])

    @property
    def key(self) -> str:
        """Identifies the quantized model this calibration gives (config and ranges), for artifacts fitted on it."""
        digest = hashlib.sha1(json.dumps(self.config.to_dict(), sort_keys=True).encode())
        digest.update(np.ascontiguousarray(self.ranges, dtype=np.float32).tobytes())
        for name, up in self.rounding.items():
            digest.update(name.encode() + np.packbits(up).tobytes())
        for name, codes in self.codes.items():
            digest.update(name.encode() + np.ascontiguousarray(codes).tobytes() + self.scales[name].tobytes())
        if self.act is not None:
            digest.update(np.ascontiguousarray(self.act, dtype=np.float32).tobytes())
        return digest.hexdigest()[:16]

    def made_on(self, denoiser: torch.nn.Module) -> bool:
        """Whether ``denoiser`` holds the weights this calibration was made on (to bf16 precision, so a bf16 copy
        of the model matches its float32 calibration); True when the file predates the check."""
        if self.weights is None:
            return True
        current = weight_sample(denoiser)
        return current.shape == self.weights.shape and np.allclose(current, self.weights, rtol=1e-2, atol=1e-5)

    def act_params(self, index: int) -> np.ndarray:
        """Layer ``index``'s per-step activation ``(scale, zero_point)``, ``[step, 2]``: the learned ones of a
        fine-tuned calibration, else those covering the calibrated ranges at the layer's activation bits."""
        if self.act is not None:
            return np.asarray(self.act[index], dtype=np.float32)
        _, bits = self.config.layer_bits(index, len(self.layers))
        ranges = torch.as_tensor(self.ranges[index], dtype=torch.float32)
        return torch.stack(act_params(ranges[:, 0], ranges[:, 1], bits or 8), dim=1).numpy()

    def layer_bits(self) -> list[tuple[int, int | None]]:
        """``(weight_bits, act_bits)`` per layer, in `layers` order."""
        return [self.config.layer_bits(i, len(self.layers)) for i in range(len(self.layers))]

    def check(self, adapter: Adapter) -> None:
        """Raise `QuantError` unless this calibration was made on ``adapter``'s architecture and layers."""
        adapter.check_made_for(self.model, "this quantization calibration",
                               "calibrate again with diffcache.quant.calibrate(pipe, ...)", QuantError)
        names = [name for name, _ in quantizable_layers(adapter.denoiser, self.config)]
        if names != self.layers:
            raise QuantError(f"the denoiser has {len(names)} quantizable layers, the calibration {len(self.layers)}; "
                             "calibrate again")

    def save(self, path: str | os.PathLike) -> None:
        """One ``.npz`` (ranges, temporal tables, JSON header), written atomically."""
        header = {"config": self.config.to_dict(), "model": self.model, "layers": self.layers,
                  "data_key": self.data_key, "temporal": list(self.temporal),
                  "rounding": {name: list(up.shape) for name, up in self.rounding.items()},
                  "scales": list(self.scales), "codes": {name: list(c.shape) for name, c in self.codes.items()},
                  "act": self.act is not None, "method": self.method, "training": self.training,
                  "weights": self.weights is not None, "int4_layout": "kernels.int4"}
        tables = {f"{kind}_{i}": pair[j] for i, pair in enumerate(self.temporal.values())
                  for j, kind in enumerate(("tin", "tout"))}
        tables |= {f"round_{i}": np.packbits(up) for i, up in enumerate(self.rounding.values())}
        tables |= {f"scale_{i}": s for i, s in enumerate(self.scales.values())}
        tables |= {f"codes_{i}": _pack_codes(c) for i, c in enumerate(self.codes.values())}
        if self.act is not None:
            tables["act"] = self.act
        if self.weights is not None:
            tables["weights"] = self.weights
        save_npz(path, _FORMAT, header, {"ranges": self.ranges, **tables})

    @classmethod
    def load(cls, path: str | os.PathLike) -> QuantCalibration:
        """Inverse of :meth:`save`; raises `QuantError` for anything else."""
        try:
            header, data = load_npz(path, _FORMAT)
            config = QuantConfig(**(header["config"] | {"skip": tuple(header["config"]["skip"])}))
            temporal = {name: (data[f"tin_{i}"], data[f"tout_{i}"]) for i, name in enumerate(header["temporal"])}
            rounding = {name: np.unpackbits(data[f"round_{i}"], count=int(np.prod(shape))).reshape(shape).astype(bool)
                        for i, (name, shape) in enumerate(header.get("rounding", {}).items())}
            scales = {name: data[f"scale_{i}"] for i, name in enumerate(header.get("scales", []))}
            if header.get("int4_layout") != "kernels.int4" and any(
                    data[f"codes_{i}"].dtype == np.uint8 for i in range(len(header.get("codes", {})))):
                # Files written before the packing moved to kernels.int4 hold nibbles in another order.
                raise ValueError("its 4-bit codes use an older packing; run the fine-tune or `diffcache quantize` "
                                 "again")
            codes = {name: _unpack_codes(data[f"codes_{i}"], shape)
                     for i, (name, shape) in enumerate(header.get("codes", {}).items())}
            act = data["act"] if header.get("act") else None
            weights = data["weights"] if header.get("weights") else None
            return cls(config, header["model"], header["layers"], data["ranges"], header["data_key"], temporal,
                       rounding, scales, codes, act, header.get("method", "ptq"), header.get("training", {}), weights)
        except FileNotFoundError:
            raise QuantError(f"no quantization calibration at {os.fspath(path)!r}; create it with "
                             "`diffcache quantize` or diffcache.quant.calibrate(pipe, prompts)") from None
        except (ValueError, KeyError, TypeError) as err:
            raise QuantError(f"{os.fspath(path)!r} is not a readable diffcache quantization calibration ({err})") \
                from None


class _Observer(ModelHook):
    """Records the low/high (and a strided sample, for percentiles) of a layer's input at each step, and, given
    ``rows``, its distinct input rows with their step (a temporal layer's finite input set)."""

    def __init__(self, clock: Executor | None, record: dict[int, list], rows: dict | None = None) -> None:
        super().__init__()
        self.clock, self.record, self.rows = clock, record, rows

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        x = (args[0] if args else kwargs["input"]).detach().float()
        entry = self.record.setdefault(self.clock.step, [np.inf, -np.inf, []])
        entry[0] = min(entry[0], x.min().item())
        entry[1] = max(entry[1], x.max().item())
        flat = x.flatten()
        entry[2].append(flat[:: max(1, flat.numel() // _SAMPLES_PER_CALL)].clone())
        if self.rows is not None:
            for row in x.reshape(-1, x.shape[-1]).cpu():
                self.rows.setdefault((self.clock.step, row.numpy().tobytes()), row.clone())
        return self.fn_ref.original_forward(*args, **kwargs)


class _TemporalRecorder(ModelHook):
    """Records a timestep MLP's distinct input rows and their full-precision outputs."""

    def __init__(self, table: dict[bytes, tuple[np.ndarray, np.ndarray]]) -> None:
        super().__init__()
        self.table = table

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        output = self.fn_ref.original_forward(*args, **kwargs)
        x = args[0] if args else kwargs["sample"]
        for row, out in zip(x.detach().float().cpu().numpy(), output.detach().float().cpu().numpy()):
            self.table.setdefault(row.tobytes(), (row, out))
        return output


def calibrate(
    pipe: Any,
    prompts: Sequence[str | int] | str | os.PathLike,
    config: QuantConfig | str = "w8a8",
    *,
    schedule: Schedule | str | None = None,
    num_inference_steps: int | None = None,
    guidance_scale: float | None = None,
    seed: int = 0,
    batch_size: int = 8,
    progress: bool = True,
) -> QuantCalibration:
    """Record per-step input ranges of ``pipe``'s denoiser layers on ``prompts`` (or class labels).

    Args:
        config: a `QuantConfig` or preset name.
        schedule: calibrate along the cached trajectory of this schedule (the one you will deploy with).
        num_inference_steps, guidance_scale, seed, batch_size: the sampler settings of deployment; a calibration
            is valid for exactly this step count.
    """
    config = QuantConfig.parse(config)
    denoiser = denoiser_of(pipe)
    adapter = resolve_adapter(denoiser)
    data = CalibrationData(conditions_from(prompts, pipe), num_inference_steps, guidance_scale, seed, batch_size)
    steps = data.steps(pipe)
    plan = _plan(schedule, adapter, steps)
    layers = quantizable_layers(denoiser, config)
    if not layers:
        raise QuantError(f"{type(denoiser).__name__} has no nn.Linear / nn.Conv2d layers to quantize "
                         f"(skip={config.skip})")
    records: list[dict[int, list]] = [{} for _ in layers]
    names = [name for name, _ in layers]
    reconstructed = [names.index(name) for name, _ in temporal_layers(denoiser, config)] \
        if config.time_reconstruction else []
    rows: dict[int, dict] = {index: {} for index in reconstructed}
    times = temporal_modules(denoiser) if config.temporal_lookup else []
    tables: list[dict[bytes, tuple[np.ndarray, np.ndarray]]] = [{} for _ in times]
    # The observers follow the step of the executor `planned` binds them to (their ``clock``).
    observed = [(module, _Observer(None, record, rows.get(index)))
                for index, ((_, module), record) in enumerate(zip(layers, records))]
    observed += [(module, _TemporalRecorder(table)) for (_, module), table in zip(times, tables)]
    with planned(pipe, adapter, plan, observed):
        for kwargs in tqdm(data.batches(pipe), desc="quant calibration", disable=not progress):
            pipe(**kwargs)
    bits = [config.layer_bits(i, len(layers)) for i in range(len(layers))]
    ranges = np.stack([_ranges(record, steps, config, a or 8) for record, (_, a) in zip(records, bits)]
                      ).astype(np.float32)
    logger.info("diffcache: quantization calibration of %d layers over %d steps", len(layers), steps)
    temporal = {name: (np.stack([i for i, _ in table.values()]), np.stack([o for _, o in table.values()]))
                for (name, _), table in zip(times, tables)}
    rounding = {names[index]: up for index in reconstructed
                if (up := _learned_rounding(layers[index][1], rows[index], ranges[index], config, names[index]))
                is not None}
    with torch.no_grad():
        scales = {name: weight_scales(module.weight, w, config.weight_range).cpu().numpy().astype(np.float32)
                  for (name, module), (w, _) in zip(layers, bits)}
    calibration = QuantCalibration(config, adapter.model_info, names, ranges, data.key(), temporal, rounding, scales,
                                   weights=weight_sample(denoiser))
    from ..memory import trim_heap

    trim_heap()  # the generations' freed activations stay resident in glibc's heap otherwise (~2 GB at SD1.5 size)
    return calibration


def weight_sample(denoiser: torch.nn.Module, per_tensor: int = 16) -> np.ndarray:
    """``per_tensor`` evenly strided values of every parameter (float32): enough to tell two checkpoints of one
    architecture apart, small enough to keep in every calibration."""
    values = []
    with torch.no_grad():
        for parameter in denoiser.parameters():
            flat = parameter.detach().reshape(-1)
            if flat.numel():
                index = torch.linspace(0, flat.numel() - 1, per_tensor, device=flat.device).long()
                values.append(flat[index].float().cpu())
    return torch.cat(values).numpy() if values else np.zeros(0, np.float32)


def _learned_rounding(layer: torch.nn.Linear, rows: dict, ranges: np.ndarray, config: QuantConfig, name: str
                      ) -> np.ndarray | None:
    """TIAR's rounding for a temporal layer, or None where rounding to nearest reconstructs it as well."""
    steps = torch.tensor([step for step, _ in rows])
    learned = learn_rounding(layer, torch.stack(list(rows.values())), steps, torch.as_tensor(ranges), config,
                             config.time_reconstruction)
    logger.debug("diffcache: %s reconstruction error %.3g (nearest %.3g) on %d rows", name, learned.error,
                 learned.nearest_error, len(rows))
    return learned.up.numpy() if learned.error < learned.nearest_error else None


def _plan(schedule: Schedule | str | None, adapter: Adapter, steps: int) -> Schedule:
    from ..schedules.presets import build_from_tag, resample

    if schedule is None:
        return build_from_tag("none", adapter, steps)
    plan = build_from_tag(schedule, adapter, steps) if isinstance(schedule, str) else resample(schedule, steps)
    adapter.check_schedule(plan)
    return plan


def _ranges(record: dict[int, list], steps: int, config: QuantConfig, bits: int) -> np.ndarray:
    """``(steps, 2)`` low/high per step for ``bits``-bit activations; one shared range when not ``per_step``."""
    missing = [s for s in range(steps) if s not in record]
    if len(missing) == steps:
        raise QuantError("a quantizable layer never ran during calibration; add it to QuantConfig.skip")
    out = np.zeros((steps, 2))
    for step in range(steps):  # a layer skipped at some step (a cached branch) borrows the nearest step's range
        low, high, samples = record[min(record, key=lambda s: abs(s - step))]
        out[step] = _range(low, high, torch.cat(samples), config, bits)
    if not config.per_step:
        values = torch.cat([torch.cat(entry[2]) for entry in record.values()])
        low, high = min(e[0] for e in record.values()), max(e[1] for e in record.values())
        out[:] = _range(low, high, values, config, bits)
    return out


def _range(low: float, high: float, values: torch.Tensor, config: QuantConfig, bits: int) -> tuple[float, float]:
    """The activation range of ``config.act_range`` from the extremes and a sample of the inputs."""
    if config.act_range == "minmax":
        return low, high
    if config.act_range == "mse":
        return mse_act_range(values, low, high, bits)
    q = torch.tensor([100 - config.percentile, config.percentile], dtype=values.dtype) / 100
    return tuple(torch.quantile(values, q).tolist())


def _pack_codes(codes: np.ndarray) -> np.ndarray:
    """Signed integer weights as int8, or, when all fit in 4 bits, two a byte in `kernels.int4`'s layout."""
    if codes.size and (codes.min() < -8 or codes.max() > 7):
        return codes.astype(np.int8).ravel()
    return pack_int4(torch.from_numpy(codes.astype(np.int8))).numpy()


def _unpack_codes(stored: np.ndarray, shape: list[int]) -> np.ndarray:
    if stored.dtype == np.int8:
        return stored.reshape(shape)
    return unpack_int4(torch.from_numpy(stored), shape).numpy()


__all__ = ["QuantCalibration", "calibrate", "quantizable_layers", "temporal_modules", "weight_sample"]
