from collections.abc import Sequence

import numpy as np

class CompiledPlan:
    length: int
    n_signals: int

def compile_plan(
    length: int,
    terms: np.ndarray,
    signals: np.ndarray,
    scale: np.ndarray,
    offset: np.ndarray,
    selectors: np.ndarray,
    selector_ids: np.ndarray,
) -> CompiledPlan: ...
def decode_into(data: Sequence[bytes], plan: CompiledPlan, out: np.ndarray) -> int: ...
