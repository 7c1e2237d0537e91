"""The command line: exit codes and the schedule summary."""

import pytest

from diffcache.cli import main
from diffcache.quant import QuantCalibration
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


def test_quantize_finetune_writes_a_finetuned_calibration_and_resumes(tmp_path, capsys):
    labels = tmp_path / "labels.txt"
    labels.write_text("1\n2\n3\n")
    out = tmp_path / "w4a8-ft.npz"
    argv = ["quantize", "--pipeline", "digits-unet", "--prompts", str(labels), "--steps", "3", "--config", "w4a8",
            "--finetune", "2", "--out", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "EfficientDM: 2 epochs" in printed and (tmp_path / "w4a8-ft.npz.ckpt.npz").exists()
    first = QuantCalibration.load(out)
    assert first.method == "efficientdm" and first.training["epochs_done"] == 2
    assert main(argv) == 0  # the checkpoint holds all epochs: resumed, nothing retrained, the same result
    assert QuantCalibration.load(out).key == first.key
    assert main(argv[:-4] + ["--finetune", "2", "--lr-scale", "0", "--out", str(tmp_path / "x.npz")]) == 1
    assert "lr_scale > 0" in capsys.readouterr().err


@pytest.mark.parametrize(("argv", "message"), [
    (["run", "--pipeline", "./no-such-model", "--class-label", "1"], "no pipeline directory at './no-such-model'"),
    (["run", "--pipeline", "EMPTY", "--class-label", "1"], "is a directory but not a saved diffusers pipeline"),
    (["run", "--pipeline", "digits-dit", "--steps", "0", "--class-label", "1"], "--steps: must be >= 1, got 0"),
    (["run", "--pipeline", "digits-dit", "--steps", "-3", "--class-label", "1"], "--steps: must be >= 1, got -3"),
    (["run", "--pipeline", "digits-dit", "--class-label", "-1"], "class label -1 is outside DiTPipeline's classes 0-9"),
    (["run", "--pipeline", "digits-dit", "--class-label", "12"], "class label 12 is outside DiTPipeline's classes 0-9"),
    (["run", "--pipeline", "digits-dit", "--class-label", "1000"], "class label 1000 is outside"),  # DiT's null class
    (["run", "--pipeline", "digits-unet", "--class-label", "12"], "class label 12 is outside DigitsUNetPipeline's"),
    (["summary", "deepcache:interval=3"], "is a preset tag: pass --pipeline"),
    (["demo", "--threads", "0"], "--threads: must be >= 1, got 0"),
    (["demo", "--video", "--quant", "w8a8"], "--quant is for the image models"),
])
def test_user_mistakes_are_one_line_usage_errors_that_write_nothing(tmp_path, capsys, monkeypatch, argv, message):
    (tmp_path / "EMPTY").mkdir()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exc:
        main([*argv, *(["--out", "x.png"] if argv[0] == "run" else [])])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and message in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["EMPTY"]  # no image, no demo folder


def test_summary_of_a_preset_tag_lays_it_out_on_the_pipeline(capsys):
    assert main(["summary", "deepcache:interval=3", "--pipeline", "digits-unet", "--steps", "6"]) == 0
    out = capsys.readouterr().out
    bits = [line.split()[1:8] for line in out.splitlines() if line.endswith("MACs")]
    assert len(bits) == 6 and bits[0] == ["1"] * 7 and bits[1] == ["1"] + ["0"] * 6 and bits[3] == ["1"] * 7


def test_class_labels_are_checked_in_the_python_api_too():
    from diffcache.data import conditions_from
    from diffcache.errors import ConditionError
    from diffcache.loading import generation_kwargs
    from diffcache.models import load_pipeline

    pipe = load_pipeline("digits-dit")
    with pytest.raises(ConditionError, match="class label 12 is outside DiTPipeline's classes 0-9"):
        conditions_from([1, 12], pipe)
    with pytest.raises(ConditionError, match="class label -1"):
        generation_kwargs(pipe, [-1], 0, 5, None)
    assert conditions_from(["7", 3], pipe) == [7, 3]


def test_help_name_lists_match_the_registries():
    from diffcache import cli, models  # noqa: F401  (models registers the digits quality objectives)
    from diffcache.eval.metrics import METRIC_NAMES
    from diffcache.eval.quality import quality_names
    from diffcache.schedule import FORECAST_ORDERS
    from diffcache.schedules.methods import search_methods
    from diffcache.schedules.search import search  # noqa: F401  (registers the built-in methods)

    assert cli.METRICS_HELP == METRIC_NAMES and tuple(cli.FORECAST_CHOICES) == tuple(FORECAST_ORDERS)
    assert set(cli.METHODS_HELP) <= set(search_methods()) and set(cli.QUALITIES_HELP) <= set(quality_names())


def test_help_and_usage_errors_do_not_import_torch():
    import subprocess
    import sys

    code = ("import sys\nfrom diffcache.cli import main\ntry:\n    main(['search', '--method', 'dp'])\n"
            "except SystemExit as e:\n    print(e.code, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["2", "False"]  # argparse's error (missing --pipeline), answered without loading torch


def test_an_unknown_search_method_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["search", "--pipeline", "digits-dit", "--prompts", "x.txt", "--out", "s.json", "--method", "nope"])
    assert exc.value.code == 2 and "invalid choice: 'nope' (choose from" in capsys.readouterr().err
