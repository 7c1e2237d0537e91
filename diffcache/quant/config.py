"""What to quantize and how: `QuantConfig` and the named presets ``"w8a8"``, ``"w4a8"``, ``"w4a4"``, ``"w8"``.

The scheme simulates what the CPU int8 backend runs (x86 PT2E / oneDNN, see specs/kernel-measurements.md):
weights symmetric per output channel (signed, zero point 0), activations asymmetric per tensor (unsigned 8 bit),
with one activation range per denoising step (TFMQ-DM's finite set calibration: a step's inputs have their
own range, so one shared range wastes levels on the steps with small activations).
"""

from __future__ import annotations

import torch

from dataclasses import asdict, dataclass

from ..errors import QuantError

WEIGHT_BITS = (4, 8)
ACT_BITS = (4, 8)
WEIGHT_RANGES = ("minmax", "mse")
ACT_RANGES = ("minmax", "percentile", "mse")
BACKENDS = ("auto", "onednn", "intmm", "fake")


@dataclass(frozen=True)
class QuantConfig:
    """Post-training quantization of a denoiser's ``nn.Linear`` and ``nn.Conv2d`` layers.

    Attributes:
        weight_bits: 8 or 4 (symmetric, per output channel).
        act_bits: 8 or 4, or ``None`` for weight-only quantization. 4-bit activations run in simulation (no CPU
            or CUDA kernel takes them).
        edge_bits: bit width of the first and the last quantized layer (weights, and activations if quantized),
            ``None`` for the others' width. Below 8 bits these two carry the most error per bit (the image's
            input and output pixels); Q-Diffusion, PTQ4DM and EfficientDM keep them at 8.
        weight_range: ``"mse"`` searches each channel's clipping range for the least squared error; ``"minmax"``
            uses the channel's absolute maximum.
        act_range: ``"minmax"`` (the calibrated extremes), ``"percentile"`` (``percentile`` / ``100 -
            percentile`` of the inputs) or ``"mse"`` (the shrinking of the extremes with the least L2.4 rounding
            error on a sample of the inputs, as EfficientDM's PTQ start). At 8 bits on the digits DiT any clipping
            costs more than it gains (percentile 99.9: 11-16 dB PSNR, against 33-38 dB for min-max), so min-max is
            the default there; 4-bit activations have too few levels for the extremes, so ``w4a4`` uses ``mse``.
        per_step: one activation range per step (``True``) or one shared by all steps.
        skip: module-name substrings left in floating point (e.g. ``("proj_out",)``).
        backend: ``"auto"`` (real int8 for 8-bit layers where a kernel runs them: oneDNN for Linear and Conv2d
            on CPU, ``torch._int_mm`` for Linear on CUDA; simulation elsewhere), ``"onednn"`` or ``"intmm"``
            (require that kernel for every layer) or ``"fake"`` (simulate everything: the numbers of the deployed
            scheme, not its speed).
        temporal_lookup: serve every ``TimestepEmbedding`` (the timestep MLP: a function of ``t`` alone) from a
            table of its full-precision outputs recorded at calibration, keyed by its exact input (TFMQ-DM's
            temporal-feature cache): the time path then costs nothing and carries no quantization error.
        time_reconstruction: AdaRound iterations per temporal layer (timestep MLP, ``time_emb_proj``, adaptive-norm
            ``linear``: TFMQ-DM's time-information block), learning each weight's rounding on the conditioning rows
            seen at calibration; 0 rounds to nearest. Kept per layer only where it beats rounding to nearest.
    """

    weight_bits: int = 8
    act_bits: int | None = 8
    edge_bits: int | None = None
    weight_range: str = "mse"
    act_range: str = "minmax"
    percentile: float = 99.99
    per_step: bool = True
    skip: tuple[str, ...] = ()
    temporal_lookup: bool = True
    time_reconstruction: int = 300
    backend: str = "auto"

    def __post_init__(self) -> None:
        if self.weight_bits not in WEIGHT_BITS:
            raise QuantError(f"weight_bits must be one of {WEIGHT_BITS}, got {self.weight_bits!r}")
        if self.act_bits is not None and self.act_bits not in ACT_BITS:
            raise QuantError(f"act_bits must be one of {ACT_BITS} or None (weight-only), got {self.act_bits!r}")
        if self.edge_bits is not None and self.edge_bits not in WEIGHT_BITS:
            raise QuantError(f"edge_bits must be one of {WEIGHT_BITS} or None, got {self.edge_bits!r}")
        if self.weight_range not in WEIGHT_RANGES:
            raise QuantError(f"weight_range must be one of {WEIGHT_RANGES}, got {self.weight_range!r}")
        if self.act_range not in ACT_RANGES:
            raise QuantError(f"act_range must be one of {ACT_RANGES}, got {self.act_range!r}")
        if self.backend not in BACKENDS:
            raise QuantError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.time_reconstruction < 0:
            raise QuantError(f"time_reconstruction is a number of iterations (0: off), got {self.time_reconstruction}")
        if not 50 < self.percentile <= 100:
            raise QuantError(f"percentile must be in (50, 100], got {self.percentile!r}")
        object.__setattr__(self, "skip", tuple(self.skip))

    @property
    def name(self) -> str:
        return f"w{self.weight_bits}" + (f"a{self.act_bits}" if self.act_bits else "")

    def layer_bits(self, index: int, count: int) -> tuple[int, int | None]:
        """``(weight_bits, act_bits)`` of quantizable layer ``index`` of ``count`` (the edges may differ)."""
        if self.edge_bits is not None and index in (0, count - 1):
            return self.edge_bits, None if self.act_bits is None else max(self.act_bits, self.edge_bits)
        return self.weight_bits, self.act_bits

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def parse(cls, value: QuantConfig | str | dict) -> QuantConfig:
        """A config, a preset name (``"w8a8"``, ``"w4a8"``, ``"w4a4"``, ``"w8"``) or a dict of fields."""
        if isinstance(value, QuantConfig):
            return value
        if isinstance(value, dict):
            try:
                return cls(**value)
            except TypeError as err:
                raise QuantError(f"bad quantization config {value!r}: {err}") from None
        if isinstance(value, str) and value.lower() in PRESETS:
            return PRESETS[value.lower()]
        raise QuantError(f"unknown quantization preset {value!r}; choose from {sorted(PRESETS)} or pass a QuantConfig")


PRESETS: dict[str, QuantConfig] = {
    "w8a8": QuantConfig(8, 8),
    "w4a8": QuantConfig(4, 8, edge_bits=8),
    "w4a4": QuantConfig(4, 4, edge_bits=8, act_range="mse"),
    "w8": QuantConfig(8, None),
}


def quantizable_layers(denoiser: torch.nn.Module, config: QuantConfig) -> list[tuple[str, torch.nn.Module]]:
    """``(name, module)`` of every plain ``nn.Linear`` / ``nn.Conv2d`` not matched by ``config.skip``."""
    return [(name, module) for name, module in denoiser.named_modules()
            if type(module) in (torch.nn.Linear, torch.nn.Conv2d) and not any(s in name for s in config.skip)]


