from collections.abc import Sequence

import numpy as np

def decode_into(
    data: Sequence[bytes],
    length: int,
    terms: np.ndarray,
    signals: np.ndarray,
    scale: np.ndarray,
    offset: np.ndarray,
    selectors: np.ndarray,
    selector_ids: np.ndarray,
    out: np.ndarray,
) -> int: ...
