# cython: language_level=3
"""Compiled twin of engine/kernels/_jsonl_py.py: stored lines -> columns without a Python object per field.

The fast path reads a stored record as any writer may render it: keys in any order, JSON whitespace,
timestamps with 0 to 6 fraction digits and ``Z`` or a ``+HH:MM`` offset, signals absent or ``null``, the
optional ``dbc`` of a record decoded from a CAN frame. A key the schema does not have, at the top or in the
payload: with ``extra="refuse"`` (the consumer's check of stored lines) the line is corrupt on the spot (the
twin refuses it whatever else the line holds); with ``extra="skip"`` (the aggregator, reading any writer's
lines) its value, any JSON value, is skipped unread (a string with an escape or a non-ASCII byte, nesting
past 64 levels or a number the fast path does not read goes to the twin). Any other deviation (escapes, a key seen twice, 7+ fraction digits, a number JSON would not
accept, a CAN id other than ``0x`` + 1..8 hex digits...) goes to the pure-Python twin for that one line,
so both implementations accept and reject exactly the same lines.
"""

from cpython.datetime cimport (
    PyDateTime_CheckExact, PyDateTime_DATE_GET_HOUR, PyDateTime_DATE_GET_MICROSECOND, PyDateTime_DATE_GET_MINUTE,
    PyDateTime_DATE_GET_SECOND, PyDateTime_GET_DAY, PyDateTime_GET_MONTH, PyDateTime_GET_YEAR, datetime_tzinfo,
    import_datetime,
)
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
# the same keys quoted with their colon: one memcmp takes the signal a writer's order predicts
_QUOTED_BYTES = tuple(b'"' + name + b'":' for name in _NAME_BYTES)
cdef const char* QUOTED[MAX_SIGNALS]
cdef int QUOTED_LEN[MAX_SIGNALS]


cdef int _load_names() except -1:
    global N_SIGNALS
    cdef bytes name, quoted
    if len(_NAME_BYTES) > MAX_SIGNALS:
        raise ImportError(f"ext/jsonl.pyx: {len(_NAME_BYTES)} signals, at most {MAX_SIGNALS}: raise MAX_SIGNALS")
    for name, quoted in zip(_NAME_BYTES, _QUOTED_BYTES):
        NAMES[N_SIGNALS], QUOTED[N_SIGNALS] = name, quoted
        NAME_LEN[N_SIGNALS], QUOTED_LEN[N_SIGNALS] = len(name), len(quoted)
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
    """'"YYYY-MM-DDTHH:MM:SS[.f{1,6}](Z|z|+HH:MM|-HH:MM)"' at p[i] -> microseconds since the epoch (the
    instant: an offset is taken off). Consecutive records mostly share their date and hour: those are
    parsed once and then compared. Anything else (7+ fraction digits, ``+0000``, a space for ``T``, a leap
    second) is left to the twin: False."""
    cdef Py_ssize_t j = i[0]
    cdef int y, mo, d, h, mi, s, k, frac = 0, scale = 100000, mdays, oh, om
    cdef long long base, offset_us = 0
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
    if j < end and (p[j] == 90 or p[j] == 122):  # Z, z
        j += 1
    elif j + 6 <= end and (p[j] == 43 or p[j] == 45) and p[j + 3] == 58:  # +HH:MM, -HH:MM
        oh, om = digits(p, j + 1, 2), digits(p, j + 4, 2)
        if oh < 0 or oh > 23 or om < 0 or om > 59:
            return False
        offset_us = (oh * 60 + om) * 60000000LL
        if p[j] == 45:
            offset_us = -offset_us
        j += 6
    else:
        return False
    if j >= end or p[j] != 34:
        return False
    out[0] = base + mi * 60000000LL + s * 1000000LL + frac - offset_us
    i[0] = j + 1
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


