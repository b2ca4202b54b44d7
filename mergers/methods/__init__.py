"""Merge methods: importing this package registers every built-in method."""

from mergers.methods import basic, calc, foreign, task  # noqa: F401  (registers the methods)
from mergers.methods.modes import CALCMODES, MODES, calcmodes_for, method_for, mode_name
from mergers.methods.registry import METHODS, MergeMethod, get_method, merge_method

__all__ = ["CALCMODES", "calcmodes_for", "METHODS", "MODES", "MergeMethod", "get_method", "merge_method", "method_for", "mode_name"]
