"""Selects the compiled stored-line scanner (and the receiver's batch checks) unless CANPIPE_NO_EXTENSIONS=1 or it
is missing."""

from engine.kernels._jsonl_py import MICROSECOND, SIGNALS, Columns, micros
from engine.kernels._select import compiled_or_twin

IMPLEMENTATION, _kernel = compiled_or_twin("jsonl")
parse_lines = _kernel.parse_lines
check_records = _kernel.check_records

__all__ = ["IMPLEMENTATION", "MICROSECOND", "SIGNALS", "Columns", "check_records", "micros", "parse_lines"]
