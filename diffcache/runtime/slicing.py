"""Streamlined Inference's memory half: Feature Slicer and Operator Grouping, as hooks.

A `SliceHook` runs its module once per chunk of the input and concatenates the outputs, so the module's whole chain
of operations (norm -> conv/attention -> feed-forward -> residual) runs on one chunk at a time and none of its
intermediates is materialised at full size: Operator Grouping is the module boundary, Feature Slicer the chunking.
The math is unchanged only where the module treats the chunks independently; the adapters name those modules and
how to cut them (`adapters.base.SliceRule`, `Adapter.slice_targets`):

- ``"frames"``: modules that see frames folded into the batch and never mix them (a UNet's resnets, spatial
  attention, samplers): chunks of ``frames`` along dim 0, with the batch-aligned inputs (``temb``,
  ``encoder_hidden_states``) cut alike;
- ``"positions"``: temporal attention blocks whose batch is ``batch x spatial positions`` (AnimateDiff's motion
  blocks): chunks of ``tokens`` rows along dim 0;
- ``"positions-folded"``: SVD's ``TemporalBasicTransformerBlock`` (input ``(batch x frames, positions, C)``, its
  cross-attention context ``(batch x positions, L, C)``): chunks of ``tokens`` positions along dim 1, the context
  cut at the same positions;
- ``"tokens"``: per-token feed-forwards of transformers: chunks of ``tokens`` along dim 1.

The hooks sit *inside* the cache hooks (`runtime.attach` registers them first), so a reused step skips them and a
computed step is sliced. Results equal the unsliced run up to float rounding (matmul blocking differs per chunk).
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass, fields
from typing import Any

import torch
from diffusers.hooks.hooks import ModelHook
from diffusers.utils import BaseOutput

from ..adapters.base import SliceRule
from ..errors import SliceError

logger = logging.getLogger(__name__)

SLICE_HOOK = "diffcache.slice"


DEFAULT_SIZES = {"frames": 2, "tokens": 1024}


@dataclass(frozen=True)
class SliceConfig:
    """How finely `accelerate(..., memory=...)` slices; ``None`` takes the default where the model has such layers.

    Attributes:
        frames: frames per chunk in per-frame layers (default 2; 0 leaves them whole).
        tokens: spatial positions (temporal layers) or tokens (feed-forwards) per chunk (default 1024; 0: whole).
    """

    frames: int | None = None
    tokens: int | None = None

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
                raise SliceError(f"memory slicing: {f.name} must be an int >= 0 (0 leaves those layers whole), "
                                 f"got {value!r}")
        if self.frames == 0 and self.tokens == 0:
            raise SliceError("memory slicing with frames=0 and tokens=0 slices nothing; drop memory= instead")

    @classmethod
    def parse(cls, spec: str | SliceConfig) -> SliceConfig:
        """``"sliced"`` or ``"sliced:frames=2,tokens=1024"`` (or a `SliceConfig`)."""
        if isinstance(spec, SliceConfig):
            return spec
        if not isinstance(spec, str):
            raise SliceError(f"memory= takes 'sliced', 'sliced:frames=F,tokens=T' or a SliceConfig, got {spec!r}")
        name, _, options = spec.partition(":")
        if name.strip() != "sliced":
            raise SliceError(f"unknown memory mode {name!r}; the one mode is 'sliced' "
                             "(e.g. memory='sliced:frames=2,tokens=1024')")
        values: dict[str, int] = {}
        known = {f.name for f in fields(cls)}
        for item in filter(None, (part.strip() for part in options.split(","))):
            key, eq, value = (part.strip() for part in item.partition("="))
            if key not in known or not eq or not value.isdigit():
                raise SliceError(f"memory option {item!r}: expected frames=<int> or tokens=<int>")
            values[key] = int(value)
        return cls(**values)

    def size(self, kind: str) -> int:
        """Chunk length for a `SliceRule` kind."""
        key = "frames" if kind == "frames" else "tokens"
        value = getattr(self, key)
        return DEFAULT_SIZES[key] if value is None else value

    def check(self, targets: list[tuple[torch.nn.Module, SliceRule]], model: str) -> None:
        """`SliceError` where an explicit option has no layer to cut, or nothing would be cut at all."""
        kinds = {rule.kind for _, rule in targets}
        if self.frames and "frames" not in kinds:
            raise SliceError(
                f"{model} has no per-frame layers: its attention mixes all frames (full 3-D attention), so cutting "
                "frames would change the result; drop frames= (tokens= slices its feed-forwards)"
            )
        if self.tokens and not kinds & {"positions", "positions-folded", "tokens"}:
            raise SliceError(f"{model} has no temporal or feed-forward layers diffcache can cut; drop tokens=")
        if not any(self.size(rule.kind) for _, rule in targets):
            raise SliceError(f"with {self} nothing in {model} is cut; drop memory= or raise frames= / tokens=")

    def describe(self, hooks: list[tuple[torch.nn.Module, SliceHook]]) -> str:
        counts: dict[str, int] = {}
        for _, hook in hooks:
            counts[hook.rule.kind] = counts.get(hook.rule.kind, 0) + 1
        parts = [f"{n} {kind} layers in chunks of {self.size(kind)}" for kind, n in sorted(counts.items())]
        return "sliced: " + ", ".join(parts)


class SliceHook(ModelHook):
    """Runs the module on chunks of ``size`` along the rule's axis and concatenates the outputs."""

    def __init__(self, rule: SliceRule, size: int) -> None:
        super().__init__()
        self.rule, self.size = rule, size
        self.signature: inspect.Signature | None = None

    def initialize_hook(self, module: torch.nn.Module) -> torch.nn.Module:
        self.signature = inspect.signature(module.forward)
        return module

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        bound = self.signature.bind(*args, **kwargs)
        x = bound.arguments.get(self.rule.input)
        dim = self.rule.axis
        if not isinstance(x, torch.Tensor) or x.ndim <= dim or x.shape[dim] <= self.size:
            return self.fn_ref.original_forward(*args, **kwargs)
        outputs = []
        for start in range(0, x.shape[dim], self.size):
            stop = min(start + self.size, x.shape[dim])
            chunk = inspect.BoundArguments(self.signature, dict(bound.arguments))
            chunk.arguments[self.rule.input] = x.narrow(dim, start, stop - start)
            for name in self.rule.companions:
                if name in chunk.arguments:
                    chunk.arguments[name] = self._companion(chunk.arguments[name], x, start, stop)
            outputs.append(self.fn_ref.original_forward(*chunk.args, **chunk.kwargs))
        return _concat(outputs, dim)

    def _companion(self, value: Any, x: torch.Tensor, start: int, stop: int) -> Any:
        if not isinstance(value, torch.Tensor):
            return value
        if self.rule.kind == "positions-folded":  # (batch * positions, L, C), positions = x.shape[1]
            positions = x.shape[1]
            folded = value.reshape(-1, positions, *value.shape[1:])
            return folded[:, start:stop].reshape(-1, *value.shape[1:])
        return value[start:stop] if value.ndim and value.shape[0] == x.shape[0] else value


def _concat(outputs: list[Any], dim: int) -> Any:
    first = outputs[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(outputs, dim=dim)
    if isinstance(first, BaseOutput):
        return type(first)(**{key: _concat([o[key] for o in outputs], dim) for key in first.keys()})
    if isinstance(first, tuple):
        return tuple(_concat([o[i] for o in outputs], dim) for i in range(len(first)))
    raise TypeError(f"cannot concatenate sliced outputs of type {type(first).__name__}")


def slice_hooks(targets: list[tuple[torch.nn.Module, SliceRule]], config: SliceConfig
                ) -> list[tuple[torch.nn.Module, SliceHook]]:
    """One `SliceHook` per target whose kind ``config`` slices."""
    return [(module, SliceHook(rule, config.size(rule.kind))) for module, rule in targets if config.size(rule.kind)]


__all__ = ["SLICE_HOOK", "SliceConfig", "SliceHook", "slice_hooks"]
