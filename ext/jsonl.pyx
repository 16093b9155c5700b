# cython: language_level=3
"""Compiled twin of engine/kernels/_jsonl_py.py: stored lines -> columns without a Python object per field.

The fast path reads the exact shape canpipe's receiver writes (msgspec's compact JSON of a record, keys
in schema order, ``ingest_received_at`` last, UTC timestamps with a ``Z``). Any line that deviates in the
slightest (other key order, escapes, an offset, ``null``, a number JSON would not accept...) goes to the
pure-Python twin, line by line, so both implementations accept and reject exactly the same lines: a
CAN id other than ``0x`` + 1..8 hex digits, or a number that is not finite, leaves the fast path and the
twin calls the line corrupt.
"""

from cpython.unicode cimport PyUnicode_DecodeUTF8
from libc.math cimport NAN, isfinite
from libc.stdlib cimport strtod
from libc.string cimport memchr, memcmp, memcpy

import numpy as np

from engine.kernels import _jsonl_py

DEF CACHE_SLOTS = 4096
DEF MAX_SIGNALS = 16
cdef double POW10[23]
for _k in range(23):
    POW10[_k] = 10.0 ** _k

# The payload keys the fast path matches, built at import from the twin's SIGNALS (the kernels' one list,
# which a test holds equal to engine.schema's): adding a signal there needs no edit here
_NAME_BYTES = tuple(name.encode() for name in _jsonl_py.SIGNALS)  # NAMES points into these: kept alive
cdef int N_SIGNALS = 0
cdef const char* NAMES[MAX_SIGNALS]
cdef int NAME_LEN[MAX_SIGNALS]


cdef int _load_names() except -1:
    global N_SIGNALS
    cdef bytes name
    if len(_NAME_BYTES) > MAX_SIGNALS:
        raise ImportError(f"ext/jsonl.pyx: {len(_NAME_BYTES)} signals, at most {MAX_SIGNALS}: raise MAX_SIGNALS")
    for name in _NAME_BYTES:
        NAMES[N_SIGNALS] = name
        NAME_LEN[N_SIGNALS] = len(name)
        N_SIGNALS += 1
    return 0


_load_names()


def signals():
    """The payload keys the compiled fast path matches, in column order, read back from its C tables."""
    return tuple(NAMES[k][:NAME_LEN[k]].decode() for k in range(N_SIGNALS))


cdef inline bint expect(const char* p, Py_ssize_t* i, Py_ssize_t end, const char* lit, int n) noexcept nogil:
    if i[0] + n > end or memcmp(p + i[0], lit, n) != 0:
        return False
    i[0] += n
    return True


cdef inline int digits(const char* p, Py_ssize_t i, int n) noexcept nogil:
    """The value of n ASCII digits at p[i], or -1."""
    cdef int k, v = 0
    for k in range(n):
        if p[i + k] < 48 or p[i + k] > 57:
            return -1
        v = v * 10 + (p[i + k] - 48)
    return v


cdef inline long long days_from_civil(long long y, long long m, long long d) noexcept nogil:
    # Howard Hinnant's algorithm: days since 1970-01-01 in the proleptic Gregorian calendar
    y -= m <= 2
    cdef long long era = (y if y >= 0 else y - 399) // 400
    cdef long long yoe = y - era * 400
    cdef long long doy = (153 * (m + (-3 if m > 2 else 9)) + 2) // 5 + d - 1
    cdef long long doe = yoe * 365 + yoe // 4 - yoe // 100 + doy
    return era * 146097 + doe - 719468


cdef struct HourCache:
    char prefix[13]  # "YYYY-MM-DDTHH" of the last timestamp parsed
    long long base_us  # that hour's start, microseconds since the epoch
    bint valid


cdef inline bint timestamp(const char* p, Py_ssize_t* i, Py_ssize_t end, long long* out,
                           HourCache* cache) noexcept nogil:
    """'"YYYY-MM-DDTHH:MM:SS[.f{1,6}]Z"' at p[i] -> microseconds since the epoch. Consecutive records
    mostly share their date and hour: those are parsed once and then compared."""
    cdef Py_ssize_t j = i[0]
    cdef int y, mo, d, h, mi, s, k, frac = 0, scale = 100000, mdays
    cdef long long base
    if j + 22 > end or p[j] != 34 or p[j + 14] != 58 or p[j + 17] != 58:
        return False
    if cache.valid and memcmp(p + j + 1, cache.prefix, 13) == 0:
        base = cache.base_us
    else:
        if p[j + 5] != 45 or p[j + 8] != 45 or p[j + 11] != 84:
            return False
        y, mo, d, h = digits(p, j + 1, 4), digits(p, j + 6, 2), digits(p, j + 9, 2), digits(p, j + 12, 2)
        if y < 1 or mo < 1 or mo > 12 or d < 1 or h < 0 or h > 23:
            return False
        mdays = 31
        if mo == 2:
            mdays = 29 if (y % 4 == 0 and (y % 100 != 0 or y % 400 == 0)) else 28
        elif mo == 4 or mo == 6 or mo == 9 or mo == 11:
            mdays = 30
        if d > mdays:
            return False
        base = (days_from_civil(y, mo, d) * 24 + h) * 3600000000LL
        memcpy(cache.prefix, p + j + 1, 13)
        cache.base_us = base
        cache.valid = True
    mi, s = digits(p, j + 15, 2), digits(p, j + 18, 2)
    if mi < 0 or mi > 59 or s < 0 or s > 59:
        return False
    j += 20
    if p[j] == 46:  # fraction: 1 to 6 digits
        j += 1
        k = 0
        while j < end and p[j] >= 48 and p[j] <= 57:
            if k == 6:
                return False
            frac += (p[j] - 48) * scale
            scale //= 10
            k += 1
            j += 1
        if k == 0:
            return False
    if j + 2 > end or p[j] != 90 or p[j + 1] != 34:  # Z"
        return False
    out[0] = base + mi * 60000000LL + s * 1000000LL + frac
    i[0] = j + 2
    return True


