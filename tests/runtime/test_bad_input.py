"""Bad input fails in `accelerate` with a specific error and a message that says what to do."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler

import diffcache
from diffcache import Schedule, ScheduleError, UnsupportedModelError
from diffcache.adapters import resolve_adapter
from diffcache.testing import build_pipeline
from diffcache.schedules.presets import from_tag

from .test_accelerate import hooked_modules


def dit_schedule(pipe, **changes) -> Schedule:
    s = from_tag("fora:interval=2", pipe.transformer, num_steps=6)
    data = s.to_dict() | changes
    return Schedule.from_dict(data)


def test_wrong_unit_count():
    pipe = build_pipeline("dit")
    s = dit_schedule(pipe)
    short = Schedule(s.recompute[:, :2], s.units[:2], s.components, method="ecad")
    with pytest.raises(ScheduleError, match=r"schedule has 2 units but DiTTransformer2DModel has \d+ "
                                            r"\(transformer_blocks.0 .. transformer_blocks.\d+\)"):
        diffcache.accelerate(pipe, short)
    assert hooked_modules(pipe) == []  # nothing half-attached


def test_unknown_unit_names():
    pipe = build_pipeline("dit")
    s = dit_schedule(pipe)
    renamed = Schedule(s.recompute, [u.replace("transformer_blocks", "blocks") for u in s.units], s.components)
    with pytest.raises(ScheduleError, match="unknown units \\['blocks.0'"):
        diffcache.accelerate(pipe, renamed)


def test_wrong_components():
    pipe = build_pipeline("dit")
    s = dit_schedule(pipe)
    other = Schedule(s.recompute[:, :, :2], s.units, ["attn1", "attn2"])
    with pytest.raises(ScheduleError, match="components \\['attn1', 'attn2'\\] do not match"):
        diffcache.accelerate(pipe, other)


def test_fingerprint_mismatch(tmp_path):
    pipe = build_pipeline("dit")
    s = dit_schedule(pipe, model={"class": "DiTTransformer2DModel", "fingerprint": "0123456789abcdef"})
    path = tmp_path / "s.json"
    s.save(path)
    with pytest.raises(ScheduleError, match="made for DiTTransformer2DModel \\(config 0123456789abcdef\\).*re-run"):
        diffcache.accelerate(pipe, str(path))


def test_corrupt_and_missing_json(tmp_path):
    pipe = build_pipeline("dit")
    path = tmp_path / "s.json"
    dit_schedule(pipe).save(path)
    path.write_text(path.read_text()[:-40])
    with pytest.raises(ScheduleError, match="not valid JSON"):
        diffcache.accelerate(pipe, path)
    with pytest.raises(FileNotFoundError, match="no schedule file"):
        diffcache.accelerate(pipe, str(tmp_path / "nope.json"))


def test_reuse_at_step_zero_in_file(tmp_path):
    pipe = build_pipeline("dit")
    data = dit_schedule(pipe).to_dict()
    data["steps"][0] = data["steps"][1]
    path = tmp_path / "s.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ScheduleError, match="step 0 reuses unit 'transformer_blocks.0'"):
        diffcache.accelerate(pipe, path)


def test_unet_bits_must_be_shallow_first():
    pipe = build_pipeline("sd")
    adapter = resolve_adapter(pipe.unet)
    bits = np.ones((4, len(adapter.units), 1), dtype=bool)
    bits[2, 3] = False  # reuse unit 3 but recompute deeper units 4..12
    with pytest.raises(ScheduleError, match="step 2: UNet branch bits 1110111111111 recompute a deeper unit"):
        diffcache.accelerate(pipe, Schedule(bits, adapter.units, ["block"]))


def test_unsupported_model_names_what_it_found():
    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj_in = torch.nn.Linear(4, 4)
            self.head = torch.nn.Linear(4, 4)

    pipe = SimpleNamespace(transformer=Tiny(), scheduler=DDIMScheduler())
    with pytest.raises(UnsupportedModelError, match=r"no diffcache adapter for Tiny.*proj_in \(Linear\).*units="):
        diffcache.accelerate(pipe, "uniform:interval=2")
    with pytest.raises(UnsupportedModelError, match="matched no module of Tiny"):
        diffcache.accelerate(pipe, "uniform:interval=2", units="blocks.*")
    # Component caching needs known block classes.
    with pytest.raises(UnsupportedModelError, match="no known components"):
        diffcache.accelerate(pipe, "fora:interval=2", units="proj_in")
    with pytest.raises(UnsupportedModelError, match="has no `unet` or `transformer`"):
        diffcache.accelerate(SimpleNamespace(scheduler=DDIMScheduler()), "none")


def test_unknown_tag_lists_presets():
    with pytest.raises(ScheduleError, match="known presets: \\['deepcache', 'fora', 'none', 'uniform'\\]"):
        diffcache.accelerate(build_pipeline("sd"), "teacache:threshold=0.1")