# what ``record`` says of one line: a row, ask the twin (a shape the fast path does not read), or corrupt
DEF ROW = 1
DEF ASK_TWIN = 0
DEF CORRUPT = -1
# the record's keys, as bits of ``Record.seen``
DEF K_TIMESTAMP = 0
DEF K_VEHICLE = 1
DEF K_CAN = 2
DEF K_PAYLOAD = 3
DEF K_INGEST = 4
DEF K_DBC = 5  # optional: the DBC's content hash of a record decoded from a CAN frame (POST /ingest/can)
DEF ALL_KEYS = 31  # the five required keys


cdef struct Record:
    long long t_us, in_us, can_id
    Py_ssize_t name_start, name_len  # the vehicle id's bytes (no escapes), looked up once the line is whole
    double v[MAX_SIGNALS]


cdef inline Py_ssize_t skip_space(const char* p, Py_ssize_t i, Py_ssize_t end) noexcept nogil:
    """Past JSON whitespace (a line holds no newline)."""
    while i < end and (p[i] == 32 or p[i] == 9 or p[i] == 13):
        i += 1
    return i


cdef inline int record_key(const char* k, Py_ssize_t n) noexcept nogil:
    if n == 9 and memcmp(k, b"timestamp", 9) == 0:
        return K_TIMESTAMP
    if n == 10 and memcmp(k, b"vehicle_id", 10) == 0:
        return K_VEHICLE
    if n == 6 and memcmp(k, b"can_id", 6) == 0:
        return K_CAN
    if n == 7 and memcmp(k, b"payload", 7) == 0:
        return K_PAYLOAD
    if n == 18 and memcmp(k, b"ingest_received_at", 18) == 0:
        return K_INGEST
    if n == 3 and memcmp(k, b"dbc", 3) == 0:
        return K_DBC
    return -1


cdef inline int key_at(const char* p, Py_ssize_t* i, Py_ssize_t end, Py_ssize_t* at, Py_ssize_t* n) noexcept nogil:
    """A key's opening quote at p[i] -> where its text starts (``at``), its length (``n``), and i past the
    ``:`` after it and the space after that; ASK_TWIN when it is not a plain key (an escape may spell a
    known one: ``"\u0074imestamp"`` is ``timestamp``) or no ``:`` follows."""
    cdef const char* q
    if i[0] >= end or p[i[0]] != 34:
        return ASK_TWIN
    q = <const char*>memchr(p + i[0] + 1, 34, end - i[0] - 1)
    if q == NULL:
        return ASK_TWIN
    at[0] = i[0] + 1
    n[0] = q - (p + at[0])
    if memchr(p + at[0], 92, n[0]) != NULL:
        return ASK_TWIN
    i[0] = skip_space(p, q - p + 1, end)
    if i[0] >= end or p[i[0]] != 58:
        return ASK_TWIN
    i[0] = skip_space(p, i[0] + 1, end)
    return ROW


cdef inline int predicted(const char* p, Py_ssize_t i, Py_ssize_t end, int key) noexcept nogil:
    """The length of ``"<key>":`` when p[i] holds exactly that, else 0 (fixed-size compares the C compiler
    unrolls)."""
    if key == K_TIMESTAMP:
        return 12 if i + 12 <= end and memcmp(p + i, b'"timestamp":', 12) == 0 else 0
    if key == K_VEHICLE:
        return 13 if i + 13 <= end and memcmp(p + i, b'"vehicle_id":', 13) == 0 else 0
    if key == K_CAN:
        return 9 if i + 9 <= end and memcmp(p + i, b'"can_id":', 9) == 0 else 0
    if key == K_PAYLOAD:
        return 10 if i + 10 <= end and memcmp(p + i, b'"payload":', 10) == 0 else 0
    return 21 if i + 21 <= end and memcmp(p + i, b'"ingest_received_at":', 21) == 0 else 0


cdef inline int after_value(const char* p, Py_ssize_t* i, Py_ssize_t end) noexcept nogil:
    """After a member: 1 on ``,`` (i past it and the space after), 0 on ``}`` (i past it), -1 otherwise."""
    i[0] = skip_space(p, i[0], end)
    if i[0] < end and p[i[0]] == 44:
        i[0] = skip_space(p, i[0] + 1, end)
        return 1
    if i[0] < end and p[i[0]] == 125:
        i[0] += 1
        return 0
    return -1


