import numpy as np

def groupby_into(
    group: np.ndarray,
    values: np.ndarray,
    records: np.ndarray,
    count: np.ndarray,
    minimum: np.ndarray,
    maximum: np.ndarray,
    total: np.ndarray,
) -> None: ...
