"""Producing Schedules: preset tags (`presets`), calibration (`calibrate`), and the registered search methods
(`methods`: dp and bac in `dp`, ecad in `evolution`, router in `router`) behind `diffcache.search` (`search`).

Import the submodule you need; this package imports nothing, so `diffcache.schedules.presets` does not bring
the search machinery with it.
"""
