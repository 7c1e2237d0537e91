"""Producing Schedules: preset tags, calibration, and search (dynamic programming, evolution, routers)."""

from .budget import Budget
from .calibrate import Calibration, CalibrationData, calibrate
from .presets import build_from_tag, parse_tag, preset_names, register_preset

__all__ = ["Budget", "Calibration", "CalibrationData", "build_from_tag", "calibrate", "parse_tag", "preset_names",
           "register_preset"]
