"""A custom denoiser no built-in adapter names: found through its block ModuleList, or chosen with units=."""

from types import SimpleNamespace

import pytest
import torch
from diffusers import DDIMScheduler

import diffcache
from diffcache.adapters import TransformerAdapter, resolve_adapter


class Block(torch.nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.mlp = torch.nn.Sequential(torch.nn.Linear(dim, 4 * dim), torch.nn.GELU(), torch.nn.Linear(4 * dim, dim))

    def forward(self, hidden_states: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        return hidden_states + self.mlp(hidden_states + temb)


class PolicyNet(torch.nn.Module):
    """A diffusion-policy-like denoiser: action sequence in, noise out."""

    def __init__(self, dim: int = 16, depth: int = 4) -> None:
        super().__init__()
        self.time = torch.nn.Linear(1, dim)
        self.blocks = torch.nn.ModuleList(Block(dim) for _ in range(depth))
        self.out = torch.nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        temb = self.time(t.float().view(1, 1, 1) / 1000)
        for block in self.blocks:
            x = block(x, temb)
        return self.out(x)


def make_pipe():
    torch.manual_seed(0)
    return SimpleNamespace(transformer=PolicyNet().eval(), scheduler=DDIMScheduler(clip_sample=False))


def sample(pipe, steps: int = 8) -> torch.Tensor:
    x = torch.randn(2, 10, 16, generator=torch.Generator().manual_seed(0))
    pipe.scheduler.set_timesteps(steps)
    with torch.no_grad():
        for t in pipe.scheduler.timesteps:
            x = pipe.scheduler.step(pipe.transformer(x, t), t, x).prev_sample
    return x


def test_block_list_is_found_and_cached():
    pipe = make_pipe()
    adapter = resolve_adapter(pipe.transformer)
    assert isinstance(adapter, TransformerAdapter)
    assert adapter.unit_names == ["blocks.0", "blocks.1", "blocks.2", "blocks.3"]
    ref = sample(pipe)
    diffcache.accelerate(pipe, "none")
    assert torch.equal(sample(pipe), ref)
    diffcache.accelerate(pipe, "uniform:interval=2")
    calls = [0]
    pipe.transformer.blocks[2].mlp[0].register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    cached = sample(pipe)
    assert calls[0] == 4  # steps 0, 2, 4, 6 of 8
    # Random weights blow the sample up over 8 steps; compare relative to its scale.
    error = ((cached - ref).abs().max() / ref.abs().max()).item()
    assert 0 < error < 0.3, error
    diffcache.restore(pipe)
    assert torch.equal(sample(pipe), ref)


def test_units_pattern_and_components_refused():
    pipe = make_pipe()
    diffcache.accelerate(pipe, "uniform:interval=2", units=["blocks.1", "blocks.3"])
    assert diffcache.summary(pipe).units == ["blocks.1", "blocks.3"]
    with pytest.raises(diffcache.UnsupportedModelError, match="no known components.*Block"):
        diffcache.accelerate(pipe, "fora:interval=2")
