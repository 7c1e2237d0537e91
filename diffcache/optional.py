"""Optional dependencies: import a package of an extra where a feature first needs it.

``pip install diffcache`` gives the executor and presets; the extras add the rest: ``search`` (deap),
``eval`` (torchmetrics, matplotlib, scikit-learn) and ``all``. A feature calls :func:`require` instead of
importing such a package, so ``import diffcache`` never loads them and a missing one names its extra.
"""

from __future__ import annotations

import importlib
import types

from .errors import MissingExtraError

PIP_NAMES = {"sklearn": "scikit-learn"}
"""Import name -> pip distribution name, where they differ."""


def require(module: str, extra: str, feature: str) -> types.ModuleType:
    """Import and return ``module`` (e.g. ``"sklearn.datasets"``), which ``feature`` needs.

    Raises:
        MissingExtraError: ``module``'s package is not installed; the message names ``pip install
            "diffcache[<extra>]"``. An import error from inside an installed package propagates unchanged.
    """
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as err:
        top = module.partition(".")[0]
        if err.name is None or err.name.partition(".")[0] != top:
            raise  # the package is there but broken, or one of its own dependencies is missing
        package = PIP_NAMES.get(top, top)
        raise MissingExtraError(
            f'{feature} needs {package}, which is not installed; pip install "diffcache[{extra}]"', name=top
        ) from None
