"""Schedule: validation, JSON, tags, resampling."""

import json

import numpy as np
import pytest

from diffcache import Schedule, ScheduleError
from diffcache.adapters import resolve_adapter
from diffcache.schedules.presets import parse_tag, quadratic_key_steps
from diffcache.testing import build_pipeline
from diffcache.schedules.presets import from_tag, resample, tag_of


def make(steps=4, units=3, comps=2, **kw):
    bits = np.ones((steps, units, comps), dtype=bool)
    bits[1::2, 1:] = False
    return Schedule(bits, [f"u{i}" for i in range(units)], [f"c{i}" for i in range(comps)], **kw)


def test_derived_numbers():
    s = make()
    # steps 1 and 3 reuse units 1, 2 (both components): 2 * 2 * 2 of 4 * 3 * 2 slots.
    assert s.num_steps == 4
    assert s.cache_usage_ratio == pytest.approx(8 / 24)
    assert s.recompute_fraction == pytest.approx(16 / 24)
    with pytest.raises(ValueError):
        s.recompute[0, 0, 0] = False  # frozen plan


def test_json_round_trip(tmp_path):
    present = np.ones((3, 2), dtype=bool)
    present[2, 1] = False
    bits = np.ones((4, 3, 2), dtype=bool)
    bits[2, 0, 1] = False
    s = Schedule(bits, ["a", "b", "c"], ["x", "y"], method="ecad", params={"g": 3}, meta={"note": "t"}, present=present)
    path = tmp_path / "s.json"
    s.save(path)
    data = json.loads(path.read_text())
    assert data["format"] == "diffcache.schedule/1"
    assert data["steps"][2] == "10 11 1-"
    loaded = Schedule.load(path)
    assert loaded == s
    assert np.array_equal(loaded.recompute, s.recompute) and np.array_equal(loaded.present_mask, present)
    assert loaded.cache_usage_ratio == pytest.approx(1 / 20)


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda d: d.update(format="diffcache.schedule/9"), "unknown schedule format"),
        (lambda d: d["steps"].__setitem__(1, "11 11"), "expected 3 space-separated groups"),
        (lambda d: d["steps"].__setitem__(1, "11 1x 11"), "only '1', '0' and '-'"),
        (lambda d: d["steps"].__setitem__(0, "01 11 11"), "step 0 reuses unit 'u0'"),
        (lambda d: d.pop("units"), "missing"),
        (lambda d: d.update(num_steps=7), "num_steps says 7"),
    ],
)
def test_from_dict_rejects(mutate, match):
    data = make().to_dict()
    mutate(data)
    with pytest.raises(ScheduleError, match=match):
        Schedule.from_dict(data)


