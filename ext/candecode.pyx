# cython: language_level=3
"""Compiled twin of engine/kernels/_candecode_py.py: a DBC decode plan run over a batch of CAN frames.

One pass over the frames, reading each ``bytes`` object's buffer in place (no join, no 2-D copy): per
signal its byte terms are OR-ed into a 64-bit raw value, which is sign-extended or read as an IEEE float,
then scaled. Same plan, same kinds, same results as the numpy twin.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_CheckExact, PyBytes_GET_SIZE
from cpython.mem cimport PyMem_Free, PyMem_Malloc
from libc.math cimport INFINITY, NAN, ldexp, trunc
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


cdef struct Term:
    uint64_t mask
    Py_ssize_t byte
    int rshift
    int lshift


cdef struct Field:
    Py_ssize_t first
    Py_ssize_t last
    uint64_t sign
    double scale
    double offset
    int kind
    bint rescale


cdef class CompiledPlan:
    """A message's plan as C arrays, validated once (``compile_plan``); ``decode_into`` runs it."""

    cdef readonly Py_ssize_t length, n_signals
    cdef Py_ssize_t n_terms, n_selectors
    cdef Term *terms
    cdef Field *fields
    cdef int64_t *selectors
    cdef double *selector_ids

    def __dealloc__(self):
        PyMem_Free(self.terms)
        PyMem_Free(self.fields)
        PyMem_Free(self.selectors)
        PyMem_Free(self.selector_ids)


def compile_plan(Py_ssize_t length, const int64_t[:, ::1] terms, const int64_t[:, ::1] signals,
                 const double[::1] scale, const double[::1] offset, const int64_t[:, ::1] selectors,
                 const double[::1] selector_ids):
    """See engine/kernels/_candecode_py.py; ValueError if the plan reads outside a ``length``-byte frame."""
    cdef Py_ssize_t s, t, k, n_terms = terms.shape[0], n_signals = signals.shape[0]
    cdef Py_ssize_t n_selectors = selectors.shape[0], n_ids = selector_ids.shape[0]
    if terms.shape[1] != 4 or signals.shape[1] != 4 or scale.shape[0] < n_signals or offset.shape[0] < n_signals:
        raise ValueError("terms and signals must have 4 columns, scale and offset one value per signal")
    if selectors.shape[1] != 5:
        raise ValueError("selectors must have 5 columns")
    cdef CompiledPlan plan = CompiledPlan()
    plan.length, plan.n_terms, plan.n_signals, plan.n_selectors = length, n_terms, n_signals, n_selectors
    plan.terms = <Term *>PyMem_Malloc(max(n_terms, 1) * sizeof(Term))
    plan.fields = <Field *>PyMem_Malloc(max(n_signals, 1) * sizeof(Field))
    plan.selectors = <int64_t *>PyMem_Malloc(max(n_selectors, 1) * 5 * sizeof(int64_t))
    plan.selector_ids = <double *>PyMem_Malloc(max(n_ids, 1) * sizeof(double))
    if not plan.terms or not plan.fields or not plan.selectors or not plan.selector_ids:
        raise MemoryError()
    for t in range(n_terms):
        if not 0 <= terms[t, 0] < length or not 0 <= terms[t, 1] < 8 or not 0 <= terms[t, 3] < 64:
            raise ValueError("term out of range")
        plan.terms[t].byte = terms[t, 0]
        plan.terms[t].rshift = <int>terms[t, 1]
        plan.terms[t].mask = <uint64_t>terms[t, 2]
        plan.terms[t].lshift = <int>terms[t, 3]
    for s in range(n_signals):
        if not 0 <= signals[s, 0] <= signals[s, 0] + signals[s, 1] <= n_terms:
            raise ValueError("signal terms out of range")
        plan.fields[s].first = signals[s, 0]
        plan.fields[s].last = signals[s, 0] + signals[s, 1]
        plan.fields[s].sign = (<uint64_t>1) << (signals[s, 2] - 1) if 0 < signals[s, 2] <= 64 else 0
        plan.fields[s].kind = <int>signals[s, 3]
        plan.fields[s].scale = scale[s]
        plan.fields[s].offset = offset[s]
        plan.fields[s].rescale = scale[s] != 1.0 or offset[s] != 0.0
    for k in range(n_selectors):
        if (not 0 <= selectors[k, 0] < n_signals or not 0 <= selectors[k, 1] < n_signals
                or not 0 <= selectors[k, 2] <= selectors[k, 2] + selectors[k, 3] <= n_ids):
            raise ValueError("selector out of range")
        for t in range(5):
            plan.selectors[k * 5 + t] = selectors[k, t]
    for k in range(n_ids):
        plan.selector_ids[k] = selector_ids[k]
    return plan


def decode_into(data, CompiledPlan plan not None, double[:, ::1] out):
    """See engine/kernels/_candecode_py.py: fills ``out[signal, frame]``; -1, or the first frame of another
    length (then ``out`` is left untouched)."""
    cdef list items = data if type(data) is list else list(data)
    cdef Py_ssize_t n = len(items), n_signals = plan.n_signals, length = plan.length
    cdef Py_ssize_t i, s, t, k, j
    cdef object item
    cdef list kept = None  # bytes made of bytes-like items, alive until the end
    cdef const uint8_t *small[64]
    cdef const uint8_t **frames = small
    cdef const uint8_t *frame
    cdef uint64_t raw
    cdef uint32_t bits32
    cdef float single
    cdef double value
    cdef Field *field
    cdef Term *term
    cdef int64_t *selector
    cdef bint found

    if out.shape[0] != n_signals or out.shape[1] != n:
        raise ValueError("out must be (signals, frames)")
    if n > 64:
        frames = <const uint8_t **>PyMem_Malloc(n * sizeof(uint8_t *))
        if not frames:
            raise MemoryError()
    try:
        for i in range(n):
            item = items[i]
            if not PyBytes_CheckExact(item):
                item = bytes(item)
                if kept is None:
                    kept = []
                kept.append(item)
            if PyBytes_GET_SIZE(item) != length:
                return i
            frames[i] = <const uint8_t *>PyBytes_AS_STRING(item)

        with nogil:
            for i in range(n):
                frame = frames[i]
                for s in range(n_signals):
                    field = &plan.fields[s]
                    raw = 0
                    for t in range(field.first, field.last):
                        term = &plan.terms[t]
                        raw |= ((<uint64_t>frame[term.byte] >> term.rshift) & term.mask) << term.lshift
                    if field.kind == UNSIGNED:
                        value = <double>raw
                    elif field.kind == SIGNED:
                        value = <double>(<int64_t>((raw ^ field.sign) - field.sign))
                    elif field.kind == FLOAT32:
                        bits32 = <uint32_t>raw
                        memcpy(&single, &bits32, 4)
                        value = single
                    elif field.kind == FLOAT64:
                        memcpy(&value, &raw, 8)
                    elif field.kind == FLOAT16:
                        value = half_to_double(<uint16_t>raw)
                    else:
                        value = NAN
                    out[s, i] = value * field.scale + field.offset if field.rescale else value
                for k in range(plan.n_selectors):  # parents first: an unselected multiplexer unselects its pages
                    selector = &plan.selectors[k * 5]
                    value = out[selector[0], i]
                    if selector[4]:
                        value = trunc(value)
                    found = False
                    for j in range(selector[2], selector[2] + selector[3]):
                        if value == plan.selector_ids[j]:
                            found = True
                            break
                    if not found:
                        out[selector[1], i] = NAN
    finally:
        if frames != small:
            PyMem_Free(frames)
    return -1
