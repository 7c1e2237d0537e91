"""Optional extras: a missing package names its extra, and ``import diffcache`` loads none of them."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from diffcache.errors import DiffcacheError, MissingExtraError
from diffcache.optional import require

EXTRA_PACKAGES = ("deap", "matplotlib", "torchmetrics", "sklearn")


def hide(monkeypatch: pytest.MonkeyPatch, package: str) -> None:
    """Make ``package`` (and any of its already imported submodules) unimportable for this test."""
    monkeypatch.setitem(sys.modules, package, None)
    for name in [n for n in sys.modules if n.startswith(package + ".")]:
        monkeypatch.setitem(sys.modules, name, None)


def test_require_returns_the_module():
    import json

    assert require("json", "eval", "a test") is json


@pytest.mark.parametrize("module", ["deap", "deap.tools"])
def test_require_names_the_extra(monkeypatch, module):
    hide(monkeypatch, "deap")
    with pytest.raises(MissingExtraError) as exc:
        require(module, "search", "ECAD schedule search")
    err = exc.value
    assert isinstance(err, ImportError) and isinstance(err, DiffcacheError)
    assert str(err) == 'ECAD schedule search needs deap, which is not installed; pip install "diffcache[search]"'
    assert err.name == "deap"


def test_require_uses_the_pip_name(monkeypatch):
    hide(monkeypatch, "sklearn")
    with pytest.raises(MissingExtraError, match=r'needs scikit-learn, .*pip install "diffcache\[eval\]"'):
        require("sklearn.datasets", "eval", "the digits data set")


def test_require_keeps_errors_from_inside_an_installed_package(tmp_path, monkeypatch):
    # An installed package whose own dependency is missing is a broken install, not a missing extra.
    (tmp_path / "brokenpkg").mkdir()
    (tmp_path / "brokenpkg" / "__init__.py").write_text("import no_such_dependency_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModuleNotFoundError) as exc:
        require("brokenpkg", "eval", "a test")
    assert not isinstance(exc.value, MissingExtraError)
    assert exc.value.name == "no_such_dependency_xyz"


def test_psnr_without_torchmetrics(monkeypatch):
    from diffcache.eval.metrics import psnr

    hide(monkeypatch, "torchmetrics")
    images = np.zeros((2, 4, 4, 1), dtype=np.float32)
    with pytest.raises(MissingExtraError, match=r'PSNR metric needs torchmetrics, .*"diffcache\[eval\]"'):
        psnr(images, images)


def test_fid_without_torchmetrics(monkeypatch):
    import torch

    from diffcache.eval.metrics import fid

    hide(monkeypatch, "torchmetrics")
    images = np.zeros((2, 4, 4, 1), dtype=np.float32)
    with pytest.raises(MissingExtraError, match=r'FID metric needs torchmetrics, .*"diffcache\[eval\]"'):
        fid(images, images, features=torch.nn.Flatten())


def test_pareto_plot_without_matplotlib(monkeypatch, tmp_path):
    from diffcache.eval.plots import pareto_plot

    hide(monkeypatch, "matplotlib")
    with pytest.raises(MissingExtraError, match=r'Pareto plot needs matplotlib, .*"diffcache\[eval\]"'):
        pareto_plot({"m": [("full", 1.0, 10.0)]}, tmp_path / "p.png", "FID")
    assert not (tmp_path / "p.png").exists()


def test_digits_without_sklearn(monkeypatch):
    from diffcache.models import digits

    digits._dataset.cache_clear()  # loaded by an earlier test: force the import again
    hide(monkeypatch, "sklearn")
    with pytest.raises(MissingExtraError, match=r'digits data set needs scikit-learn, .*"diffcache\[eval\]"'):
        digits.real_digits("test")


def test_ecad_without_deap(monkeypatch):
    from diffcache.schedules.evolution import evolve

    hide(monkeypatch, "deap")
    with pytest.raises(MissingExtraError, match=r'ECAD schedule search needs deap, .*"diffcache\[search\]"'):
        evolve(object(), None, None, None, None, [])  # fails before it touches its arguments


def test_import_diffcache_loads_no_extra():
    code = f"import diffcache, sys; print([m for m in {EXTRA_PACKAGES!r} if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