DEF MAX_SKIP_DEPTH = 64


cdef int skip_value(const char* p, Py_ssize_t* i, Py_ssize_t end, int depth) noexcept nogil:
    """Past one JSON value of a field the schema does not have (``extra="skip"``): ROW, i past it; ASK_TWIN
    for what the fast path does not check itself (escapes and non-ASCII in strings, which the twin
    decodes for their UTF-8; a number outside its grammar or range; nesting past MAX_SKIP_DEPTH)."""
    cdef Py_ssize_t j, at, n
    cdef double ignored
    cdef char c
    cdef int more
    if i[0] >= end or depth > MAX_SKIP_DEPTH:
        return ASK_TWIN
    c = p[i[0]]
    if c == 34:  # a string of printable ASCII
        return ROW if printable_string(p, i, end) else ASK_TWIN
    if c == 123 or c == 91:  # an object or an array
        i[0] = skip_space(p, i[0] + 1, end)
        if i[0] < end and p[i[0]] == c + 2:  # } is { + 2, ] is [ + 2
            i[0] += 1
            return ROW
        while True:
            if c == 123 and key_at(p, i, end, &at, &n) != ROW:
                return ASK_TWIN
            if skip_value(p, i, end, depth + 1) != ROW:
                return ASK_TWIN
            i[0] = skip_space(p, i[0], end)
            if i[0] < end and p[i[0]] == 44:
                i[0] = skip_space(p, i[0] + 1, end)
            elif i[0] < end and p[i[0]] == c + 2:
                i[0] += 1
                return ROW
            else:
                return ASK_TWIN
    if expect(p, i, end, b"null", 4) or expect(p, i, end, b"true", 4) or expect(p, i, end, b"false", 5):
        return ROW
    return ROW if number(p, i, end, &ignored) else ASK_TWIN


cdef inline int payload(const char* p, Py_ssize_t* i, Py_ssize_t end, double* v, bint skip_extra) noexcept nogil:
    """The payload object at p[i]: signals in any order, ``null`` or a number each. A key that is no
    signal makes the line corrupt (the stored-record schema has no such field), or with ``skip_extra``
    its value is skipped; a key seen twice, a value of another type, anything unusual: ASK_TWIN."""
    cdef Py_ssize_t at, n
    cdef int s, k, key, guess = 0, more, seen = 0
    if i[0] >= end or p[i[0]] != 123:
        return ASK_TWIN
    i[0] = skip_space(p, i[0] + 1, end)
    if i[0] < end and p[i[0]] == 125:
        i[0] += 1
        return ROW
    while True:
        # a writer keeps its order: the signal after the last one is the likely next key
        guess %= N_SIGNALS
        if i[0] + QUOTED_LEN[guess] <= end and memcmp(p + i[0], QUOTED[guess], QUOTED_LEN[guess]) == 0:
            key = guess
            i[0] = skip_space(p, i[0] + QUOTED_LEN[guess], end)
        else:
            if key_at(p, i, end, &at, &n) != ROW:
                return ASK_TWIN
            key = -1
            for k in range(N_SIGNALS):
                s = (guess + k) % N_SIGNALS
                if NAME_LEN[s] == n and memcmp(p + at, NAMES[s], n) == 0:
                    key = s
                    break
            if key < 0 and not skip_extra:  # no such signal: the twin refuses the line whatever else it holds
                return CORRUPT
            if key < 0:
                if skip_value(p, i, end, 1) != ROW:
                    return ASK_TWIN
                more = after_value(p, i, end)
                if more < 0:
                    return ASK_TWIN
                if more == 0:
                    return ROW
                continue
        guess = key + 1
        if seen & (1 << key):
            return ASK_TWIN
        seen |= 1 << key
        if i[0] + 4 <= end and memcmp(p + i[0], b"null", 4) == 0:
            v[key] = NAN
            i[0] += 4
        elif not number(p, i, end, &v[key]):
            return ASK_TWIN
        more = after_value(p, i, end)
        if more < 0:
            return ASK_TWIN
        if more == 0:
            return ROW


