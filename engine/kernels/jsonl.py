"""Selects the compiled stored-line scanner unless CANPIPE_NO_EXTENSIONS=1 or it is missing."""

import os

from engine.kernels import _jsonl_py
from engine.kernels._jsonl_py import SIGNALS, Columns

IMPLEMENTATION = "py"
parse_lines = _jsonl_py.parse_lines
if os.environ.get("CANPIPE_NO_EXTENSIONS", "") != "1":
    try:
        from engine.kernels import _jsonl_c
    except ImportError:  # not built: the pure-Python twin serves
        pass
    else:
        IMPLEMENTATION, parse_lines = "c", _jsonl_c.parse_lines

__all__ = ["IMPLEMENTATION", "SIGNALS", "Columns", "parse_lines"]
