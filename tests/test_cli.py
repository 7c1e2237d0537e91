"""The command line: exit codes and the schedule summary."""

import pytest

from diffcache import Schedule
from diffcache.cli import main
from diffcache.testing import build_pipeline


def test_summary_prints_the_bits(tmp_path, capsys):
    path = tmp_path / "s.json"
    Schedule.from_tag("deepcache:interval=3,branch=2", build_pipeline("sd").unet, 6).save(path)
    assert main(["summary", str(path)]) == 0
    out = capsys.readouterr().out
    assert "model: UNet2DConditionModel" in out
    assert "  1  1 1 0 0 0 0 0 0 0 0 0 0" in out  # step 1: branches 0-1 run, 2.. reused
    assert "cache usage ratio 55.6%" in out


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