cdef inline bint vehicle_id(const char* p, Py_ssize_t* i, Py_ssize_t end, Record* r) noexcept nogil:
    """A string without escapes or control characters (its UTF-8 is checked when it is first seen)."""
    cdef Py_ssize_t j
    if i[0] >= end or p[i[0]] != 34:
        return False
    j = i[0] + 1
    while j < end and p[j] != 34 and p[j] != 92 and (p[j] < 0 or p[j] >= 32):
        j += 1
    if j >= end or p[j] != 34:
        return False
    r.name_start, r.name_len = i[0] + 1, j - i[0] - 1
    i[0] = j + 1
    return True


cdef inline bint printable_string(const char* p, Py_ssize_t* i, Py_ssize_t end) noexcept nogil:
    """A string of printable ASCII without escapes, skipped (its UTF-8 needs no check)."""
    cdef Py_ssize_t j
    if i[0] >= end or p[i[0]] != 34:
        return False
    j = i[0] + 1
    while j < end and p[j] != 34 and p[j] != 92 and 32 <= p[j] <= 126:
        j += 1
    if j >= end or p[j] != 34:
        return False
    i[0] = j + 1
    return True


cdef inline bint can_id(const char* p, Py_ssize_t* i, Py_ssize_t end, long long* out) noexcept nogil:
    """'"0x' + 1..8 hex digits + '"'; anything else (escapes, other forms) is for the twin."""
    cdef Py_ssize_t j = i[0]
    cdef long long value = 0
    cdef int k = 0
    cdef char c
    if j + 3 > end or memcmp(p + j, b'"0x', 3) != 0:
        return False
    j += 3
    while j < end and k <= 8:
        c = p[j]
        if 48 <= c <= 57:
            value = value * 16 + (c - 48)
        elif 97 <= c <= 102:
            value = value * 16 + (c - 87)
        elif 65 <= c <= 70:
            value = value * 16 + (c - 55)
        else:
            break
        k += 1
        j += 1
    if k < 1 or k > 8 or j >= end or p[j] != 34:
        return False
    out[0] = value
    i[0] = j + 1
    return True


cdef int record(const char* p, Py_ssize_t start, Py_ssize_t end, Record* r, HourCache* client_hour,
                HourCache* ingest_hour, bint skip_extra) noexcept nogil:
    """One line as any writer may render a stored record: keys in any order, JSON whitespace, timestamps
    with 0 to 6 fraction digits and ``Z`` or an offset, signals absent or ``null``. A key the schema does
    not have makes the line corrupt, as the twin finds it, or with ``skip_extra`` its value is skipped; any
    other shape is for the twin (ASK_TWIN)."""
    cdef Py_ssize_t i = skip_space(p, start, end), at, n
    cdef int key, seen = 0, more, s, guess = K_TIMESTAMP
    cdef bint ok
    if i >= end or p[i] != 123:
        return ASK_TWIN
    i = skip_space(p, i + 1, end)
    for s in range(N_SIGNALS):
        r.v[s] = NAN
    while True:
        n = predicted(p, i, end, guess)
        if n:
            key = guess  # the key the schema's order predicts, as the receiver writes it
            i = skip_space(p, i + n, end)
        else:
            if key_at(p, &i, end, &at, &n) != ROW:
                return ASK_TWIN
            key = record_key(p + at, n)
            if key < 0 and not skip_extra:  # no such field: the twin refuses the line whatever else it holds
                return CORRUPT
            if key < 0:
                if skip_value(p, &i, end, 1) != ROW:
                    return ASK_TWIN
                more = after_value(p, &i, end)
                if more < 0:
                    return ASK_TWIN
                if more == 0:
                    break
                continue
        guess = (key + 1) % 5
        if seen & (1 << key):
            return ASK_TWIN
        seen |= 1 << key
        if key == K_TIMESTAMP:
            ok = timestamp(p, &i, end, &r.t_us, client_hour)
        elif key == K_VEHICLE:
            ok = vehicle_id(p, &i, end, r)
        elif key == K_CAN:
            ok = can_id(p, &i, end, &r.can_id)
        elif key == K_INGEST:
            ok = timestamp(p, &i, end, &r.in_us, ingest_hour)
        elif key == K_DBC:
            ok = printable_string(p, &i, end)  # kept in raw data only; null or anything else: the twin
        else:
            s = payload(p, &i, end, r.v, skip_extra)
            if s != ROW:
                return s
            ok = True
        if not ok:
            return ASK_TWIN
        more = after_value(p, &i, end)
        if more < 0:
            return ASK_TWIN
        if more == 0:
            break
    if skip_space(p, i, end) != end or (seen & ALL_KEYS) != ALL_KEYS:
        return ASK_TWIN
    return ROW


