"""The command line: exit codes and the schedule summary."""

import pytest

from diffcache.cli import main
from diffcache.testing import build_pipeline
from diffcache.schedules.presets import from_tag


def test_summary_prints_the_bits(tmp_path, capsys):
    path = tmp_path / "s.json"
    from_tag("deepcache:interval=3,branch=2", build_pipeline("sd").unet, 6).save(path)
    assert main(["summary", str(path)]) == 0
    out = capsys.readouterr().out
    assert "model: UNet2DConditionModel" in out
    assert "  1  1 1 1 0 0 0 0 0 0 0 0 0 0" in out  # step 1: units 0-2 (conv_in, branches 0-1) run, 3.. reused
    assert "cache usage ratio 51.3%" in out


def test_errors_exit_with_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert main(["summary", str(bad)]) == 1
    assert "not valid JSON" in capsys.readouterr().err
    assert main(["summary", str(tmp_path / "missing.json")]) == 1


def test_usage_errors_exit_2():
    with pytest.raises(SystemExit) as exc:
        main([])
    assert exc.value.code == 2
    with pytest.raises(SystemExit) as exc:
        main(["frobnicate"])
    assert exc.value.code == 2


def test_summary_with_pipeline_prints_macs(tmp_path, capsys):
    pipe = build_pipeline("dit")
    pipe.save_pretrained(tmp_path / "dit")
    path = tmp_path / "s.json"
    from_tag("uniform:interval=2", pipe.transformer, 4).save(path)
    assert main(["summary", str(path), "--pipeline", str(tmp_path / "dit")]) == 0
    out = capsys.readouterr().out
    assert "theoretical speedup" in out
    lines = [line for line in out.splitlines() if line.endswith("MACs")]
    assert len(lines) == 4 and lines[0].split()[-2] != lines[1].split()[-2]  # full step vs reuse step


def test_run_writes_an_image(tmp_path, capsys):
    build_pipeline("sd").save_pretrained(tmp_path / "sd")
    out = tmp_path / "car.png"
    code = main(["run", "--pipeline", str(tmp_path / "sd"), "--schedule", "deepcache:interval=2", "--prompt",
                 "a red car", "--steps", "4", "--out", str(out)])
    assert code == 0 and out.stat().st_size > 0
    assert "deepcache:interval=2" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        main(["run", "--pipeline", str(tmp_path / "sd"), "--class-label", "3", "--out", str(out)])
    assert exc.value.code == 2


def test_quantize_then_run_quantized(tmp_path, capsys):
    build_pipeline("dit").save_pretrained(tmp_path / "dit")
    labels = tmp_path / "labels.txt"
    labels.write_text("1\n2\n")
    calibration = tmp_path / "w8a8.npz"
    assert main(["quantize", "--pipeline", str(tmp_path / "dit"), "--prompts", str(labels), "--steps", "4",
                 "--out", str(calibration)]) == 0
    assert "w8a8:" in capsys.readouterr().out and calibration.stat().st_size > 0
    out = tmp_path / "q.png"
    assert main(["run", "--pipeline", str(tmp_path / "dit"), "--schedule", "fora:interval=2", "--class-label", "3",
                 "--steps", "4", "--quant", str(calibration), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "simulated" in printed and "MiB freed" in printed and out.stat().st_size > 0
    assert main(["run", "--pipeline", str(tmp_path / "dit"), "--class-label", "3", "--steps", "6", "--quant",
                 str(calibration), "--out", str(out)]) == 1
    assert "calibrated for 4 steps" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["quantize", "--pipeline", str(tmp_path / "dit"), "--prompts", str(tmp_path / "none.txt"),
              "--out", str(calibration)])
    assert exc.value.code == 2
