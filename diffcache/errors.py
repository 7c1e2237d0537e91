"""Exceptions raised by diffcache.

Every error subclasses :class:`DiffcacheError` and also the builtin it refines, so ``except ValueError``
keeps working. Messages say what was found, what was expected, and what to do next.
"""

from __future__ import annotations


class DiffcacheError(Exception):
    """Base class of every diffcache error."""


class ScheduleError(DiffcacheError, ValueError):
    """A schedule (object, tag or JSON file) is malformed or does not fit the model it is applied to."""


class UnsupportedModelError(DiffcacheError, TypeError):
    """No adapter can describe this denoiser, or the model uses a feature the executor cannot cache."""


class AccelerationStateError(DiffcacheError, RuntimeError):
    """The accelerated pipeline is used in a way the executor cannot follow (e.g. its scheduler was swapped)."""


class MetricUnavailableError(DiffcacheError, RuntimeError):
    """A metric's model (Inception, CLIP) cannot be loaded here; the message names the option to use instead."""


class PipelineNotFoundError(DiffcacheError, ValueError):
    """A pipeline name is neither a built-in model, a local directory nor a reachable hub id."""


class ConditionError(DiffcacheError, ValueError):
    """A prompt or class label the pipeline cannot take (e.g. a class id outside the model's classes)."""


class SearchError(DiffcacheError, ValueError):
    """A schedule search cannot run as asked: bad budget, unknown method, a budget no schedule meets, or a
    checkpoint/calibration made for another model or setting."""


class QuantError(DiffcacheError, ValueError):
    """A quantization config or calibration is invalid, or was made for another model or step count."""


class SliceError(DiffcacheError, ValueError):
    """A memory-slicing option is malformed, or asks to cut layers whose chunks are not independent in this model
    (e.g. frames of a video transformer with full 3-D attention)."""


class MissingExtraError(DiffcacheError, ImportError):
    """A feature needs a package from an optional extra that is not installed; the message names the extra."""