def parse_lines(const unsigned char[::1] data, dict vehicles, str extra="refuse"):
    """``data``: any buffer (bytes, a memoryview of an mmap) of whole lines; nothing is copied. ``extra``:
    "refuse" (a field the stored record does not have makes the line corrupt) or "skip" (ignored)."""
    cdef Py_ssize_t size = data.shape[0]
    cdef const char* p = NULL
    cdef bint skip_extra = _jsonl_py.skips_extra(extra)
    if size == 0:
        return _jsonl_py.parse_lines(b"", vehicles, extra)
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
    cdef Py_ssize_t start = 0, end, i, rows = 0, number_of_line = 0
    cdef const char* nl
    cdef Record r
    cdef int s, k, verdict
    cdef HourCache client_hour, ingest_hour
    client_hour.valid = False
    ingest_hour.valid = False
    cdef unsigned long long h
    cdef Py_ssize_t slot
    cdef long long index_c = 0
    cdef long long cache_index[CACHE_SLOTS]
    cdef unsigned long long cache_hash[CACHE_SLOTS]
    cdef Py_ssize_t cache_off[CACHE_SLOTS]
    cdef Py_ssize_t cache_len[CACHE_SLOTS]
    for k in range(CACHE_SLOTS):
        cache_index[k] = -1
    cdef bint blank
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
        verdict = record(p, start, end, &r, &client_hour, &ingest_hour, skip_extra)
        if verdict == ROW:
            # vehicle index, once the line is known good (the twin adds no vehicle for a bad line): a
            # direct-mapped cache keyed by the id's FNV-1a hash, verified byte for byte; only a miss builds
            # a Python string and asks the dict
            h = 14695981039346656037ULL
            for i in range(r.name_start, r.name_start + r.name_len):
                h = (h ^ <unsigned char>p[i]) * 1099511628211ULL
            slot = h & (CACHE_SLOTS - 1)
            if cache_index[slot] >= 0 and cache_hash[slot] == h and cache_len[slot] == r.name_len \
                    and memcmp(p + cache_off[slot], p + r.name_start, r.name_len) == 0:
                index_c = cache_index[slot]
            else:
                try:
                    name = PyUnicode_DecodeUTF8(p + r.name_start, r.name_len, NULL)
                except UnicodeDecodeError:
                    verdict = CORRUPT  # the twin refuses invalid UTF-8 anywhere in a line
                else:
                    index = vehicles.get(name)
                    if index is None:
                        index = vehicles[name] = len(vehicles)
                    index_c = index
                    cache_index[slot], cache_hash[slot] = index_c, h
                    cache_off[slot], cache_len[slot] = r.name_start, r.name_len
        if verdict == ROW:
            ts[rows], ingest[rows], vehicle[rows], can[rows] = r.t_us, r.in_us, index_c, r.can_id
            for s in range(N_SIGNALS):
                values[s, rows] = r.v[s]
            rows += 1
        elif verdict == CORRUPT:
            bad.append(number_of_line)
        else:
            # a shape the fast path does not read: the reference decides, for this one line
            one = _jsonl_py.parse_lines(bytes(data[start:end]), vehicles, extra)
            if one.bad_lines:
                bad.append(number_of_line)
            elif len(one.can_id):
                ts[rows], ingest[rows] = one.timestamp_us[0], one.ingest_us[0]
                vehicle[rows], can[rows] = one.vehicle[0], one.can_id[0]
                for s in range(N_SIGNALS):
                    values[s, rows] = one.values[s, 0]
                rows += 1
            # else: blank to the twin (a form feed, a vertical tab): no row, no report
        start = end + 1
    return _jsonl_py.Columns(
        timestamp_us=ts_arr[:rows].copy(), ingest_us=ingest_arr[:rows].copy(), vehicle=vehicle_arr[:rows].copy(),
        can_id=can_arr[:rows].copy(), values=np.ascontiguousarray(values_arr[:, :rows]), bad_lines=bad,
        lines=capacity - 1,
    )