cdef inline bint number(const char* p, Py_ssize_t* i, Py_ssize_t end, double* out) noexcept nogil:
    """A JSON number (strict grammar) at p[i]. Clinger's fast path: at most 15 significant digits and no
    exponent make an exact integer scaled by an exact power of ten, and one correctly rounded division
    gives the same double as strtod; anything else goes to strtod. A number that overflows to infinity
    (``1e400``, 400 digits) is refused: the door admits finite numbers only, and so does the twin."""
    cdef Py_ssize_t j = i[0], start = i[0]
    cdef char* stop
    cdef long long mantissa = 0
    cdef int n_digits = 0, scale = 0
    cdef bint negative = False, simple = True
    if j < end and p[j] == 45:
        negative = True
        j += 1
    if j >= end or p[j] < 48 or p[j] > 57:
        return False
    if p[j] == 48:
        j += 1
    else:
        while j < end and p[j] >= 48 and p[j] <= 57:
            mantissa = mantissa * 10 + (p[j] - 48)
            n_digits += 1
            j += 1
    if j < end and p[j] == 46:
        j += 1
        if j >= end or p[j] < 48 or p[j] > 57:
            return False
        while j < end and p[j] >= 48 and p[j] <= 57:
            if mantissa or p[j] != 48:
                n_digits += 1
            mantissa = mantissa * 10 + (p[j] - 48)
            scale += 1
            j += 1
    if j < end and (p[j] == 101 or p[j] == 69):
        simple = False
        j += 1
        if j < end and (p[j] == 43 or p[j] == 45):
            j += 1
        if j >= end or p[j] < 48 or p[j] > 57:
            return False
        while j < end and p[j] >= 48 and p[j] <= 57:
            j += 1
    if simple and n_digits <= 15 and scale <= 22:
        out[0] = (-<double>mantissa if negative else <double>mantissa) / POW10[scale]
    else:
        out[0] = strtod(p + start, &stop)
        if stop != p + j or not isfinite(out[0]):
            return False
    i[0] = j
    return True


