"""Writing files so that an interrupted run never leaves a half-written one behind, and the ``.npz`` format
(JSON header plus arrays) that calibrations use."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np


def cache_root() -> Path:
    """Where measurements are kept between runs: ``$DIFFCACHE_CACHE`` (default ``~/.cache/diffcache``).

    MAC profiles (``cost/``) depend only on the architecture and input shapes, which key their file names;
    calibrations (``calibration/``) are keyed by model config and calibration data.
    """
    return Path(os.environ.get("DIFFCACHE_CACHE", Path.home() / ".cache" / "diffcache"))


def write_atomic(path: str | os.PathLike, data: str | bytes) -> None:
    """Write ``data`` (text as UTF-8) to a temporary file beside ``path``, then rename it over ``path``."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    if isinstance(data, str):
        tmp.write_text(data, encoding="utf-8")
    else:
        tmp.write_bytes(data)
    os.replace(tmp, path)


def save_npz(path: str | os.PathLike, fmt: str, header: dict, arrays: dict[str, np.ndarray]) -> None:
    """One ``.npz``: a JSON ``header`` tagged with ``fmt`` plus ``arrays``, written atomically (folders made)."""
    buffer = io.BytesIO()
    np.savez(buffer, header=np.array(json.dumps({"format": fmt, **header})), **arrays)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, buffer.getvalue())


def load_npz(path: str | os.PathLike, fmt: str) -> tuple[dict, dict[str, np.ndarray]]:
    """``(header, arrays)`` of a `save_npz` file of format ``fmt``.

    Raises:
        FileNotFoundError: nothing at ``path``.
        ValueError: the file is unreadable or of another format.
    """
    try:
        with np.load(path, allow_pickle=False) as data:
            header = json.loads(str(data["header"]))
            arrays = {name: data[name] for name in data.files if name != "header"}
    except FileNotFoundError:
        raise
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(str(err)) from None
    if header.get("format") != fmt:
        raise ValueError(f"format {header.get('format')!r}, expected {fmt!r}")
    return header, arrays
