"""Post-training quantization that knows about steps (ARCHITECTURE section 6).

    calibration = diffcache.quant.calibrate(pipe, prompts, "w8a8", num_inference_steps=25)
    calibration.save("w8a8.npz")
    pipe = diffcache.accelerate(pipe, "deepcache:interval=3", quant=calibration)   # or quant="w8a8.npz"

Weights are symmetric per output channel; activations asymmetric per tensor with one range per step. This
first version executes in simulation (fake quantization, labelled as such); real int8 kernels are to come.
"""

from .calibration import QuantCalibration, calibrate, quantizable_layers
from .config import PRESETS, QuantConfig
from .correction import CacheCorrection, fit_cache_correction

__all__ = ["PRESETS", "CacheCorrection", "QuantCalibration", "QuantConfig", "calibrate", "fit_cache_correction",
           "quantizable_layers"]