def parse_lines(const unsigned char[::1] data, dict vehicles):
    """``data``: any buffer (bytes, a memoryview of an mmap) of whole lines; nothing is copied."""
    cdef Py_ssize_t size = data.shape[0]
    cdef const char* p = NULL
    if size == 0:
        return _jsonl_py.parse_lines(b"", vehicles)
    p = <const char*>&data[0]
    cdef Py_ssize_t capacity = 1, at = 0
    cdef const char* found
    while True:  # count lines with memchr (vectorised in libc), not bytes.count
        found = <const char*>memchr(p + at, 10, size - at) if at < size else NULL
        if found == NULL:
            break
        capacity += 1
        at = found - p + 1
    ts_arr = np.empty(capacity, dtype=np.int64)
    ingest_arr = np.empty(capacity, dtype=np.int64)
    vehicle_arr = np.empty(capacity, dtype=np.int64)
    can_arr = np.empty(capacity, dtype=np.int64)
    values_arr = np.empty((N_SIGNALS, capacity), dtype=np.float64)
    cdef long long[::1] ts = ts_arr, ingest = ingest_arr, vehicle = vehicle_arr, can = can_arr
    cdef double[:, ::1] values = values_arr
    cdef list bad = []
    cdef Py_ssize_t start = 0, end, i, name_start, rows = 0, number_of_line = 0
    cdef const char* nl
    cdef long long t_us, in_us, can_id
    cdef double x
    cdef double v[MAX_SIGNALS]
    cdef int s, k, key, guess
    cdef HourCache client_hour, ingest_hour
    client_hour.valid = False
    ingest_hour.valid = False
    cdef unsigned long long h
    cdef Py_ssize_t slot, name_len
    cdef long long index_c = 0
    cdef long long cache_index[CACHE_SLOTS]
    cdef unsigned long long cache_hash[CACHE_SLOTS]
    cdef Py_ssize_t cache_off[CACHE_SLOTS]
    cdef Py_ssize_t cache_len[CACHE_SLOTS]
    for k in range(CACHE_SLOTS):
        cache_index[k] = -1
    cdef bint ok, blank
    cdef char c
    while start < size:
        nl = <const char*>memchr(p + start, 10, size - start)
        end = (nl - p) if nl != NULL else size
        number_of_line += 1
        blank = True
        for i in range(start, end):
            if p[i] != 32 and p[i] != 9 and p[i] != 13:
                blank = False
                break
        if blank:
            start = end + 1
            continue
        # --- the fast path: the receiver's exact shape ---
        i = start
        ok = expect(p, &i, end, b'{"timestamp":', 13) and timestamp(p, &i, end, &t_us, &client_hour) \
            and expect(p, &i, end, b',"vehicle_id":"', 15)
        if ok:
            name_start = i
            while i < end and p[i] != 34 and p[i] != 92 and (p[i] < 0 or p[i] >= 32):
                i += 1
            ok = i < end and p[i] == 34 and i > name_start
        if ok:
            # vehicle index: a direct-mapped cache keyed by the id's FNV-1a hash, verified byte for byte;
            # only a miss builds a Python string and asks the dict
            name_len = i - name_start
            h = 14695981039346656037ULL
            for k in range(name_len):
                h = (h ^ <unsigned char>p[name_start + k]) * 1099511628211ULL
            slot = h & (CACHE_SLOTS - 1)
            if cache_index[slot] >= 0 and cache_hash[slot] == h and cache_len[slot] == name_len \
                    and memcmp(p + cache_off[slot], p + name_start, name_len) == 0:
                index_c = cache_index[slot]
            else:
                try:
                    name = PyUnicode_DecodeUTF8(p + name_start, name_len, NULL)
                except UnicodeDecodeError:
                    ok = False
                if ok:
                    index = vehicles.get(name)
                    if index is None:
                        index = vehicles[name] = len(vehicles)
                    index_c = index
                    cache_index[slot], cache_hash[slot] = index_c, h
                    cache_off[slot], cache_len[slot] = name_start, name_len
            i += 1
            ok = ok and expect(p, &i, end, b',"can_id":"0x', 13)
        if ok:
            can_id = 0
            k = 0
            while i < end and k <= 8:
                c = p[i]
                if 48 <= c <= 57:
                    can_id = can_id * 16 + (c - 48)
                elif 97 <= c <= 102:
                    can_id = can_id * 16 + (c - 87)
                elif 65 <= c <= 70:
                    can_id = can_id * 16 + (c - 55)
                else:
                    break
                k += 1
                i += 1
            ok = 1 <= k <= 8 and expect(p, &i, end, b'","payload":{', 13)
        if ok:
            for s in range(N_SIGNALS):
                v[s] = NAN
            guess = 0
            while ok:
                ok = i < end and p[i] == 34
                if not ok:
                    break
                key = -1
                for k in range(N_SIGNALS):
                    s = (guess + k) % N_SIGNALS  # keys come in schema order: the next one is the likely one
                    if i + 1 + NAME_LEN[s] + 2 <= end and memcmp(p + i + 1, NAMES[s], NAME_LEN[s]) == 0 \
                            and p[i + 1 + NAME_LEN[s]] == 34 and p[i + 2 + NAME_LEN[s]] == 58:
                        key = s
                        break
                guess = key + 1
                ok = key >= 0
                if not ok:
                    break
                i += NAME_LEN[key] + 3
                ok = number(p, &i, end, &x)
                if not ok:
                    break
                v[key] = x
                if i < end and p[i] == 44:
                    i += 1
                    continue
                ok = i < end and p[i] == 125
                i += 1
                break
        if ok:
            ok = expect(p, &i, end, b',"ingest_received_at":', 22) and timestamp(p, &i, end, &in_us, &ingest_hour) \
                and expect(p, &i, end, b'}', 1) and i == end
        if ok:
            ts[rows], ingest[rows], vehicle[rows], can[rows] = t_us, in_us, index_c, can_id
            for s in range(N_SIGNALS):
                values[s, rows] = v[s]
            rows += 1
        else:
            # not the receiver's exact shape: the reference decides, for this one line
            one = _jsonl_py.parse_lines(bytes(data[start:end]), vehicles)
            if one.bad_lines:
                bad.append(number_of_line)
            else:
                ts[rows], ingest[rows] = one.timestamp_us[0], one.ingest_us[0]
                vehicle[rows], can[rows] = one.vehicle[0], one.can_id[0]
                for s in range(N_SIGNALS):
                    values[s, rows] = one.values[s, 0]
                rows += 1
        start = end + 1
    return _jsonl_py.Columns(
        timestamp_us=ts_arr[:rows].copy(), ingest_us=ingest_arr[:rows].copy(), vehicle=vehicle_arr[:rows].copy(),
        can_id=can_arr[:rows].copy(), values=np.ascontiguousarray(values_arr[:, :rows]), bad_lines=bad,
        lines=capacity - 1,
    )
