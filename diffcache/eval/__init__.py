"""Evaluation: cost model (MACs per unit/component), and later metrics and runners."""

from .cost import CostProfile, profile_latency, profile_macs

__all__ = ["CostProfile", "profile_latency", "profile_macs"]
