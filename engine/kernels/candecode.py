"""Selects the compiled CAN frame decoder unless CANPIPE_NO_EXTENSIONS=1 or it is missing."""

from engine.kernels._candecode_py import FLOAT16, FLOAT32, FLOAT64, OUTSIDE, SIGNED, UNSIGNED
from engine.kernels._select import compiled_or_twin

IMPLEMENTATION, _kernel = compiled_or_twin("candecode")
compile_plan = _kernel.compile_plan
decode_into = _kernel.decode_into

__all__ = [
    "FLOAT16",
    "FLOAT32",
    "FLOAT64",
    "IMPLEMENTATION",
    "OUTSIDE",
    "SIGNED",
    "UNSIGNED",
    "compile_plan",
    "decode_into",
]
