"""Selects the compiled stored-line scanner unless CANPIPE_NO_EXTENSIONS=1 or it is missing."""

from engine.kernels._jsonl_py import SIGNALS, Columns
from engine.kernels._select import compiled_or_twin

IMPLEMENTATION, _kernel = compiled_or_twin("jsonl")
parse_lines = _kernel.parse_lines

__all__ = ["IMPLEMENTATION", "SIGNALS", "Columns", "parse_lines"]