def test_load_errors(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"format": "diffcache.schedule/1", "units": [')
    with pytest.raises(ScheduleError, match="not valid JSON"):
        Schedule.load(bad)
    with pytest.raises(FileNotFoundError, match="no schedule file"):
        Schedule.load(tmp_path / "missing.json")


def test_constructor_validation():
    with pytest.raises(ScheduleError, match=r"expected \(num_steps >= 1, 2 units, 1 components\)"):
        Schedule(np.ones((3, 3, 1), bool), ["a", "b"], ["block"])
    with pytest.raises(ScheduleError, match="step 0 reuses"):
        Schedule(np.zeros((3, 2, 1), bool), ["a", "b"], ["block"])
    with pytest.raises(ScheduleError, match="unique"):
        Schedule(np.ones((3, 2, 1), bool), ["a", "a"], ["block"])
    with pytest.raises(ScheduleError, match="booleans"):
        Schedule(np.full((3, 2, 1), 2), ["a", "b"], ["block"])


def test_resample_custom_keeps_refreshes(caplog):
    bits = np.zeros((20, 2, 1), dtype=bool)
    bits[::4] = True  # refresh at 0, 4, 8, 12, 16
    s = Schedule(bits, ["a", "b"], ["block"], method="ecad")
    with caplog.at_level("WARNING"):
        down = resample(s, 10)
    assert "resampled to 10" in caplog.text
    assert np.flatnonzero(down.recompute[:, 0, 0]).tolist() == [0, 2, 4, 6, 8]
    up = resample(s, 40)
    assert np.flatnonzero(up.recompute[:, 0, 0]).tolist() == [0, 8, 16, 24, 32]
    assert resample(s, 20) is s
    assert down.meta["resampled_from"] == 20


def test_tags_round_trip_and_regenerate():
    pipe = build_pipeline("sd")
    adapter = resolve_adapter(pipe.unet)
    s = from_tag("deepcache:interval=3,branch=2", pipe.unet, num_steps=10)
    assert tag_of(s) == "deepcache:interval=3,branch=2"
    assert from_tag(tag_of(s), adapter, 10) == s
    assert s.model == adapter.model_info
    # Full steps 0,3,6,9 recompute all; other steps recompute only units 0-2 (conv_in's shell, branches 0 and 1);
    # unit 3 (branch 2) and deeper are reused.
    assert np.flatnonzero(s.recompute[:, -1, 0]).tolist() == [0, 3, 6, 9]
    assert s.recompute[1, :3, 0].all() and not s.recompute[1, 3:, 0].any()
    s7 = resample(s, 7)
    assert s7 == from_tag(tag_of(s), adapter, 7)
    assert Schedule.from_dict(s.to_dict()) == s


def test_tag_errors():
    pipe = build_pipeline("dit")
    with pytest.raises(ScheduleError, match="unknown schedule tag 'deepkash'.*known presets"):
        parse_tag("deepkash:interval=3")
    with pytest.raises(ScheduleError, match="interval must be int"):
        parse_tag("deepcache:interval=three")
    with pytest.raises(ScheduleError, match="key=value with key in"):
        parse_tag("fora:intervall=2")
    with pytest.raises(ScheduleError, match="applies to denoisers with nested units"):
        from_tag("deepcache:interval=3", pipe.transformer)
    with pytest.raises(ScheduleError, match="interval must be >= 1"):
        from_tag("fora:interval=0", pipe.transformer)
    sd = build_pipeline("sd")
    with pytest.raises(ScheduleError, match="branch must be in -1..11"):
        from_tag("deepcache:interval=3,branch=12", sd.unet)


def test_quadratic_key_steps():
    # Paper example (T=50, N=5, c=20, p=1.4); the official complex-power code gives
    # [0,6,10,15,19,23,27,32,38,43]; the sign-preserving version differs by 1-2 steps (specs, section 1).
    steps = quadratic_key_steps(50, 5, 20, 1.4)
    official = [0, 6, 10, 15, 19, 23, 27, 32, 38, 43]
    assert len(steps) == 10 and steps[0] == 0
    assert max(abs(a - b) for a, b in zip(steps, official)) <= 2
    gaps = np.diff(steps)
    assert gaps[3:5].max() < gaps[-1]  # denser near the centre than at the end


def test_hand_edited_preset_is_resampled_as_custom(caplog):
    s = from_tag("fora:interval=2", build_pipeline("dit").transformer, num_steps=8)
    bits = s.recompute.copy()
    bits[4] = False  # drop one refresh by hand
    edited = Schedule(bits, s.units, s.components, s.method, s.params, s.model, present=s.present)
    with caplog.at_level("WARNING"):
        resampled = resample(edited, 16)
    assert "resampled to 16" in caplog.text
    assert np.flatnonzero(resampled.recompute[:, 0, 0]).tolist() == [0, 4, 12]
    assert resample(s, 16) == from_tag("fora:interval=2", build_pipeline("dit").transformer, 16)


@pytest.mark.parametrize(("tag", "message"), [
    ("uniform:interval=100", "interval 100 >= the 25 steps, so after the warm-up no step refreshes the cache (96%"),
    ("uniform:interval=2,warmup=30", "reuses nothing at 25 steps (warmup=30 covers them all)"),
])
def test_presets_that_make_caching_pointless_warn(caplog, tag, message):
    transformer = build_pipeline("dit").transformer
    with caplog.at_level("WARNING"):
        from_tag(tag, transformer, 25)
    assert message in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        from_tag("uniform:interval=3", transformer, 25)
    assert caplog.text == ""


def test_resampling_a_searched_plan_says_what_changed(caplog):
    s = from_tag("uniform:interval=3", build_pipeline("dit").transformer, 25)
    searched = Schedule(s.recompute, s.units, s.components, "dp")
    with caplog.at_level("WARNING"):
        resample(searched, 50)
    assert "resampled to 50: cache usage 64% -> 82%, key steps 9 -> 9 (more steps reuse" in caplog.text
