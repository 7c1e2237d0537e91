"""The README's examples run as written (issue #24): each `diffcache` line of its bash blocks, in order, in a
fresh folder, and its Python blocks, in order, in one namespace (as a user pasting them into one session). Fast ones run by default, the rest under ``-m slow``; the ones that need what no clone has (a
local SD1.5 folder, elided arguments) are listed and skipped, and the count of each kind is checked so a change
of the README's layout cannot empty the test."""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
# a user's own model, elided arguments, the set-up lines, and the demo (tests/eval/test_demo.py runs it)
NEEDS_WHAT_NO_CLONE_HAS = ("./my-sd15", "...", "pip install", "diffcache demo")
SLOW = ("diffcache search", "diffcache eval", "diffcache quantize", "--quant", "summary unet.json")


def examples() -> list[list[str]]:
    """Each bash block's commands (continuations joined, comments dropped), block by block."""
    blocks = re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S)
    out = []
    for block in blocks:
        joined = re.sub(r"\\\n\s*", " ", block)
        commands = [line.split("  #")[0].strip() for line in joined.splitlines()]
        out.append([c for c in commands if c and not c.startswith("#")])
    return out


def runnable(command: str) -> bool:
    return command.startswith(("diffcache ", "seq ")) and not any(s in command for s in NEEDS_WHAT_NO_CLONE_HAS)


def run_blocks(tmp_path: Path, slow: bool) -> list[str]:
    ran = []
    for block in examples():
        for command in filter(runnable, block):
            if not slow and any(s in command for s in SLOW):
                continue
            if command.startswith("seq "):
                n = shlex.split(command)
                (tmp_path / n[-1]).write_text("\n".join(str(i) for i in range(int(n[1]), int(n[2]) + 1)) + "\n")
            else:
                result = subprocess.run(shlex.split(command), cwd=tmp_path, capture_output=True, text=True)
                assert result.returncode == 0, f"README example failed: {command}\n{result.stderr[-2000:]}"
            ran.append(command)
    return ran


def test_the_readme_has_the_examples_this_test_runs():
    commands = [c for block in examples() for c in block]
    fast = [c for c in commands if runnable(c) and not any(s in c for s in SLOW)]
    assert sum(runnable(c) for c in commands) >= 10 and len(fast) >= 4
    assert commands.index("seq 0 9 > labels.txt") < commands.index(next(c for c in commands if "labels.txt" in c
                                                                       and c.startswith("diffcache")))


def test_fast_readme_examples_run_as_written(tmp_path):
    ran = run_blocks(tmp_path, slow=False)
    assert any(c.startswith("diffcache run") for c in ran) and (tmp_path / "seven.png").stat().st_size > 0


@pytest.mark.slow
def test_every_readme_example_runs_as_written(tmp_path):
    ran = run_blocks(tmp_path, slow=True)
    assert (tmp_path / "7.png").exists() and (tmp_path / "unet.json").exists() and len(ran) >= 10


# Python blocks that calibrate or search run under -m slow
SLOW_PYTHON = ("diffcache.search(", "calibrate(")


def python_examples() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def run_python(tmp_path: Path, monkeypatch, slow: bool) -> dict:
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "readme"}
    for block in python_examples():
        if not slow and any(s in block for s in SLOW_PYTHON):
            continue
        try:
            exec(compile(block, "README.md", "exec"), namespace)
        except Exception as error:
            raise AssertionError(f"README Python example failed:\n{block}") from error
    return namespace


def test_the_readme_has_the_python_examples_this_test_runs():
    blocks = python_examples()
    assert len(blocks) >= 5 and sum(not any(s in b for s in SLOW_PYTHON) for b in blocks) >= 3
    assert "load_pipeline(" in blocks[0]   # the first block says where its pipeline comes from


def test_fast_readme_python_examples_run_as_written(tmp_path, monkeypatch):
    import diffcache

    ns = run_python(tmp_path, monkeypatch, slow=False)
    assert (tmp_path / "deepcache.json").exists() and ns["image"].size == (32, 32)
    assert "uniform:interval=3" in str(diffcache.summary(ns["model"])) and ns["x"].shape == (2, 8)


@pytest.mark.slow
def test_every_readme_python_example_runs_as_written(tmp_path, monkeypatch):
    ns = run_python(tmp_path, monkeypatch, slow=True)
    assert (tmp_path / "my-schedule.json").exists() and (tmp_path / "w8a8.npz").exists()
    assert ns["calibration"] is not None
