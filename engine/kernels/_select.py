"""Picks the compiled twin of a kernel unless CANPIPE_NO_EXTENSIONS=1 or it was not built."""

from __future__ import annotations

import importlib
import os
from types import ModuleType

#: what each selector picked, by kernel name: ("c" | "py", why) so a test can fail CI on a silent fallback
SELECTED: dict[str, tuple[str, str]] = {}


def extensions_disabled() -> bool:
    """True when CANPIPE_NO_EXTENSIONS=1 asks for the pure-Python twins on purpose."""
    return os.environ.get("CANPIPE_NO_EXTENSIONS", "") == "1"


def compiled_or_twin(name: str) -> tuple[str, ModuleType]:
    """("c", engine.kernels._<name>_c) when available, else ("py", engine.kernels._<name>_py)."""
    if extensions_disabled():
        reason = "CANPIPE_NO_EXTENSIONS=1"
    else:
        try:
            module = importlib.import_module(f"engine.kernels._{name}_c")
        except ImportError as exc:  # not built: the pure-Python twin serves
            reason = f"compiled module not importable: {exc}"
        else:
            SELECTED[name] = ("c", "compiled")
            return "c", module
    SELECTED[name] = ("py", reason)
    return "py", importlib.import_module(f"engine.kernels._{name}_py")
