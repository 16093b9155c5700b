"""Picks the compiled twin of a kernel unless CANPIPE_NO_EXTENSIONS=1 or it was not built."""

from __future__ import annotations

import importlib
import os
from types import ModuleType


def compiled_or_twin(name: str) -> tuple[str, ModuleType]:
    """("c", engine.kernels._<name>_c) when available, else ("py", engine.kernels._<name>_py)."""
    if os.environ.get("CANPIPE_NO_EXTENSIONS", "") != "1":
        try:
            return "c", importlib.import_module(f"engine.kernels._{name}_c")
        except ImportError:  # not built: the pure-Python twin serves
            pass
    return "py", importlib.import_module(f"engine.kernels._{name}_py")
