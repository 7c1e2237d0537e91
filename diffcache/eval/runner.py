"""Resumable, multi-process evaluation: generate with the full model and each schedule, then score.

Every image is generated at seed ``seed + index`` whatever the process count, so results do not depend on how
the work was split. Each finished image is appended (flushed) as a JSONL row before the next starts: re-running
the same command skips finished rows, and an interrupted run loses at most the image in flight. Under
``accelerate launch --num_processes N -m diffcache eval ...`` each process takes every N-th condition and
writes its own part file; the main process merges them and computes the metrics.

Output: ``results.jsonl`` holds one ``"kind": "image"`` row per generated image and one ``"kind": "summary"``
row per method; the PNGs are in ``results_images/<method>/``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from ..api import accelerate, restore, summary
from ..data import output_of
from ..errors import MetricUnavailableError
from ..files import write_atomic
from ..loading import generation_kwargs, is_class_conditional
from . import metrics as M
from .cost import profile_macs
from .intervals import bootstrap

logger = logging.getLogger(__name__)

FULL = "full"


@dataclass
class EvalConfig:
    """What to evaluate.

    Attributes:
        schedules: tags or schedule JSON paths; the full model (``"full"``) is always evaluated first.
        quant: run every schedule quantized with this calibration path or preset (the full model stays float).
        conditions: prompts (text pipelines) or class ids (class-conditional pipelines), one image each.
        metrics: subset of `metrics.METRIC_NAMES`.
        fid_features: ``"inception"`` or ``"digits"`` (the shipped digit classifier's features; the reference set
            is then the held-out real digits).
        reference_dir: a folder of real images (e.g. COCO val) as the FID reference; without it (and without
            digits features) the reference is the full model's images.
    """

    schedules: list[str]
    conditions: list[str | int]
    metrics: list[str]
    out: Path
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    seed: int = 0
    fid_features: str = "inception"
    clip_model: str = "openai/clip-vit-base-patch16"
    reference_dir: Path | None = None
    extra_kwargs: dict[str, Any] = field(default_factory=dict)
    quant: str | None = None

    def methods(self) -> dict[str, str]:
        """Method label -> schedule; with ``quant`` every schedule runs quantized and its label says so (so a
        resumed run never mixes quantized and float images under one name)."""
        suffix = f" + {Path(self.quant).name}" if self.quant else ""
        return {FULL: FULL} | {f"{schedule}{suffix}": schedule for schedule in self.schedules}

    def accelerate(self, pipe: Any, method: str) -> None:
        """Put ``pipe`` in the state of ``method`` (a label of `methods`)."""
        if method == FULL:
            restore(pipe)
        else:
            accelerate(pipe, self.methods()[method], quant=self.quant)

    def __post_init__(self) -> None:
        unknown = [m for m in self.metrics if m not in M.METRIC_NAMES]
        if unknown:
            raise ValueError(f"unknown metrics {unknown}; choose from {list(M.METRIC_NAMES)}")
        if not self.conditions:
            raise ValueError("nothing to evaluate: no prompts or class labels")
        self.out = Path(self.out)


def method_slug(method: str) -> str:
    """A folder name for a method label (``deepcache:interval=3`` -> ``deepcache-interval-3``)."""
    return re.sub(r"[^A-Za-z0-9_.]+", "-", Path(method).stem if method.endswith(".json") else method).strip("-")


def evaluate(pipe: Any, config: EvalConfig, progress: bool = True) -> list[dict[str, Any]]:
    """Generate every (method, condition) image not yet in ``config.out``, then write and return summaries."""
    from accelerate import PartialState

    state = PartialState()
    rank, world = state.process_index, state.num_processes
    M.check_available(config.metrics, config.fid_features, config.clip_model)
    if "acc" in config.metrics and (config.fid_features != "digits" or not is_class_conditional(pipe)):
        raise MetricUnavailableError("acc needs a class-conditional digits pipeline (digits-dit, digits-unet)")
    pipe.set_progress_bar_config(disable=True)
    methods = list(config.methods())
    done = {(r["method"], r["index"]) for r in _image_rows(config.out)}
    part = Path(f"{config.out}.part{rank}")
    mine = [i for i in range(len(config.conditions)) if i % world == rank]
    todo = [(m, i) for m in methods for i in mine if (m, i) not in done]
    with part.open("a", encoding="utf-8") as sink:
        current = None
        for method, index in tqdm(todo, desc=f"eval (process {rank})", disable=not progress):
            if method != current:
                config.accelerate(pipe, method)
                current = method
            sink.write(json.dumps(_generate(pipe, config, method, index)) + "\n")
            sink.flush()
            os.fsync(sink.fileno())
    restore(pipe)
    state.wait_for_everyone()
    summaries: list[dict[str, Any]] = []
    if state.is_main_process:
        rows = _merge(config.out)
        summaries = _summaries(pipe, config, methods, rows)
        _write(config.out, rows + summaries)
    state.wait_for_everyone()
    return summaries if state.is_main_process else _summary_rows(config.out)


def _generate(pipe: Any, config: EvalConfig, method: str, index: int) -> dict[str, Any]:
    condition = config.conditions[index]
    seed = config.seed + index
    kwargs = generation_kwargs(pipe, condition, seed, config.num_inference_steps, config.guidance_scale)
    start = time.perf_counter()
    image = output_of(pipe(**kwargs, **config.extra_kwargs))[0]
    seconds = time.perf_counter() - start
    path = _images_dir(config.out) / method_slug(method) / f"{index:05d}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(M.to_uint8(image)).save(path)
    return {
        "kind": "image", "method": method, "index": index, "condition": condition, "seed": seed,
        "seconds": round(seconds, 4), "path": str(path.relative_to(config.out.parent)),
    }


def _summaries(pipe: Any, config: EvalConfig, methods: Sequence[str], rows: list[dict]) -> list[dict[str, Any]]:
    by_method = {m: sorted((r for r in rows if r["method"] == m), key=lambda r: r["index"]) for m in methods}
    images = {m: np.stack([_load(config.out.parent / r["path"]) for r in rs]) for m, rs in by_method.items()}
    full_seconds = statistics.median(r["seconds"] for r in by_method[FULL])
    reference, reference_name, classifier = None, None, None
    if "fid" in config.metrics:
        reference, reference_name = _fid_reference(config, images[FULL])
    if "acc" in config.metrics:
        from ..models import load_classifier

        classifier = load_classifier()
    conditions = [r["condition"] for r in by_method[FULL]]
    out = []
    for method in methods:
        seconds = statistics.median(r["seconds"] for r in by_method[method])
        row: dict[str, Any] = {
            "kind": "summary", "method": method, "images": len(by_method[method]),
            "seconds_per_image": round(seconds, 4), "speedup": round(full_seconds / seconds, 3),
        }
        row.update(_plan_numbers(pipe, config, method))
        if "psnr" in config.metrics:
            row["psnr"] = round(M.psnr(images[method], images[FULL]), 3)
            per_image = M.psnr_per_image(images[method], images[FULL])
            if method != FULL and len(per_image) >= 2:  # 95% bootstrap interval over the images
                interval = bootstrap(per_image)
                row["psnr_ci"] = [round(interval.low, 3), round(interval.high, 3)]
        if "ssim" in config.metrics:
            row["ssim"] = round(M.ssim(images[method], images[FULL]), 4)
        if "fid" in config.metrics:
            row["fid"] = round(M.fid(images[method], reference, _fid_features(config)), 3)
            row["fid_reference"] = reference_name
        if classifier is not None:
            row["acc"] = round(M.accuracy(images[method], conditions, classifier), 4)
        if "clip" in config.metrics:
            row["clip"] = round(M.clip_score(images[method], [str(c) for c in conditions], config.clip_model), 3)
        out.append(row)
    return out


def _plan_numbers(pipe: Any, config: EvalConfig, method: str) -> dict[str, Any]:
    """Cache usage and MACs speedup of ``method`` at the evaluated step count."""
    if method == FULL:
        return {"cache_usage_ratio": 0.0, "macs_speedup": 1.0}
    config.accelerate(pipe, method)
    kwargs = generation_kwargs(pipe, config.conditions[0], config.seed, config.num_inference_steps,
                               config.guidance_scale)
    pipe(**kwargs, **config.extra_kwargs)
    plan = summary(pipe).schedule
    restore(pipe)
    profile = profile_macs(pipe, kwargs | {"num_inference_steps": 1}, plan.granularity)
    return {"cache_usage_ratio": round(plan.cache_usage_ratio, 4), "macs_speedup": round(profile.speedup(plan), 3)}


def _fid_reference(config: EvalConfig, full_images: np.ndarray) -> tuple[np.ndarray, str]:
    if config.reference_dir is not None:
        size = full_images.shape[2], full_images.shape[1]
        paths = sorted(p for p in Path(config.reference_dir).iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
        if len(paths) < 2:
            raise ValueError(f"reference_dir {config.reference_dir} holds fewer than 2 PNG/JPEG images")
        real = [np.asarray(Image.open(p).convert("RGB").resize(size), dtype=np.float32) / 255 for p in paths]
        return np.stack(real), f"{len(paths)} images in {config.reference_dir}"
    if config.fid_features == "digits":
        from ..models import real_digits

        real, _labels = real_digits("test")
        return real.permute(0, 2, 3, 1).numpy(), "real digits (held-out split)"
    return full_images, "full model"


def _fid_features(config: EvalConfig) -> Any:
    if config.fid_features == "digits":
        from ..models import load_classifier

        return load_classifier()
    return config.fid_features


def _images_dir(out: Path) -> Path:
    return out.with_name(f"{out.stem}_images")


def _load(path: Path) -> np.ndarray:
    array = np.asarray(Image.open(path), dtype=np.float32) / 255.0
    return array[..., None] if array.ndim == 2 else array


def _read(path: Path) -> list[dict[str, Any]]:
    """Rows of a JSONL file; a torn last line (a run killed mid-write) is ignored."""
    if not path.exists():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            logger.warning("skipping an unreadable line in %s (an interrupted write); it will be redone", path)
    return rows


def _parts(out: Path) -> list[Path]:
    return sorted(out.parent.glob(f"{out.name}.part*"))


def _image_rows(out: Path) -> list[dict[str, Any]]:
    rows = [r for path in [out, *_parts(out)] for r in _read(path) if r.get("kind") == "image"]
    unique = {(r["method"], r["index"]): r for r in rows}
    return sorted(unique.values(), key=lambda r: (r["method"], r["index"]))


def _summary_rows(out: Path) -> list[dict[str, Any]]:
    return [r for r in _read(out) if r.get("kind") == "summary"]


def _merge(out: Path) -> list[dict[str, Any]]:
    """Fold the part files into ``out`` (image rows only: summaries are recomputed)."""
    rows = _image_rows(out)
    _write(out, rows)
    for path in _parts(out):
        path.unlink()
    return rows


def _write(out: Path, rows: list[dict[str, Any]]) -> None:
    write_atomic(out, "".join(json.dumps(r) + "\n" for r in rows))
