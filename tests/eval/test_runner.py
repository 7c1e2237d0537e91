"""The evaluation runner: summaries against the full model, resume after an interruption, 2 processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from diffcache.cli import main
from diffcache.eval.runner import EvalConfig, evaluate
from diffcache.loading import load_any_pipeline
from diffcache.testing import build_pipeline

PROMPTS = ["a red car", "a blue bird", "a green tree", "a cat", "a dog"]
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("pipes") / "sd"
    build_pipeline("sd").save_pretrained(path)
    return str(path)


def config(out: Path, **kw) -> EvalConfig:
    return EvalConfig(["deepcache:interval=3"], PROMPTS, ["psnr", "ssim"], out, num_inference_steps=6, **kw)


def rows(path: Path, kind: str) -> list[dict]:
    return [r for r in map(json.loads, path.read_text().splitlines()) if r["kind"] == kind]


def test_summaries_compare_with_the_full_model(sd_dir, tmp_path):
    pipe = load_any_pipeline(sd_dir)
    summaries = evaluate(pipe, config(tmp_path / "r.jsonl"), progress=False)
    full, cached = summaries
    assert full["method"] == "full" and full["psnr"] == 100.0 and full["ssim"] == pytest.approx(1.0)
    # 4 of 6 steps reuse 12 of the 13 units (branch 0: conv_in's shell runs)
    assert cached["psnr_ci"][0] <= cached["psnr"] <= cached["psnr_ci"][1] and "psnr_ci" not in full
    assert 20 < cached["psnr"] < 100 and cached["cache_usage_ratio"] == pytest.approx(4 * 12 / (6 * 13), abs=1e-4)
    assert cached["macs_speedup"] > 1.5
    assert len(rows(tmp_path / "r.jsonl", "image")) == 2 * len(PROMPTS)
    assert sorted(os.listdir(tmp_path / "r_images")) == ["deepcache-interval-3", "full"]


def test_quantized_schedules_get_their_own_rows(sd_dir, tmp_path):
    pipe = load_any_pipeline(sd_dir)
    out = tmp_path / "r.jsonl"
    evaluate(pipe, config(out), progress=False)
    summaries = evaluate(pipe, config(out, quant="w8"), progress=False)
    methods = [s["method"] for s in summaries]
    assert methods == ["full", "deepcache:interval=3 + w8"]
    assert 20 < summaries[1]["psnr"] < 100
    labels = {r["method"] for r in rows(out, "image")}
    assert labels == {"full", "deepcache:interval=3", "deepcache:interval=3 + w8"}  # float rows kept apart


class Interrupt(Exception):
    pass


def test_resume_after_interruption_loses_and_duplicates_nothing(sd_dir, tmp_path):
    out = tmp_path / "r.jsonl"
    pipe = load_any_pipeline(sd_dir)
    calls = [0]

    def stop_at_seventh_image(_pipe, step, _t, tensors):
        if step == 0:
            calls[0] += 1
            if calls[0] == 7:
                raise Interrupt
        return tensors

    with pytest.raises(Interrupt):
        evaluate(pipe, config(out, extra_kwargs={"callback_on_step_end": stop_at_seventh_image}), progress=False)
    first = rows(Path(f"{out}.part0"), "image")
    assert len(first) == 6  # 5 full + 1 cached were finished before the interruption
    evaluate(pipe, config(out), progress=False)
    final = rows(out, "image")
    keys = [(r["method"], r["index"]) for r in final]
    assert len(keys) == len(set(keys)) == 2 * len(PROMPTS)
    kept = {(r["method"], r["index"]): r for r in final}
    assert all(kept[r["method"], r["index"]] == r for r in first)  # finished rows were not redone
    assert not list(tmp_path.glob("r.jsonl.part*"))
    # A second complete run changes nothing.
    evaluate(pipe, config(out), progress=False)
    assert rows(out, "image") == final


def test_two_processes_match_one(sd_dir, tmp_path):
    single = tmp_path / "single.jsonl"
    evaluate(load_any_pipeline(sd_dir), config(single), progress=False)
    double = tmp_path / "double.jsonl"
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "diffcache", "-q", "eval", "--pipeline", sd_dir,
        "--schedule", "deepcache:interval=3", "--prompts", str(tmp_path / "prompts.txt"), "--metrics", "psnr,ssim",
        "--steps", "6", "--out", str(double),
    ]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    strip = lambda r: {k: v for k, v in r.items() if k not in ("seconds", "path")}  # noqa: E731
    assert [strip(r) for r in rows(double, "image")] == [strip(r) for r in rows(single, "image")]
    for a, b in zip(rows(double, "image"), rows(single, "image")):
        assert (tmp_path / a["path"]).read_bytes() == (tmp_path / b["path"]).read_bytes()
    (cached_double,) = [r for r in rows(double, "summary") if r["method"] != "full"]
    (cached_single,) = [r for r in rows(single, "summary") if r["method"] != "full"]
    assert cached_double["psnr"] == cached_single["psnr"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--prompts", "missing.txt"], "does not exist"),
        (["--metrics", "psnr,fidelity"], "unknown metrics \\['fidelity'\\]"),
        (["--pipeline", "no-such-model"], "unknown pipeline 'no-such-model'"),
    ],
)
def test_cli_bad_input_exits_2(sd_dir, tmp_path, monkeypatch, capsys, argv, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "prompts.txt").write_text("a red car\n")
    base = {"--pipeline": sd_dir, "--prompts": "prompts.txt", "--metrics": "psnr", "--out": "r.jsonl",
            "--schedule": "none"}
    base.update(dict(zip(argv[::2], argv[1::2])))
    with pytest.raises(SystemExit) as exc:
        main(["eval", *[x for kv in base.items() for x in kv]])
    assert exc.value.code == 2
    assert pytest.importorskip("re").search(message, capsys.readouterr().err)


@pytest.mark.skipif(__import__("importlib").util.find_spec("torch_fidelity") is not None,
                    reason="torch-fidelity is installed: Inception may be available")
def test_unavailable_metric_fails_before_generating(sd_dir, tmp_path):
    from diffcache.errors import MetricUnavailableError

    out = tmp_path / "r.jsonl"
    with pytest.raises(MetricUnavailableError, match="--fid-features"):
        evaluate(load_any_pipeline(sd_dir), EvalConfig(["none"], PROMPTS, ["fid"], out), progress=False)
    assert not (tmp_path / "r_images").exists()
