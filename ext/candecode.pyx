# cython: language_level=3
"""Compiled twin of engine/kernels/_candecode_py.py: a DBC decode plan run over a batch of CAN frames.

One pass over the frames, reading each ``bytes`` object's buffer in place (no join, no 2-D copy): per
signal its byte terms are OR-ed into a 64-bit raw value, which is sign-extended or read as an IEEE float,
then scaled. Same plan, same kinds, same results as the numpy twin.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_CheckExact, PyBytes_GET_SIZE
from libc.math cimport INFINITY, NAN, ldexp
from libc.stdint cimport int64_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memcpy

DEF UNSIGNED = 0
DEF SIGNED = 1
DEF FLOAT16 = 2
DEF FLOAT32 = 3
DEF FLOAT64 = 4
DEF OUTSIDE = 5


cdef inline double half_to_double(uint16_t bits) noexcept nogil:
    cdef int exponent = (bits >> 10) & 0x1F
    cdef int fraction = bits & 0x3FF
    cdef double value
    if exponent == 0:
        value = ldexp(<double>fraction, -24)
    elif exponent == 31:
        value = NAN if fraction else INFINITY
    else:
        value = ldexp(<double>(fraction | 0x400), exponent - 25)
    return -value if bits & 0x8000 else value


def decode_into(data, Py_ssize_t length, const int64_t[:, ::1] terms, const int64_t[:, ::1] signals,
                const double[::1] scale, const double[::1] offset, double[:, ::1] out):
    """See engine/kernels/_candecode_py.py: fills ``out[signal, frame]``; -1, or the first frame of another
    length (then ``out`` is left untouched)."""
    cdef list items = data if type(data) is list else list(data)
    cdef Py_ssize_t n = len(items), n_signals = signals.shape[0]
    cdef Py_ssize_t i, s, t, first, last
    cdef object item
    cdef list kept = []  # bytes made of bytes-like items, alive until the end
    cdef const uint8_t **frames
    cdef uint64_t raw, sign
    cdef uint32_t bits32
    cdef float single
    cdef double value
    cdef int kind
    cdef bint rescale

    if out.shape[0] != n_signals or out.shape[1] != n:
        raise ValueError("out must be (signals, frames)")
    if terms.shape[1] != 4 or signals.shape[1] != 4:
        raise ValueError("terms and signals must have 4 columns")
    import numpy as np
    pointers = np.empty(max(n, 1), dtype=np.uintp)
    cdef size_t[::1] addresses = pointers
    for i in range(n):
        item = items[i]
        if not PyBytes_CheckExact(item):
            item = bytes(item)
            kept.append(item)
        if PyBytes_GET_SIZE(item) != length:
            return i
        addresses[i] = <size_t>PyBytes_AS_STRING(item)
    frames = <const uint8_t **>&addresses[0]
    for s in range(n_signals):
        if not 0 <= signals[s, 0] <= signals[s, 0] + signals[s, 1] <= terms.shape[0]:
            raise ValueError("signal terms out of range")
        for t in range(signals[s, 0], signals[s, 0] + signals[s, 1]):
            if not 0 <= terms[t, 0] < length or not 0 <= terms[t, 1] < 8 or not 0 <= terms[t, 3] < 64:
                raise ValueError("term out of range")

    with nogil:
        for s in range(n_signals):
            first = signals[s, 0]
            last = first + signals[s, 1]
            kind = <int>signals[s, 3]
            sign = (<uint64_t>1) << (signals[s, 2] - 1) if 0 < signals[s, 2] <= 64 else 0
            rescale = scale[s] != 1.0 or offset[s] != 0.0
            if kind == OUTSIDE:
                for i in range(n):
                    out[s, i] = NAN
                continue
            for i in range(n):
                raw = 0
                for t in range(first, last):
                    raw |= ((<uint64_t>(frames[i][terms[t, 0]] >> terms[t, 1])) & <uint64_t>terms[t, 2]) << terms[t, 3]
                if kind == UNSIGNED:
                    value = <double>raw
                elif kind == SIGNED:
                    value = <double>(<int64_t>((raw ^ sign) - sign))
                elif kind == FLOAT32:
                    bits32 = <uint32_t>raw
                    memcpy(&single, &bits32, 4)
                    value = single
                elif kind == FLOAT64:
                    memcpy(&value, &raw, 8)
                else:
                    value = half_to_double(<uint16_t>raw)
                out[s, i] = value * scale[s] + offset[s] if rescale else value
    return -1
