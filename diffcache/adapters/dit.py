"""Transformer denoisers (DiT, PixArt-alpha/sigma, SD3/SD3.5, Flux, and any model with a block ModuleList).

Units are the transformer blocks. Two granularities:

* ``"block"``: the block's residual (output minus input, per stream) is cached; a reuse step adds it to the
  block's current input and skips the whole block.
* ``"component"``: the outputs of the block's attention / feed-forward sub-modules are cached *before* the
  block applies its timestep gate (hooking the sub-module gives exactly that in diffusers' blocks), so norms,
  adaLN modulation and gates always use the current timestep (ECAD, FORA, L2C; specs/algorithms.md section 4).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import numpy as np
import torch

from ..errors import AccelerationStateError, UnsupportedModelError
from .base import BLOCK, Adapter, Layout, register_adapter

# Child ModuleLists that hold the blocks, in the order the forward runs them.
BLOCK_LIST_NAMES = ("transformer_blocks", "single_transformer_blocks", "blocks", "layers")

# Cached sub-modules per block class, and which input stream each element of the block's output updates.
_BLOCK_SPECS: dict[str, tuple[tuple[str, ...], tuple[str, ...] | None]] = {
    "BasicTransformerBlock": (("attn1", "attn2", "ff"), None),
    "JointTransformerBlock": (("attn", "attn2", "ff", "ff_context"), ("encoder_hidden_states", "hidden_states")),
    "FluxTransformerBlock": (("attn", "ff", "ff_context"), ("encoder_hidden_states", "hidden_states")),
    "FluxSingleTransformerBlock": (("attn", "proj_mlp", "proj_out"), ("encoder_hidden_states", "hidden_states")),
}


@dataclass
class TransformerUnit:
    """One cacheable block.

    Attributes:
        outputs: input-stream name for each element of a tuple output, or ``None`` when the block returns
            one tensor that updates its first input.
        input_positions: positional index of each stream in the block's ``forward`` signature.
    """

    name: str
    module: torch.nn.Module
    outputs: tuple[str, ...] | None
    input_positions: dict[str, int]
    components: dict[str, torch.nn.Module] = field(default_factory=dict)

    @property
    def streams(self) -> tuple[str, ...]:
        """The input stream each element of the block's output updates; a plain tensor output updates the first."""
        return self.outputs or (next(iter(self.input_positions)),)


def block_input(spec: TransformerUnit, name: str, args: tuple, kwargs: dict) -> torch.Tensor:
    """The block's input stream ``name`` (``hidden_states``, ``encoder_hidden_states``) from its call arguments."""
    if name in kwargs:
        return kwargs[name]
    position = spec.input_positions[name]
    if position < len(args):
        return args[position]
    raise AccelerationStateError(f"{spec.name} was called without its {name!r} input")


BlockSpecs = dict[str, tuple[tuple[str, ...], tuple[str, ...] | None]]


def make_unit(name: str, module: torch.nn.Module, with_components: bool = True,
              specs: BlockSpecs | None = None) -> TransformerUnit:
    """Describe one block; ``with_components=False`` caches it only as a whole (its gates are unknown).
    ``specs``: block class name -> (cached sub-modules, output streams); default the image blocks'."""
    component_names, outputs = (_BLOCK_SPECS if specs is None else specs).get(type(module).__name__, ((), None))
    components = {
        c: getattr(module, c)
        for c in component_names
        if with_components and isinstance(getattr(module, c, None), torch.nn.Module)
    }
    params = [p for p in inspect.signature(module.forward).parameters.values() if p.kind is p.POSITIONAL_OR_KEYWORD]
    positions = {p.name: i for i, p in enumerate(params)}
    streams = outputs if outputs is not None else (params[0].name if params else "hidden_states",)
    missing = [s for s in streams if s not in positions]
    if missing:
        raise UnsupportedModelError(
            f"block {name} ({type(module).__name__}) has no input named {missing} in its forward signature"
        )
    return TransformerUnit(name, module, outputs, positions, components)


class TransformerAdapter(Adapter):
    """Adapter for transformer denoisers whose blocks live in ``BLOCK_LIST_NAMES`` ModuleLists."""

    family = "transformer"
    routable = True
    block_specs: BlockSpecs = _BLOCK_SPECS
    """Block class name -> (cached sub-modules, output streams); subclasses for other model lines extend it."""

    def __init__(self, denoiser: torch.nn.Module, units: list[TransformerUnit] | None = None) -> None:
        super().__init__(denoiser)
        self.units = units if units is not None else self._find_units(denoiser)
        names: list[str] = []
        for unit in self.units:
            names += [c for c in unit.components if c not in names]
        self.component_names = names
        self.granularities = (BLOCK, "component") if names else (BLOCK,)

    def _find_units(self, denoiser: torch.nn.Module) -> list[TransformerUnit]:
        units = []
        for list_name in BLOCK_LIST_NAMES:
            blocks = getattr(denoiser, list_name, None)
            if isinstance(blocks, torch.nn.ModuleList):
                units += [make_unit(f"{list_name}.{i}", block, specs=self.block_specs) for i, block in enumerate(blocks)]
        if not units:
            raise UnsupportedModelError(f"{type(denoiser).__name__} has no non-empty block list {BLOCK_LIST_NAMES}")
        return units

    def layout(self, granularity: str = BLOCK) -> Layout:
        names = [u.name for u in self.units]
        if granularity == BLOCK:
            return Layout(self.family, names, [BLOCK])
        if granularity != "component" or not self.component_names:
            raise UnsupportedModelError(
                f"{type(self.denoiser).__name__} blocks ({type(self.units[0].module).__name__}) have no known "
                f"components; known block classes: {sorted(self.block_specs)}. Use block-level caching "
                "(e.g. 'uniform:interval=2')"
            )
        present = np.array([[c in u.components for c in self.component_names] for u in self.units])
        return Layout(self.family, names, list(self.component_names), present)


    def slot_modules(self, granularity: str = BLOCK) -> dict[tuple[int, int], list[str]]:
        components = self.layout(granularity).components
        slots: dict[tuple[int, int], list[str]] = {}
        for u, unit in enumerate(self.units):
            if granularity == BLOCK:
                slots[u, 0] = [unit.name]
                continue
            for c, component in enumerate(components):
                if component in unit.components:
                    slots[u, c] = [f"{unit.name}.{component}"]
        return slots


def _has_block_list(denoiser: torch.nn.Module) -> bool:
    return any(
        isinstance(getattr(denoiser, n, None), torch.nn.ModuleList) and len(getattr(denoiser, n)) > 0
        for n in BLOCK_LIST_NAMES
    )


register_adapter("transformer", _has_block_list)(TransformerAdapter)
