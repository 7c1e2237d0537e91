"""What a search, a calibration or an eval generates: conditions, seeds, sampler settings, and the output.

Shared by `schedules` (calibration, search), `quant` (calibration, correction fitting) and `eval`, so it sits
below all of them. A generation's *output* is the family's or the user's business: `generate` returns the
array a pipeline's call produced (images, video frames, actions, token ids) and `compare` how far two outputs
are apart; `CalibrationData` carries both, so non-image models calibrate and search through the same code.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .errors import SearchError

OUTPUT_FIELDS = ("images", "frames", "actions", "sequences", "sample")
"""Attributes of a pipeline's output that hold the generation, in the order `output_of` tries them."""

Generate = Callable[[Any, dict[str, Any]], np.ndarray]
Compare = Callable[[np.ndarray, np.ndarray], float]


def output_of(result: Any) -> np.ndarray:
    """The generated array of a pipeline call's result (diffusers' ``.images``/``.frames``, a policy's
    ``.actions``, a language model's ``.sequences``, a bare tensor or array).

    Raises:
        SearchError: the result has none of `OUTPUT_FIELDS`; pass ``generate=`` to say how to get it.
    """
    for name in OUTPUT_FIELDS:
        value = getattr(result, name, None)
        if value is not None:
            return _as_array(value)
    if isinstance(result, (np.ndarray, list, tuple)) or hasattr(result, "detach"):
        return _as_array(result)
    raise SearchError(
        f"cannot find the generation in a {type(result).__name__} (looked for {list(OUTPUT_FIELDS)}); pass "
        "generate=fn(pipe, call_kwargs) -> array to say how to get it"
    )


def _as_array(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):
        value = value.detach().float().cpu().numpy()
    return np.asarray(value)


def generate(pipe: Any, kwargs: dict[str, Any]) -> np.ndarray:
    """The default "run one generation": call the pipeline and take its output array (`output_of`)."""
    return output_of(pipe(**kwargs))


def rms_distance(a: np.ndarray, b: np.ndarray) -> float:
    """The default "compare two outputs": root-mean-square difference (in float64)."""
    return float(np.sqrt(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2)))


@dataclass(frozen=True)
class CalibrationData:
    """The generations a search looks at: conditions (prompts or class ids), seeds and sampler settings.

    Every candidate schedule is judged on exactly these calls (common random numbers): batch ``i`` uses seed
    ``seed + i``.
    """

    conditions: list[str | int]
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    seed: int = 0
    batch_size: int = 16
    generate: Generate = field(default=generate, compare=False)
    """Runs one batch (``fn(pipe, call_kwargs) -> array``); the default takes `output_of` the pipeline call."""
    compare: Compare = field(default=rms_distance, compare=False)
    """How far two outputs are apart (``fn(a, b) -> float``, 0 = identical), e.g. for step sensitivity."""

    def __post_init__(self) -> None:
        if not self.conditions:
            raise SearchError("calibration needs at least one prompt or class label")
        if self.batch_size < 1:
            raise SearchError(f"batch_size must be >= 1, got {self.batch_size}")
        object.__setattr__(self, "conditions", list(self.conditions))

    def steps(self, pipe: Any) -> int:
        """``num_inference_steps``, or the pipeline's default when unset."""
        if self.num_inference_steps is not None:
            return self.num_inference_steps
        default = inspect.signature(pipe.__call__).parameters.get("num_inference_steps")
        if default is None or not isinstance(default.default, int):
            raise SearchError(f"{type(pipe).__name__} has no default num_inference_steps; pass num_inference_steps")
        return default.default

    def batches(self, pipe: Any) -> list[dict[str, Any]]:
        """Fresh call arguments for each batch (new generators, so every call sees the same noise)."""
        from .loading import generation_kwargs

        size = self.batch_size
        chunks = [self.conditions[i : i + size] for i in range(0, len(self.conditions), size)]
        return [generation_kwargs(pipe, chunk, self.seed + i, self.steps(pipe), self.guidance_scale)
                for i, chunk in enumerate(chunks)]

    def key(self) -> str:
        """A stable identifier of these generations (for caches and checkpoints)."""
        fields = [self.conditions, self.num_inference_steps, self.guidance_scale, self.seed, self.batch_size]
        return hashlib.sha1(json.dumps(fields, default=str).encode()).hexdigest()[:16]


def conditions_from(prompts: Sequence[str | int] | str | os.PathLike, pipe: Any) -> list[str | int]:
    """Prompts or class ids, given as a list or as a prompt file (one per line)."""
    from .loading import parse_conditions, read_prompt_file

    if isinstance(prompts, os.PathLike) or (isinstance(prompts, str) and os.path.isfile(prompts)):
        return parse_conditions(pipe, read_prompt_file(prompts))
    if isinstance(prompts, str):
        prompts = [prompts]
    return parse_conditions(pipe, [str(p) for p in prompts])


__all__ = ["CalibrationData", "OUTPUT_FIELDS", "conditions_from", "generate", "output_of", "rms_distance"]
