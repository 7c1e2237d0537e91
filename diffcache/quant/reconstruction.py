"""TFMQ-DM's time-information-block reconstruction (TIAR, specs/algorithms.md section 6), layer by layer.

The temporal layers (the timestep MLP, every resnet's ``time_emb_proj``, every adaptive norm's ``linear``) see
only the embedding of ``t`` (and the class or pooled-text conditioning): a finite set of rows, all recorded at
calibration. For each such layer the rounding of every weight, up or down, is learned with AdaRound (a soft
rounding variable per weight, pushed to 0 or 1 by an annealed regularizer) so that the quantized layer on its
quantized inputs reproduces the float layer on the float inputs over exactly those rows. The learned rounding is
kept only where it beats rounding to nearest on the reconstruction error.

TFMQ-DM reconstructs the whole block jointly; here the timestep MLP's own output is usually served exactly from
the temporal table (``temporal_lookup``), so the layers after it see float inputs and the joint loss splits into
one loss per layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..kernels.int8 import weight_codes
from .config import QuantConfig, quantizable_layers
from .quantizers import act_params, fake_quant_act, weight_levels, weight_scales

# AdaRound's rectified sigmoid stretch, regularizer weight and temperature schedule (Nagel et al. 2020; BRECQ's
# released settings: reg 0.01, beta 20 -> 2 after 20 % warm-up).
ZETA, GAMMA = 1.1, -0.1
REG_WEIGHT, BETA_START, BETA_END, WARMUP = 0.01, 20.0, 2.0, 0.2
LEARNING_RATE = 1e-2


def temporal_layers(denoiser: torch.nn.Module, config: QuantConfig) -> list[tuple[str, torch.nn.Module]]:
    """``(name, module)`` of the quantizable Linear layers fed by the time (conditioning-embedding) path only."""
    from diffusers.models.embeddings import TimestepEmbedding
    from diffusers.models.normalization import AdaLayerNorm, AdaLayerNormSingle, AdaLayerNormZero


    names: set[str] = set()
    for name, module in denoiser.named_modules():
        if isinstance(module, TimestepEmbedding):
            names |= {f"{name}.{child}" for child, _ in module.named_children()}
        elif isinstance(module, (AdaLayerNorm, AdaLayerNormSingle, AdaLayerNormZero)):
            names.add(f"{name}.linear")
        elif name.rsplit(".", 1)[-1] == "time_emb_proj":
            names.add(name)
    return [(name, module) for name, module in quantizable_layers(denoiser, config)
            if name in names and isinstance(module, torch.nn.Linear)]


@dataclass
class Rounding:
    """A learned rounding (``up[o, i]``: round weight ``(o, i)`` up) and the reconstruction errors (summed squared
    output error per row, averaged over the rows) with it and with rounding to nearest."""

    up: torch.Tensor
    error: float
    nearest_error: float


def learn_rounding(layer: torch.nn.Linear, rows: torch.Tensor, steps: torch.Tensor, ranges: torch.Tensor,
                   config: QuantConfig, iterations: int) -> Rounding:
    """AdaRound for ``layer`` on its float input ``rows`` (``steps[r]``: the step row ``r`` was seen at, whose
    activation range ``ranges[step] = (low, high)`` quantizes it as at inference)."""
    weight = layer.weight.detach().float()
    bias = None if layer.bias is None else layer.bias.detach().float()
    rows = rows.float()
    target = F.linear(rows, weight, bias)
    if config.act_bits is not None:
        scale, zero = act_params(ranges[steps, 0], ranges[steps, 1], config.act_bits)
        rows = fake_quant_act(rows, scale[:, None], zero[:, None], config.act_bits)
    scales = weight_scales(weight, config.weight_bits, config.weight_range)[:, None]
    low, high = weight_levels(config.weight_bits)
    floor = torch.floor(weight / scales)
    rest = (weight / scales - floor).clamp(1e-4, 1 - 1e-4)
    logits = torch.logit((rest - GAMMA) / (ZETA - GAMMA)).requires_grad_()  # soft rounding starts at the float value
    optimizer = torch.optim.Adam([logits], lr=LEARNING_RATE)

    def error(codes: torch.Tensor) -> torch.Tensor:
        return (F.linear(rows, torch.clamp(codes, low, high) * scales, bias) - target).pow(2).sum(-1).mean()

    for iteration in range(iterations):
        with torch.enable_grad():
            soft = torch.clamp(torch.sigmoid(logits) * (ZETA - GAMMA) + GAMMA, 0, 1)
            loss = error(floor + soft)
            progress = (iteration / iterations - WARMUP) / (1 - WARMUP)
            if progress >= 0:  # after the warm-up, push every soft rounding to 0 or 1, ever harder
                beta = BETA_END + (BETA_START - BETA_END) * (1 - progress)
                loss = loss + REG_WEIGHT * (1 - (2 * soft - 1).abs().pow(beta)).sum()
            optimizer.zero_grad()
            loss.backward()
        optimizer.step()
    with torch.no_grad():
        up = logits >= 0  # the soft rounding's side of 1/2
        nearest = weight_codes(weight, scales[:, 0], config.weight_bits)
        return Rounding(up, error(floor + up).item(), error(nearest).item())


__all__ = ["Rounding", "learn_rounding", "temporal_layers"]
