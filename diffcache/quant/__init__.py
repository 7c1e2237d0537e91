"""Post-training quantization that knows about steps (ARCHITECTURE section 6).

    calibration = diffcache.quant.calibrate(pipe, prompts, "w8a8", num_inference_steps=25)
    calibration.save("w8a8.npz")
    pipe = diffcache.accelerate(pipe, "deepcache:interval=3", quant=calibration)   # or quant="w8a8.npz"

Weights are symmetric per output channel; activations asymmetric per tensor with one range per step. 8-bit
Linear layers run real int8 GEMMs through oneDNN on CPU; the rest runs in simulation (fake quantization, the same
numbers), and `diffcache.summary` says which is which.
"""

import os

from ..errors import QuantError
from .calibration import QuantCalibration, calibrate, quantizable_layers
from .config import PRESETS, QuantConfig
from .correction import CacheCorrection, fit_cache_correction
from .efficientdm import distillation_loss, finetune


def resolve_quant(quant: QuantConfig | QuantCalibration | str | os.PathLike | None
                  ) -> QuantConfig | QuantCalibration | None:
    """A config or calibration from what ``accelerate(..., quant=)`` accepts: either of them, a preset name, or
    the path of a saved calibration."""
    if quant is None or isinstance(quant, (QuantConfig, QuantCalibration)):
        return quant
    if isinstance(quant, str) and quant.lower() in PRESETS:
        return PRESETS[quant.lower()]
    if isinstance(quant, (str, os.PathLike)):
        return QuantCalibration.load(quant)
    raise QuantError(f"quant must be a QuantConfig, a QuantCalibration, a preset name or a calibration path, "
                     f"got {type(quant).__name__}")


__all__ = ["PRESETS", "CacheCorrection", "QuantCalibration", "QuantConfig", "calibrate", "distillation_loss",
           "finetune", "fit_cache_correction",
           "quantizable_layers", "resolve_quant"]
