"""Calibration, ECAD, the router and `diffcache.search` end to end on the tiny offline pipelines."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import diffcache
from diffcache.adapters import denoiser_of, resolve_adapter
from diffcache.cli import main
from diffcache.errors import SearchError, UnsupportedModelError
from diffcache.eval.cost import CostProfile
from diffcache.schedules.budget import Budget, CostModel
from diffcache.data import CalibrationData
from diffcache.schedules.calibrate import Calibration, calibrate
from diffcache.schedules.evolution import EvolutionConfig, Genome, evolve, hypervolume
from diffcache.eval.quality import quality_function
from diffcache.testing import build_pipeline
from diffcache.schedules.presets import from_tag
from tests.conftest import psnr

REPO = Path(__file__).resolve().parents[2]
LABELS = [207, 360, 387, 974]
STEPS = 5


def data(**overrides) -> CalibrationData:
    return CalibrationData(**{"conditions": LABELS, "num_inference_steps": STEPS, "guidance_scale": 4.0,
                              "batch_size": 2} | overrides)


def images(pipe, d: CalibrationData) -> np.ndarray:
    return np.concatenate([np.asarray(pipe(**kwargs).images) for kwargs in d.batches(pipe)])


def test_calibration_records_every_slot_and_leaves_outputs_alone(dit, tmp_path):
    full = images(dit, data())
    calibration = calibrate(dit, data(), "component", cache_dir=tmp_path, progress=False)
    assert np.array_equal(images(dit, data()), full)
    assert not any(hasattr(m, "_diffusers_hook") and m._diffusers_hook.hooks for m in denoiser_of(dit).modules())
    units, comps = len(calibration.units), len(calibration.components)
    for d in calibration.distances.values():
        assert d.shape == (units, comps, STEPS, STEPS)
        present = d[calibration.present]
        assert np.allclose(present, present.transpose(0, 2, 1), atol=1e-6)
        assert np.allclose(np.diagonal(present, axis1=1, axis2=2), 0, atol=1e-5)
        assert (present[:, 0, 1:] > 0).all()  # every recorded slot changes between steps
    assert (calibration.step_error[1:] > 0).all() and calibration.step_error[0] == 0
    # Saved and reused: the second call does not run the pipeline.
    calls = []
    handle = denoiser_of(dit).register_forward_pre_hook(lambda *_: calls.append(1))
    again = calibrate(dit, data(), "component", cache_dir=tmp_path, progress=False)
    handle.remove()
    assert not calls
    assert np.array_equal(again.distances["l1"], calibration.distances["l1"])
    assert np.array_equal(again.step_error, calibration.step_error)


def test_calibration_errors(dit, tmp_path):
    calibration = calibrate(dit, data(), "block", cache_dir=tmp_path, progress=False, sensitivity=False)
    other = build_pipeline("pixart")
    with pytest.raises(SearchError, match="calibrate again"):
        calibration.check_model(resolve_adapter(denoiser_of(other)))
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a calibration")
    with pytest.raises(SearchError, match="not a readable diffcache calibration"):
        Calibration.load(bad)
    with pytest.raises(SearchError, match="at least one"):
        CalibrationData([])


def run_ecad(pipe, generations: int, checkpoint=None, resume=False, population: int = 8, steps: int = STEPS,
             key_steps: bool = False, **options):
    d = data(num_inference_steps=steps)
    adapter = resolve_adapter(denoiser_of(pipe))
    genome = Genome(from_tag("fora:interval=2", adapter, steps), nested=False, key_steps=key_steps)
    seeds = [from_tag(f"fora:interval={n}", adapter, steps) for n in (2, 3)]
    cost = CostModel("recompute")
    budget = options.pop("budget", None)
    config = EvolutionConfig(population=population, generations=generations, seed=3, **options)
    return evolve(pipe, d, genome, cost, quality_function("psnr"), seeds, config, checkpoint=checkpoint,
                  resume=resume, key="test", progress=False, budget=budget)


def test_ecad_front_is_non_dominated_and_improves(dit):
    result = run_ecad(dit, generations=3)
    points = [(s.meta["quality"], s.meta["cost"]) for s in result.front]
    assert len(points) >= 3
    for i, (q, c) in enumerate(points):
        for j, (q2, c2) in enumerate(points):
            assert i == j or not (q2 >= q and c2 <= c and (q2, c2) != (q, c)), "a front point is dominated"
    volumes = [h["hypervolume"] for h in result.history]
    assert all(b >= a for a, b in zip(volumes, volumes[1:]))
    assert volumes[-1] > volumes[0], volumes
    assert result.history[-1]["evaluated"] > result.history[0]["evaluated"]
    # The predicted cost and the recorded quality are those of the decoded schedule.
    best = result.pick(Budget("recompute", 0.7))
    assert best.recompute_fraction <= 0.7
    full = images(dit, data())
    with diffcache.accelerated(dit, best):
        assert float(np.mean([psnr(a, b) for a, b in zip(images(dit, data()), full)])) == pytest.approx(
            best.meta["quality"], rel=1e-4)


def test_ecad_resume_reproduces_the_uninterrupted_run(dit, tmp_path):
    straight = run_ecad(dit, generations=3)
    path = tmp_path / "ckpt.json"
    run_ecad(dit, generations=1, checkpoint=path)
    with pytest.raises(SearchError, match="resume"):
        run_ecad(dit, generations=3, checkpoint=path)
    resumed = run_ecad(dit, generations=3, checkpoint=path, resume=True)
    assert [s.to_dict() for s in resumed.front] == [s.to_dict() for s in straight.front]
    assert resumed.history == straight.history
    with pytest.raises(SearchError, match="another search"):
        run_ecad(dit, generations=3, checkpoint=path, resume=True, population=12)
    path.write_text("{broken")
    with pytest.raises(SearchError, match="unreadable"):
        run_ecad(dit, generations=3, checkpoint=path, resume=True)


def test_shifts_move_runs_of_key_steps():
    from diffcache.schedules.evolution import _shifts

    # key steps at bits 1 and 3: move either alone, or both, one step either way where they stay in range
    assert sorted(_shifts("0101")) == sorted(["1001", "0011", "1010", "0110"])
    assert all(s.count("1") == 4 for s in _shifts("1011001")) and len(_shifts("1011001")) == 8


def test_polish_improves_the_pick_within_budget_and_resumes(dit, tmp_path):
    budget = Budget("recompute", 0.5)
    plain = run_ecad(dit, generations=1, steps=8, key_steps=True, polish=0)
    path = tmp_path / "ckpt.json"
    polished = run_ecad(dit, generations=1, steps=8, key_steps=True, polish=30, budget=budget, checkpoint=path)
    before, after = plain.pick(budget), polished.pick(budget)
    assert after.recompute_fraction <= 0.5 and after.meta["quality"] > before.meta["quality"]
    evaluated = len(json.loads(path.read_text())["evaluated"])
    assert 0 < evaluated - plain.history[-1]["evaluated"] <= 30
    again = run_ecad(dit, generations=1, steps=8, key_steps=True, polish=30, budget=budget, checkpoint=path,
                     resume=True)
    assert again.pick(budget).to_dict() == after.to_dict()
    with pytest.raises(SearchError, match="polish must be >= 0"):
        EvolutionConfig(polish=-1)


def test_unet_genome_decodes_to_valid_shells():
    pipe = build_pipeline("sd")
    adapter = resolve_adapter(denoiser_of(pipe))
    genome = Genome(from_tag("none", adapter, 4), nested=True)
    rng = np.random.default_rng(0)
    for _ in range(20):
        schedule = genome.decode(rng.integers(0, 2, genome.length))
        adapter.check_schedule(schedule)  # raises unless every step is 1..10..0
    deepcache = from_tag("deepcache:interval=2,branch=2", adapter, 4)
    assert genome.decode(genome.encode(deepcache)).recompute.tolist() == deepcache.recompute.tolist()


def test_key_step_genome_round_trips_presets():
    unet = resolve_adapter(denoiser_of(build_pipeline("sd")))
    genome = Genome(from_tag("none", unet, 8), nested=True, key_steps=True, branch=2)
    assert genome.length == 7
    deepcache = from_tag("deepcache:interval=3,branch=2", unet, 8)
    assert genome.encode(deepcache) == [0, 0, 1, 0, 0, 1, 0]
    assert genome.decode(genome.encode(deepcache)).recompute.tolist() == deepcache.recompute.tolist()
    body = Genome(from_tag("none", unet, 8), nested=True, key_steps=True, branch=-1)
    whole = from_tag("uniform:interval=3", unet, 8)  # TaylorSeer's cut: the whole body reused
    assert body.decode(body.encode(whole)).recompute.tolist() == whole.recompute.tolist()
    dit = resolve_adapter(denoiser_of(build_pipeline("dit")))
    genome = Genome(from_tag("fora:interval=2", dit, 8), nested=False, key_steps=True)
    fora = from_tag("fora:interval=3,warmup=2", dit, 8)
    assert genome.encode(fora) == [1, 0, 0, 1, 0, 0, 1]
    assert genome.decode(genome.encode(fora)).recompute.tolist() == fora.recompute.tolist()


@pytest.mark.parametrize("key_steps", [False, True])
def test_shift_mutation_moves_computed_slots_along_the_steps_at_the_same_cost(key_steps):
    import random

    dit = resolve_adapter(denoiser_of(build_pipeline("dit")))
    template = from_tag("none", dit, 9)
    genome = Genome(template, nested=False, key_steps=key_steps)
    assert genome.stride == (1 if key_steps else len(dit.unit_names) * len(template.components))
    mutate = EvolutionConfig(shift_prob=1.0).mutation(genome)
    rng, moved = random.Random(0), 0
    for _ in range(200):
        bits = [rng.randint(0, 1) for _ in range(genome.length)]
        child = list(bits)
        mutate(child, rng)
        changed = np.flatnonzero(np.array(bits) != np.array(child))
        if sum(child) == sum(bits):  # a shift: one slot's bits rolled, each slot keeps its count
            moved += 1
            assert len(set((changed % genome.stride).tolist())) == 1
            for lane in range(genome.stride):
                assert sum(child[lane::genome.stride]) == sum(bits[lane::genome.stride])
        else:  # the stretch drawn held equal bits: one flip instead, never an unchanged child
            assert sum(a != b for a, b in zip(bits, child)) == 1
    assert moved > 100
    flips = EvolutionConfig(shift_prob=0.0).mutation(genome)
    child = [0] * genome.length
    flips(child, rng)
    assert sum(child) >= 1


@pytest.mark.parametrize("method", ["dp", "bac", "ecad", "router"])
def test_search_result_fits_budget_and_runs_through_accelerate(dit, tmp_path, method):
    options = {"ecad": {"generations": 1, "population": 8, "key_steps": 1},
               "router": {"epochs": 2, "lambda_every": 1}}
    schedule = diffcache.search(dit, LABELS, method, "recompute:0.6", num_inference_steps=STEPS,
                                guidance_scale=4.0, batch_size=2, out_dir=tmp_path, progress=False,
                                presets=False, **options.get(method, {}))  # the method's own pick
    assert schedule.method == method and schedule.num_steps == STEPS
    assert schedule.recompute_fraction <= 0.6 + 1e-9
    assert schedule.meta["predicted_cost"] == pytest.approx(schedule.recompute_fraction, abs=1e-6)
    assert schedule.model == resolve_adapter(denoiser_of(dit)).model_info
    path = tmp_path / "s.json"
    schedule.save(path)
    full = images(dit, data())
    diffcache.accelerate(dit, str(path))
    cached = images(dit, data())
    summary = diffcache.summary(dit)
    diffcache.restore(dit)
    assert summary.planned_cache_usage_ratio == pytest.approx(schedule.cache_usage_ratio)
    assert 15 < np.mean([psnr(a, b) for a, b in zip(cached, full)]) < 100
    assert np.array_equal(images(dit, data()), full)
    if method == "ecad":
        front = json.loads((tmp_path / "ecad-front.json").read_text())
        assert front and all(diffcache.Schedule.from_dict(s).meta["cost"] <= 1 for s in front)
        assert (tmp_path / "ecad-pareto.png").stat().st_size > 1000


def test_search_bad_input(dit):
    with pytest.raises(SearchError, match="unknown search method"):
        diffcache.search(dit, LABELS, "magic")
    with pytest.raises(SearchError, match="cannot read budget"):
        diffcache.search(dit, LABELS, "dp", "fast")
    with pytest.raises(SearchError, match="forecast must be one of"):
        diffcache.search(dit, LABELS, "dp", "2x", forecast=3)
    with pytest.raises(SearchError, match="ecad options"):
        diffcache.search(dit, LABELS, "ecad", "2x", num_inference_steps=STEPS, progress=False, generation=3)
    with pytest.raises(UnsupportedModelError, match="transformers"):
        diffcache.search(build_pipeline("sd"), ["a cat"], "router", "2x", num_inference_steps=3, progress=False)


def test_router_prefers_steps_whose_reuse_hurts(dit):
    from diffcache.schedules.router import RouterConfig, train_router

    adapter = resolve_adapter(denoiser_of(dit))
    router = train_router(dit, adapter, data(), "component", RouterConfig(epochs=2, lambda_every=1), progress=False)
    assert router.scores[0].min() == 1.0
    assert 0 < router.scores[1:].mean() < 1
    loose = router.schedule(CostModel("recompute"), Budget("recompute", 0.8))
    tight = router.schedule(CostModel("recompute"), Budget("recompute", 0.4))
    assert (tight.recompute <= loose.recompute).all()  # one ranking, cut at two budgets
    assert tight.recompute_fraction <= 0.4 < loose.recompute_fraction <= 0.8


def test_cli_search_writes_a_schedule_that_runs(tmp_path, monkeypatch, capsys):
    sd = build_pipeline("sd")
    sd.save_pretrained(tmp_path / "sd")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "prompts.txt").write_text("a red car\na blue bird\n")
    code = main(["-q", "search", "--pipeline", str(tmp_path / "sd"), "--prompts", "prompts.txt", "--budget", "2x",
                 "--steps", "6", "--out", "s.json", "--option", "branch=1", "--forecast", "1"])
    assert code == 0
    schedule = diffcache.Schedule.load(tmp_path / "s.json")
    assert schedule.method == "dp" and schedule.params["branch"] == 1 and schedule.meta["predicted_speedup"] >= 2
    assert schedule.forecast == 1
    assert "wrote s.json" in capsys.readouterr().out
    code = main(["-q", "run", "--pipeline", str(tmp_path / "sd"), "--schedule", "s.json", "--prompt", "a cat",
                 "--steps", "6", "--out", "cat.png"])
    assert code == 0 and (tmp_path / "cat.png").exists()
    for argv, message in ((["--budget", "soon"], "cannot read budget"), (["--prompts", "none.txt"], "does not exist")):
        base = {"--pipeline": str(tmp_path / "sd"), "--prompts": "prompts.txt", "--out": "x.json"}
        base.update(dict(zip(argv[::2], argv[1::2])))
        with pytest.raises(SystemExit) as exc:
            main(["search", *[x for kv in base.items() for x in kv]])
        assert exc.value.code == 2 and message in capsys.readouterr().err


def test_ecad_two_processes_match_one(dit, tmp_path):
    (tmp_path / "labels.txt").write_text("\n".join(map(str, LABELS)) + "\n")
    pipe_dir = tmp_path / "dit"
    dit.save_pretrained(pipe_dir)
    args = ["-q", "search", "--pipeline", str(pipe_dir), "--prompts", str(tmp_path / "labels.txt"), "--method",
            "ecad", "--budget", "recompute:0.6", "--steps", str(STEPS), "--guidance", "4", "--batch-size", "2",
            "--option", "generations=1", "--option", "population=8"]
    assert main([*args, "--out", str(tmp_path / "one.json")]) == 0
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2", "--num_machines",
               "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "diffcache", *args, "--out",
               str(tmp_path / "two.json")]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    one = json.loads((tmp_path / "one-search" / "ecad-checkpoint.json").read_text())
    two = json.loads((tmp_path / "two-search" / "ecad-checkpoint.json").read_text())
    assert one["evaluated"] == two["evaluated"] and one["population"] == two["population"]
    assert diffcache.Schedule.load(tmp_path / "one.json").recompute.tolist() == diffcache.Schedule.load(
        tmp_path / "two.json").recompute.tolist()


def test_hypervolume():
    assert hypervolume([(2.0, 0.5)], (0.0, 1.0)) == pytest.approx(1.0)
    assert hypervolume([(2.0, 0.5), (1.0, 0.25), (1.5, 0.75)], (0.0, 1.0)) == pytest.approx(1.0 * 0.75 + 1.0 * 0.5)


def test_search_prices_with_a_given_cost_model(dit, tmp_path):
    """One profile for several searches (and for pricing a baseline at the price the search sees): the search
    uses it, and refuses one of another measure or layout."""
    kwargs = data().batches(dit)[0]
    block = CostModel.measure_on(dit, kwargs, "macs", "block")
    profile = block.profile
    slots = profile.slot_cost.copy()
    slots[:] = 0.2 * profile.total / len(slots)  # the blocks cost a fifth of the call: 2x is out of reach
    skewed = CostModel("macs", CostProfile(profile.units, profile.components, slots, profile.total, "macs"))
    with pytest.raises(SearchError, match="below the cheapest"):
        diffcache.search(dit, LABELS, "dp", "2x", num_inference_steps=STEPS, guidance_scale=4.0, batch_size=2,
                         cost_model=skewed, progress=False, out_dir=tmp_path)
    schedule = diffcache.search(dit, LABELS, "dp", "1.1x", num_inference_steps=STEPS, guidance_scale=4.0,
                                batch_size=2, cost_model=skewed, progress=False, out_dir=tmp_path, presets=False)
    assert schedule.meta["predicted_speedup"] == pytest.approx(1 / skewed.fraction(schedule), abs=1e-4)
    # Priced by its own profile the same schedule is far cheaper: the search did not profile one.
    assert skewed.fraction(schedule) <= 1 / 1.1 and block.fraction(schedule) < 0.6
    with pytest.raises(SearchError, match="measures macs, the budget"):
        diffcache.search(dit, LABELS, "dp", "latency:2x", cost_model=block, progress=False)
    with pytest.raises(SearchError, match="profile it at the search's granularity"):
        diffcache.search(dit, LABELS, "ecad", "2x", cost_model=block, progress=False)  # ecad: components
