"""Producing Schedules: preset tags (and, later, calibration and search)."""

from .presets import build_from_tag, parse_tag, preset_names, register_preset

__all__ = ["build_from_tag", "parse_tag", "preset_names", "register_preset"]
