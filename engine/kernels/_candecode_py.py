"""Pure-Python (numpy) twin of ``ext/candecode.pyx``: executes a DBC decode plan over a batch of CAN frames.

A plan (built by ``engine.can.decode``) describes each signal as at most nine byte terms: the signal's raw
value is ``sum((data[byte] >> rshift) & mask) << lshift)`` over its terms, for either byte order. ``kinds``
says how the raw bits are read: unsigned, signed (two's complement of ``length`` bits), IEEE half, single or
double, or NaN (the signal lies outside the frame).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

UNSIGNED, SIGNED, FLOAT16, FLOAT32, FLOAT64, OUTSIDE = range(6)


def first_bad_length(data: Sequence[bytes], length: int) -> int:
    """Index of the first item whose length is not ``length``; -1 when all fit."""
    if set(map(len, data)) <= {length}:
        return -1
    return next(index for index, item in enumerate(data) if len(item) != length)


class CompiledPlan(NamedTuple):
    """A message's plan as the twin runs it (the compiled kernel holds the same as C arrays)."""

    length: int
    terms: list[list[int]]
    signals: list[list[int]]
    scale: list[float]
    offset: list[float]
    selectors: list[list[int]]
    selector_ids: np.ndarray


def compile_plan(
    length: int,
    terms: np.ndarray,
    signals: np.ndarray,
    scale: np.ndarray,
    offset: np.ndarray,
    selectors: np.ndarray,
    selector_ids: np.ndarray,
) -> CompiledPlan:
    """The plan of one message for frames of ``length`` bytes. ``terms``: int64 (T, 4) of byte, rshift, mask,
    lshift; ``signals``: int64 (S, 4) of first term, term count, bit length, kind; ``selectors``: int64 (K, 5)
    of multiplexer row, child row, first id, id count, truncate (the multiplexer's value is not integral:
    cantools takes ``int()`` of it), parents before children: the child is NaN in frames where the
    multiplexer's value is none of ``selector_ids[first : first + count]``."""
    return CompiledPlan(
        length,
        terms.tolist(),
        signals.tolist(),
        scale.tolist(),
        offset.tolist(),
        selectors.tolist(),
        np.asarray(selector_ids, dtype=np.float64),
    )


def decode_into(data: Sequence[bytes], plan: CompiledPlan, out: np.ndarray) -> int:
    """Decode every frame of ``data`` into ``out[signal, frame]`` (float64, scaled). Returns -1, or the index
    of the first frame of another length than the plan's (``out`` is then left as it was)."""
    length = plan.length
    bad = first_bad_length(data, length)
    if bad >= 0:
        return bad
    n = len(data)
    if n == 0:
        return -1
    frames = np.frombuffer(b"".join(data), dtype=np.uint8).reshape(n, length) if length else None
    for index, (first, count, bits, kind) in enumerate(plan.signals):
        row = out[index]
        if kind == OUTSIDE or frames is None:
            row[:] = np.nan
            continue
        raw = np.zeros(n, dtype=np.uint64)
        for byte, rshift, mask, lshift in plan.terms[first : first + count]:
            column = frames[:, byte].astype(np.uint64)
            raw |= ((column >> np.uint64(rshift)) & np.uint64(mask)) << np.uint64(lshift)
        if kind == UNSIGNED:
            row[:] = raw
        elif kind == SIGNED:
            if bits < 64:
                sign = np.uint64(1 << (bits - 1))
                raw = (raw ^ sign) - sign  # wraps modulo 2**64 into the two's complement of 64 bits
            row[:] = raw.view(np.int64)
        elif kind in (FLOAT16, FLOAT32):
            with np.errstate(invalid="ignore"):  # a signalling NaN becomes a quiet one, as in C
                row[:] = raw.astype(np.uint16 if kind == FLOAT16 else np.uint32).view(
                    np.float16 if kind == FLOAT16 else np.float32
                )
        else:
            row[:] = raw.view(np.float64)
        if plan.scale[index] != 1.0 or plan.offset[index] != 0.0:
            row *= plan.scale[index]
            row += plan.offset[index]
    for mux, child, first, count, truncate in plan.selectors:
        value = np.trunc(out[mux]) if truncate else out[mux]
        ids = plan.selector_ids[first : first + count]
        selected = value == ids[0] if count == 1 else np.isin(value, ids)
        out[child][~selected] = np.nan
    return -1
