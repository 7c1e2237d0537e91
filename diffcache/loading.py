"""Load a pipeline the way a user names it: a built-in default (``digits-dit``), a local path, or a hub id.

Also builds the per-image call arguments, since text-to-image and class-conditional pipelines take different
inputs.
"""

from __future__ import annotations

import inspect
import logging
import os
from collections.abc import Sequence
from typing import Any

import torch

from .errors import ConditionError, PipelineNotFoundError

logger = logging.getLogger(__name__)

BUILTIN_PREFIX = "digits-"
BUILTIN_NAMES = "digits-dit, digits-unet, digits-video"  # diffcache.models._PIPELINES, without importing them here


def load_any_pipeline(spec: str, torch_dtype: torch.dtype | None = None) -> Any:
    """``digits-dit`` / ``digits-unet`` / ``digits-video`` (shipped with the package), a local diffusers directory, or a hub id.

    Raises:
        PipelineNotFoundError: the name is none of these, or the hub cannot be reached for it.
    """
    if spec.startswith(BUILTIN_PREFIX):
        from . import models

        return models.load_pipeline(spec)  # raises PipelineNotFoundError listing the built-in names
    from diffusers import DiffusionPipeline

    kwargs = {"torch_dtype": torch_dtype} if torch_dtype is not None else {}
    if os.path.isdir(spec):
        if not os.path.isfile(os.path.join(spec, "model_index.json")):
            raise PipelineNotFoundError(
                f"{spec!r} is a directory but not a saved diffusers pipeline (no model_index.json); pass the folder "
                "that `pipe.save_pretrained(...)` wrote")
        return DiffusionPipeline.from_pretrained(spec, **kwargs)
    if spec.startswith((".", "/", "~")) or "\\" in spec or os.path.exists(spec):
        raise PipelineNotFoundError(f"no pipeline directory at {spec!r} (checked from {os.getcwd()!r})")
    if spec.count("/") != 1:
        raise PipelineNotFoundError(
            f"unknown pipeline {spec!r}: not a built-in model ({BUILTIN_NAMES}), not a local diffusers directory, "
            "and not a hub id of the form 'org/name'"
        )
    try:
        return DiffusionPipeline.from_pretrained(spec, **kwargs)
    except (OSError, ValueError) as err:  # huggingface_hub's HFValidationError is a ValueError
        raise PipelineNotFoundError(
            f"could not load {spec!r} from the hub ({type(err).__name__}); offline, download it elsewhere and pass "
            f"its local directory, or use a built-in model ({BUILTIN_NAMES})"
        ) from None


def is_class_conditional(pipe: Any) -> bool:
    """True for pipelines conditioned on class labels (``DiTPipeline``, the digits UNet) rather than text."""
    return "class_labels" in inspect.signature(pipe.__call__).parameters


def class_count(pipe: Any) -> int | None:
    """How many classes a class-conditional pipeline generates: its label names when it has them (the digits
    models: 10), else its denoiser's class embeddings (DiT: ``num_embeds_ada_norm``, whose last id is the
    unconditional class); ``None`` when unknown."""
    labels = getattr(pipe, "labels", None)
    if isinstance(labels, dict) and labels:
        return max(int(v) for v in labels.values()) + 1
    null = getattr(pipe, "null_class", None)
    if isinstance(null, int):
        return null
    denoiser = getattr(pipe, "transformer", None) or getattr(pipe, "unet", None)
    config = getattr(denoiser, "config", {})
    for key in ("num_embeds_ada_norm", "num_class_embeds"):
        if isinstance(config.get(key), int):
            return config[key]
    return None


def check_class_labels(pipe: Any, labels: Sequence[int]) -> None:
    """Raise `ConditionError` for a class id the pipeline has no class for (it would index out of range or,
    on DiT, generate noise from an untrained embedding)."""
    count = class_count(pipe)
    bad = [label for label in labels if label < 0 or (count is not None and label >= count)]
    if bad:
        names = getattr(pipe, "labels", None)
        hint = f" (names: {', '.join(sorted(names, key=lambda n: names[n]))})" if isinstance(names, dict) else ""
        raise ConditionError(f"class label {bad[0]} is outside {type(pipe).__name__}'s classes 0-{count - 1}{hint}"
                             if count is not None else f"class label {bad[0]} is negative")


def parse_conditions(pipe: Any, lines: Sequence[str]) -> list[str | int]:
    """Prompts for text pipelines; class ids for class-conditional ones (ints, or names the pipeline knows).

    Raises:
        ConditionError: a line is neither a class id in range nor a label name the pipeline knows.
    """
    if not is_class_conditional(pipe):
        return list(lines)
    conditions: list[str | int] = []
    for line in lines:
        if line.lstrip("-").isdigit():
            conditions.append(int(line))
        else:
            try:
                conditions.append(int(pipe.get_label_ids([line])[0]))
            except (AttributeError, KeyError, ValueError):
                raise ConditionError(f"{line!r} is not a class id or a label name this pipeline knows") from None
    check_class_labels(pipe, [int(c) for c in conditions])
    return conditions


def read_prompt_file(path: str | os.PathLike) -> list[str]:
    """Non-empty lines of a prompt file (one prompt, class id or label per line; ``#`` starts a comment).

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file has no prompts.
    """
    try:
        with open(path, encoding="utf-8") as f:
            lines = [line.strip() for line in f]
    except FileNotFoundError:
        raise FileNotFoundError(f"prompt file {os.fspath(path)!r} does not exist (one prompt per line)") from None
    prompts = [line for line in lines if line and not line.startswith("#")]
    if not prompts:
        raise ValueError(f"prompt file {os.fspath(path)!r} has no prompts")
    return prompts


def generation_kwargs(
    pipe: Any,
    condition: str | int | Sequence[str | int],
    seed: int,
    num_inference_steps: int | None,
    guidance_scale: float | None,
) -> dict[str, Any]:
    """Arguments for one deterministic call: one image per condition (a prompt or class id, or a list of them),
    ``pipe(**generation_kwargs(...)).images``."""
    kwargs: dict[str, Any] = {"generator": torch.Generator("cpu").manual_seed(seed), "output_type": "np"}
    many = isinstance(condition, (list, tuple))
    if is_class_conditional(pipe):
        kwargs["class_labels"] = [int(c) for c in condition] if many else [int(condition)]
        check_class_labels(pipe, kwargs["class_labels"])
    else:
        kwargs["prompt"] = [str(c) for c in condition] if many else str(condition)
    if num_inference_steps is not None:
        kwargs["num_inference_steps"] = num_inference_steps
    if guidance_scale is not None:
        kwargs["guidance_scale"] = guidance_scale
    return kwargs