# ---- the receiver's per-record checks of a decoded batch (engine.batch_decode) ----

import_datetime()
import datetime as _dt

cdef object _UTC = _dt.timezone.utc
_SIGNAL_NAMES = tuple(_jsonl_py.SIGNALS)  # attribute names of a decoded payload, in column order
cdef Py_ssize_t V_MIN = _jsonl_py.SIGNALS.index("cell_voltage_min")
cdef Py_ssize_t T_MIN = _jsonl_py.SIGNALS.index("cell_temp_min")
if (_jsonl_py.SIGNALS[V_MIN + 1], _jsonl_py.SIGNALS[T_MIN + 1]) != ("cell_voltage_max", "cell_temp_max"):
    raise ImportError("ext/jsonl.pyx: each cell minimum is expected right before its maximum in SIGNALS")


def check_records(list records, long long[::1] stamps_us):
    """Compiled twin of ``_jsonl_py.check_records``: one C loop over the records, an attribute read per field."""
    cdef Py_ssize_t count = len(records), i, k, present, nones = 0
    cdef double v[MAX_SIGNALS]
    cdef bint has[MAX_SIGNALS]
    cdef bint utc = True
    cdef long long us, low = 0, high = 0
    cdef tuple names = _SIGNAL_NAMES
    cdef object record, payload, value, stamp
    if stamps_us.shape[0] < count:
        raise ValueError(f"stamps_us holds {stamps_us.shape[0]} values, {count} records")
    for i in range(count):
        record = records[i]
        if record.ingest_received_at is not None:
            return None
        payload = record.payload
        present = 0
        for k in range(N_SIGNALS):
            value = getattr(payload, <str>names[k])
            has[k] = value is not None
            if has[k]:
                v[k] = value
                present += 1
        if present == 0:
            return None
        nones += N_SIGNALS - present
        if has[V_MIN] and has[V_MIN + 1] and v[V_MIN] > v[V_MIN + 1]:
            return None
        if has[T_MIN] and has[T_MIN + 1] and v[T_MIN] > v[T_MIN + 1]:
            return None
        stamp = record.timestamp
        if PyDateTime_CheckExact(stamp) and datetime_tzinfo(stamp) is _UTC:
            us = (
                days_from_civil(PyDateTime_GET_YEAR(stamp), PyDateTime_GET_MONTH(stamp), PyDateTime_GET_DAY(stamp))
                * 86400
                + PyDateTime_DATE_GET_HOUR(stamp) * 3600
                + PyDateTime_DATE_GET_MINUTE(stamp) * 60
                + PyDateTime_DATE_GET_SECOND(stamp)
            ) * 1000000 + PyDateTime_DATE_GET_MICROSECOND(stamp)
        else:  # an offset other than UTC: the receiver normalises these records; exact here, one call each
            utc = False
            us = _jsonl_py.micros(stamp)
        stamps_us[i] = us
        if i == 0 or us < low:
            low = us
        if i == 0 or us > high:
            high = us
    return nones, utc, low, high
