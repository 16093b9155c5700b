"""The latency histogram and the stored-line scanner: one test body on both kernels (compiled and pure-Python)."""

from __future__ import annotations

import datetime as dt
import importlib
import json
import math
import sysconfig
from pathlib import Path

import msgspec
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

import engine.kernels
from engine import batch_decode, schema
from engine.aggregator import partitions
from engine.kernels import _jsonl_py, _select, histogram, jsonl
from engine.kernels.histogram import LatencyHistogram, PyLatencyHistogram

ROOT = Path(__file__).resolve().parent.parent
EXT_SUFFIX = sysconfig.get_config_var("EXT_SUFFIX").rsplit(".", 1)[-1]  # "so" (or "pyd")

IMPLEMENTATIONS = [PyLatencyHistogram]
if histogram.IMPLEMENTATION == "c":
    IMPLEMENTATIONS.append(LatencyHistogram)


@pytest.fixture(params=IMPLEMENTATIONS, ids=lambda cls: "py" if cls is PyLatencyHistogram else "c")
def Hist(request):
    return request.param


@pytest.mark.skipif(_select.extensions_disabled(), reason="CANPIPE_NO_EXTENSIONS=1: the twins are selected on purpose")
def test_every_compiled_kernel_is_built_and_selected():
    # CI builds the extensions at install; a failed compile falls back silently at run time, so this fails
    # it loudly: one built module and one compiled selection per ext/*.pyx
    names = sorted(path.stem for path in (ROOT / "ext").glob("*.pyx"))
    assert names == ["candecode", "groupby", "histogram", "jsonl"], "a new kernel needs its selector checked here"
    for name in names:
        importlib.import_module(f"engine.kernels.{name}")
        built = list(Path(engine.kernels.__file__).parent.glob(f"_{name}_c.*{EXT_SUFFIX}"))  # in a wheel too
        assert built, f"ext/{name}.pyx was not built (no _{name}_c*{EXT_SUFFIX}): run pip install -e ."
        assert _select.SELECTED[name] == ("c", "compiled"), f"kernel {name}: {_select.SELECTED[name]}"
    assert engine.kernels.IMPLEMENTATION == histogram.IMPLEMENTATION == "c"


latencies_ms = arrays(
    np.float64, st.integers(1, 3000), elements=st.floats(0.001, 3.6e6, allow_nan=False, allow_infinity=False)
)


@settings(max_examples=60, deadline=None)
@given(values=latencies_ms, q=st.floats(0.0, 1.0))
def test_quantile_within_one_percent_of_exact(values, q):
    for Hist in IMPLEMENTATIONS:
        hist = Hist()
        hist.record_many(values)
        exact = float(np.quantile(values, q, method="inverted_cdf"))
        assert hist.quantile(q) == pytest.approx(exact, rel=0.01), f"{Hist.__name__} q={q}"


def test_skewed_data_percentiles(Hist):
    rng = np.random.default_rng(20261128)
    values = rng.lognormal(mean=1.0, sigma=2.0, size=200_000)  # heavy right tail
    hist = Hist()
    hist.record_many(values)
    for q in (0.5, 0.9, 0.95, 0.99, 0.999):
        exact = np.quantile(values, q, method="inverted_cdf")
        assert abs(hist.quantile(q) - exact) / exact < 0.01, f"seed 20261128, q={q}"
    assert hist.count == values.size and hist.min == values.min() and hist.max == values.max()
    assert hist.mean == pytest.approx(values.mean())


@settings(max_examples=40, deadline=None)
@given(parts=st.lists(latencies_ms, min_size=1, max_size=5))
def test_merge_of_parts_equals_the_whole(parts):
    for Hist in IMPLEMENTATIONS:
        whole, merged = Hist(), Hist()
        whole.record_many(np.concatenate(parts))
        for part in parts:
            piece = Hist()
            piece.record_many(part)
            merged.merge(piece)
        assert np.array_equal(whole.counts, merged.counts)
        assert (whole.count, whole.min, whole.max) == (merged.count, merged.min, merged.max)


def test_both_kernels_fill_the_same_buckets():
    values = np.random.default_rng(5).exponential(50.0, 100_000)
    results = []
    for Hist in IMPLEMENTATIONS:
        hist = Hist()
        hist.record_many(values)
        results.append(hist.counts)
    assert all(np.array_equal(results[0], r) for r in results)


def test_range_edges_nan_and_single_values(Hist):
    hist = Hist()
    hist.record_many(np.array([np.nan, np.inf, -np.inf]))
    assert hist.count == 0 and math.isnan(hist.quantile(0.5)) and math.isnan(hist.mean)
    hist.record(0.0001)  # below 1 us
    hist.record(5 * 3600 * 1000.0)  # beyond the top bucket
    hist.record(12.5)
    assert hist.count == 3 and hist.quantile(0.0) == 0.0001 and hist.quantile(1.0) == 5 * 3600 * 1000.0
    assert hist.quantile(0.5) == pytest.approx(12.5, rel=0.01)
    with pytest.raises(ValueError):
        hist.quantile(1.5)


def test_serialized_form_round_trips_and_is_compact(Hist):
    hist = Hist()
    hist.record_many(np.random.default_rng(3).gamma(2.0, 20.0, 50_000))
    blob = hist.to_bytes()
    assert len(blob) < 8_000
    back = Hist.from_bytes(blob)
    assert np.array_equal(back.counts, hist.counts) and back.quantile(0.99) == hist.quantile(0.99)
    with pytest.raises(ValueError):
        Hist.from_bytes(b"XXXX" + blob[4:])


def test_no_extensions_selects_every_twin():
    import subprocess
    import sys

    code = (
        "import engine.kernels.histogram as h, engine.kernels.groupby as g, engine.kernels.jsonl as j;"
        "print(h.IMPLEMENTATION, g.IMPLEMENTATION, j.IMPLEMENTATION, j.parse_lines.__module__)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        env={**__import__("os").environ, "CANPIPE_NO_EXTENSIONS": "1"},
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert out == ["py", "py", "py", "engine.kernels._jsonl_py"]


# --- the stored-line scanner: one test body on both twins over an edge-case corpus ------------------------

SCANNERS = ["py", "c"] if jsonl.IMPLEMENTATION == "c" else ["py"]


@pytest.fixture(params=["c", "py"])
def parse(request):
    if request.param == "c" and jsonl.IMPLEMENTATION != "c":
        pytest.skip("compiled scanner not selected (CANPIPE_NO_EXTENSIONS=1, or not built)")
    return jsonl.parse_lines if request.param == "c" else _jsonl_py.parse_lines


def stored(
    can: bytes = b'"0x132"', payload: bytes = b'{"battery_soc":50.5}', extra: bytes = b"", **raw: bytes
) -> bytes:
    """A stored line in the receiver's exact shape (the compiled fast path tries it first), with raw JSON
    fragments swapped in."""
    ts = raw.get("ts", b'"2025-10-19T17:00:01Z"')
    vehicle = raw.get("vehicle", b'"EV-1"')
    head = b'{"timestamp":' + ts + b',"vehicle_id":' + vehicle + b',"can_id":' + can + b',"payload":' + payload
    return head + b',"ingest_received_at":"2025-10-19T17:00:02Z"' + extra + b"}"


def written(
    order: tuple[str, ...] = ("timestamp", "vehicle_id", "can_id", "payload", "ingest_received_at"),
    sep: bytes = b",",
    colon: bytes = b":",
    lead: bytes = b"",
    trail: bytes = b"",
    extra: bytes = b"",
    escaped: bool = False,
    open: bool = True,
    **raw: bytes,
) -> bytes:
    """A stored record as another tool may write it: key order, separators, whitespace and fields chosen."""
    fields = {
        "timestamp": raw.get("ts", b'"2025-10-19T17:00:01Z"'),
        "vehicle_id": raw.get("vehicle", b'"EV-1"'),
        "can_id": b'"0x132"',
        "payload": raw.get("payload", b'{"battery_soc":50.5}'),
        "ingest_received_at": raw.get("ingest", b'"2025-10-19T17:00:02.5Z"'),
    }
    keys = {k: (b"\\u0074imestamp" if escaped and k == "timestamp" else k.encode()) for k in fields}
    body = sep.join(b'"' + keys[k] + b'"' + colon + fields[k] for k in order)
    return lead + (b"{" if open else b"") + body + extra + b"}" + trail


DEEP = b"[" * 100_000 + b"]" * 100_000
# (case, line, (can_id, battery_soc) of the row it gives, or None: a corrupt line)
CORPUS = [
    ("canonical", stored(), (0x132, 50.5)),
    ("8 hex digits", stored(b'"0xFFFFFFFF"'), (0xFFFFFFFF, 50.5)),
    ("upper-case hex digits", stored(b'"0x1aB"'), (0x1AB, 50.5)),
    ("one digit", stored(b'"0x0"'), (0, 50.5)),
    ("escaped digit", stored(b'"0x\\u0031"'), (1, 50.5)),  # the same JSON string as "0x1"
    ("17 hex digits", stored(b'"0x' + b"f" * 17 + b'"'), None),
    ("9 hex digits", stored(b'"0x000000001"'), None),
    ("no 0x", stored(b'"10"'), None),
    ("underscore", stored(b'"0x1_0"'), None),
    ("upper-case X", stored(b'"0X10"'), None),
    ("no digits", stored(b'"0x"'), None),
    ("signed", stored(b'"-0x10"'), None),
    ("plus", stored(b'"+0x10"'), None),
    ("space", stored(b'" 0x10"'), None),
    ("number, not a string", stored(b"16"), None),
    ("1e400", stored(payload=b'{"battery_soc":1e400}'), None),
    ("-1e400", stored(payload=b'{"battery_soc":-1e400}'), None),
    ("400 digits", stored(payload=b'{"battery_soc":1' + b"0" * 400 + b"}"), None),
    ("NaN", stored(payload=b'{"battery_soc":NaN}'), None),
    ("Infinity", stored(payload=b'{"battery_soc":Infinity}'), None),
    ("true", stored(payload=b'{"battery_soc":true}'), None),
    ("negative zero", stored(payload=b'{"battery_soc":-0.0}'), (0x132, -0.0)),
    ("underflow to zero", stored(payload=b'{"battery_soc":1e-400}'), (0x132, 0.0)),
    ("exponent", stored(payload=b'{"battery_soc":5.05E+1}'), (0x132, 50.5)),
    ("17 significant digits", stored(payload=b'{"battery_soc":50.500000000000001}'), (0x132, 50.5)),
    ("integer", stored(payload=b'{"battery_soc":50}'), (0x132, 50.0)),
    ("null signal", stored(payload=b'{"battery_soc":null}'), (0x132, None)),
    ("empty payload", stored(payload=b"{}"), (0x132, None)),
    ("deep nesting as a value", stored(payload=b'{"battery_soc":' + DEEP + b"}"), None),
    ("deep nesting in an unknown field", stored(extra=b',"x":' + DEEP), None),
    ("unknown field", stored(extra=b',"x":1'), None),
    ("unknown signal", stored(payload=b'{"battery_soc":1,"x":1}'), None),
    ("non-UTF-8 vehicle id", stored(vehicle=b'"EV-\xff"'), None),
    ("non-UTF-8 in an unknown field", stored(extra=b',"x":"\xff"'), None),
    ("NUL in a string", stored(b'"0x1\x00"'), None),
    ("BOM", b"\xef\xbb\xbf" + stored(), None),
    ("missing ingest_received_at", stored().replace(b',"ingest_received_at":"2025-10-19T17:00:02Z"', b""), None),
    ("missing payload", stored().replace(b',"payload":{"battery_soc":50.5}', b""), None),
    ("missing can_id", stored().replace(b',"can_id":"0x132"', b""), None),
    ("naive timestamp", stored(ts=b'"2025-10-19T17:00:01"'), None),
    ("no such day", stored(ts=b'"2025-02-30T17:00:01Z"'), None),
    ("trailing garbage", stored() + b" x", None),
    ("an array", b"[" + stored() + b"]", None),
    ("truncated", stored()[:-1], None),
    # other writers' renderings of a record (the compiled fast path reads these too, or asks the twin)
    *[
        (case, written(**parts), want)
        for case, parts, want in [
            ("milliseconds", {"ts": b'"2025-10-19T17:00:01.123Z"'}, (0x132, 50.5)),
            ("whole seconds, other writer", {"ingest": b'"2025-10-19T17:00:02Z"'}, (0x132, 50.5)),
            ("+00:00", {"ts": b'"2025-10-19T17:00:01.5+00:00"'}, (0x132, 50.5)),
            ("-05:30", {"ts": b'"2025-10-19T11:30:01-05:30"'}, (0x132, 50.5)),
            ("+23:59", {"ts": b'"2025-10-19T17:00:01+23:59"'}, (0x132, 50.5)),
            ("-00:00", {"ingest": b'"2025-10-19T17:00:02-00:00"'}, (0x132, 50.5)),
            ("+24:00", {"ts": b'"2025-10-19T17:00:01+24:00"'}, None),
            ("+0000, no colon", {"ts": b'"2025-10-19T17:00:01+0000"'}, (0x132, 50.5)),
            ("space for T", {"ts": b'"2025-10-19 17:00:01Z"'}, (0x132, 50.5)),
            ("7 fraction digits", {"ts": b'"2025-10-19T17:00:01.1234565Z"'}, (0x132, 50.5)),
            ("9 fraction digits", {"ingest": b'"2025-10-19T17:00:01.999999999Z"'}, (0x132, 50.5)),
            ("leap second", {"ts": b'"2025-10-19T17:00:60Z"'}, None),
            (
                "ingest time first",
                {"order": ("ingest_received_at", "payload", "can_id", "timestamp", "vehicle_id")},
                (0x132, 50.5),
            ),
            (
                "payload first",
                {"order": ("payload", "vehicle_id", "timestamp", "ingest_received_at", "can_id")},
                (0x132, 50.5),
            ),
            ("a space after separators", {"sep": b", ", "colon": b": "}, (0x132, 50.5)),
            ("spaces around colons", {"sep": b" , ", "colon": b" : "}, (0x132, 50.5)),
            ("spaces and tabs around", {"lead": b" \t", "trail": b"\t \r"}, (0x132, 50.5)),
            ("spaces in the payload", {"payload": b'{ "battery_soc" : 50.5 , "battery_current" : -1 }'}, (0x132, 50.5)),
            (
                "every signal, nulls",
                {
                    "payload": b'{"battery_soc":50.5,'
                    + b",".join(b'"%s":null' % s.encode() for s in schema.SIGNALS[1:])
                    + b"}"
                },
                (0x132, 50.5),
            ),
            (
                "signals reversed",
                {"payload": b'{"cell_temp_max":30,"battery_current":-2.5,"battery_soc":50.5}'},
                (0x132, 50.5),
            ),
            ("empty payload with a space", {"payload": b"{ }"}, (0x132, None)),
            ("a signal twice, last wins", {"payload": b'{"battery_soc":1,"battery_soc":50.5}'}, (0x132, 50.5)),
            ("a field twice, last wins", {"extra": b',"can_id":"0x7"'}, (0x7, 50.5)),
            (
                "an escaped known key",
                {"order": ("timestamp", "vehicle_id", "can_id", "payload", "ingest_received_at"), "escaped": True},
                (0x132, 50.5),
            ),
            ("an escaped signal name", {"payload": b'{"battery\\u005fsoc":50.5}'}, (0x132, 50.5)),
            ("empty vehicle id", {"vehicle": b'""'}, (0x132, 50.5)),
            ("escaped vehicle id", {"vehicle": b'"EV-\\u0031"'}, (0x132, 50.5)),
            ("an unknown field first", {"lead": b'{"source":"logger-7",', "open": False}, None),
            ("an unknown field, spaces", {"sep": b", ", "colon": b": ", "extra": b', "seq": 17'}, None),
            ("an unknown escaped field", {"extra": b',"s\\u006furce":1'}, None),
            ("an unknown signal, other order", {"payload": b'{"cell_temp_max":30,"coolant_temp":20}'}, None),
            ("a string signal", {"payload": b'{"battery_soc":"50.5"}'}, None),
            (
                "missing timestamp, other order",
                {"order": ("ingest_received_at", "payload", "can_id", "vehicle_id")},
                None,
            ),
            ("a trailing comma", {"extra": b","}, None),
        ]
    ],
]
# timestamp forms where the RFC 3339 reader (msgspec) and the ground truth's datetime.fromisoformat part
# ways: the twins must still agree, the ground truth (tests/canpipe_truth.py) does not cover them
RFC3339_EDGES = [
    ("lower-case z", written(ts=b'"2025-10-19T17:00:01z"'), (0x132, 50.5)),
    ("fraction without digits", written(ts=b'"2025-10-19T17:00:01.Z"'), None),
    ("no seconds", written(ts=b'"2025-10-19T17:00Z"'), None),
]
SCANNER_CASES = CORPUS + RFC3339_EDGES


# with extra="skip" (the aggregator reading any writer's lines) a field the stored record does not have is
# ignored, whatever its JSON value, at the top or in the payload; the line must still be JSON and UTF-8
# throughout (tests/test_aggregator_truth.py holds the ground truth to the same verdicts)
SKIPPED = {
    "deep nesting in an unknown field": None,
    "unknown field": (0x132, 50.5),
    "unknown signal": (0x132, 1.0),
    "non-UTF-8 in an unknown field": None,
    "an unknown field first": (0x132, 50.5),
    "an unknown field, spaces": (0x132, 50.5),
    "an unknown escaped field": (0x132, 50.5),
    "an unknown signal, other order": (0x132, None),
}
EXTRA_VALUES = [
    (b'"logger-7"', True),
    (b'""', True),
    (b"17", True),
    (b"-1.5e3", True),
    (b"1e400", True),  # JSON grammar; only a signal must be finite
    (b"null", True),
    (b"true", True),
    (b"false", True),
    (b'{"a":[1,{"b":null}],"c":{}}', True),
    (b'{ "a" : [ 1 , 2 ] }', True),
    (b"[]", True),
    (b'[1,"x",[2.5,[]]]', True),
    (b"[" * 80 + b"]" * 80, True),  # past the fast path's depth: the twin
    ('"é"'.encode(), True),
    (b'"a\\"b\\u00e9"', True),
    (b'"\\ud800"', False),  # a lone surrogate: no text (the door refuses it too)
    (b'"\xff"', False),
    (b'"\x01"', False),
    (b'"abc', False),
    (b"[1,]", False),
    (b"[1 2]", False),
    (b'{"a" 1}', False),
    (b"{1:2}", False),
    (b'{"a":1,}', False),
    (b"01", False),
    (b"-", False),
    (b"nul", False),
    (b"NaN", False),
    (b"", False),
]
EXTRA_FIELD_CASES = [
    *[(f"top-level {v!r}", stored(extra=b',"source":' + v), (0x132, 50.5) if ok else None) for v, ok in EXTRA_VALUES],
    *[
        (
            f"payload {v!r}",
            stored(payload=b'{"coolant_temp":' + v + b',"battery_soc":50.5}'),
            (0x132, 50.5) if ok else None,
        )
        for v, ok in EXTRA_VALUES
    ],
    ("first, spaces", written(lead=b'{ "seq" : [ 1 ] , ', open=False, sep=b" , ", colon=b" : "), (0x132, 50.5)),
    ("several, twice", stored(extra=b',"x":1,"x":"2","y":{}'), (0x132, 50.5)),
    ("named like a field, in the payload", stored(payload=b'{"battery_soc":50.5,"can_id":"0x7"}'), (0x132, 50.5)),
]
SKIP_CASES = [(case, line, SKIPPED.get(case, want)) for case, line, want in SCANNER_CASES] + EXTRA_FIELD_CASES


def _assert_scanned(cols, case, expected):
    if expected is None:
        assert cols.bad_lines == [1] and len(cols.can_id) == 0, f"{case}: should be a corrupt line"
        return
    can_id, soc = expected
    assert cols.bad_lines == [] and cols.can_id.tolist() == [can_id], case
    if soc is None:
        assert math.isnan(cols.values[0, 0])
    else:
        assert cols.values[0, 0] == soc and math.copysign(1, cols.values[0, 0]) == math.copysign(1, soc)


@pytest.mark.parametrize("case, line, expected", SKIP_CASES, ids=[c[0] for c in SKIP_CASES])
def test_scanner_skipping_unknown_fields(parse, case, line, expected):
    _assert_scanned(parse(line + b"\n", {}, "skip"), case, expected)


@pytest.mark.parametrize("case, line, expected", EXTRA_FIELD_CASES, ids=[c[0] for c in EXTRA_FIELD_CASES])
def test_scanner_refusing_unknown_fields_by_default(parse, case, line, expected):
    # the consumer's check of what it stores: an unknown field makes the line corrupt, whatever its value
    _assert_scanned(parse(line + b"\n", {}), case, None)
    _assert_scanned(parse(line + b"\n", {}, "refuse"), case, None)


def test_the_scanner_names_its_modes(parse):
    with pytest.raises(ValueError, match="extra must be one of"):
        parse(stored() + b"\n", {}, "ignore")


@pytest.mark.skipif(
    jsonl.IMPLEMENTATION != "c", reason="compiled scanner not selected (CANPIPE_NO_EXTENSIONS=1, or not built)"
)
def test_scanner_twins_agree_on_the_whole_corpus_skipping_unknown_fields():
    data = b"\n".join(line for _, line, _ in SKIP_CASES) + b"\n"
    results = [(impl, {}) for impl in (jsonl.parse_lines, _jsonl_py.parse_lines)]
    a, b = (impl(data, vehicles, "skip") for impl, vehicles in results)
    assert results[0][1] == results[1][1] and a.bad_lines == b.bad_lines and a.lines == b.lines == len(SKIP_CASES)
    assert a.bad_lines == [n for n, (_, _, want) in enumerate(SKIP_CASES, 1) if want is None]
    for name in ("timestamp_us", "ingest_us", "vehicle", "can_id"):
        assert np.array_equal(getattr(a, name), getattr(b, name)), name
    assert a.values.tobytes() == b.values.tobytes()


@pytest.mark.parametrize("case, line, expected", SCANNER_CASES, ids=[c[0] for c in SCANNER_CASES])
def test_scanner_edge_case(parse, case, line, expected):
    _assert_scanned(parse(line + b"\n", {}), case, expected)


@pytest.mark.skipif(
    jsonl.IMPLEMENTATION != "c", reason="compiled scanner not selected (CANPIPE_NO_EXTENSIONS=1, or not built)"
)
def test_scanner_twins_agree_on_the_whole_corpus():
    data = b"\n".join(line for _, line, _ in SCANNER_CASES) + b"\n"
    results = [(impl, {}) for impl in (jsonl.parse_lines, _jsonl_py.parse_lines)]
    a, b = (impl(data, vehicles) for impl, vehicles in results)
    assert results[0][1] == results[1][1] and a.bad_lines == b.bad_lines and a.lines == b.lines == len(SCANNER_CASES)
    assert a.bad_lines == [n for n, (_, _, want) in enumerate(SCANNER_CASES, 1) if want is None]
    for name in ("timestamp_us", "ingest_us", "vehicle", "can_id"):
        assert np.array_equal(getattr(a, name), getattr(b, name)), name
    assert a.values.tobytes() == b.values.tobytes()  # bit for bit: -0.0 and NaN included


@pytest.mark.parametrize("scanner", SCANNERS)
def test_a_line_without_newline_at_the_end_is_a_torn_tail(tmp_path, monkeypatch, scanner):
    if scanner == "py":
        monkeypatch.setattr(partitions, "parse_lines", _jsonl_py.parse_lines)
    path = tmp_path / "batch-1-w.jsonl"
    path.write_bytes(stored() + b"\n" + stored(b'"0x7"'))  # the second, complete as JSON, lacks its newline
    scan = partitions.scan_files([str(path)], str(tmp_path), 1, None, "s0")
    assert (scan.info.records, scan.info.torn_tail_bytes, scan.info.corrupt_count) == (1, len(stored(b'"0x7"')), 0)
    assert scan.memory[0].can_id.tolist() == [0x132]


def test_one_instant_written_by_any_writer_is_one_timestamp_on_both_scanners(parse):
    # the dedup key compares instants, not text: these four are the same microsecond
    forms = [b'"2025-10-19T17:00:01.5Z"', b'"2025-10-19T17:00:01.500+00:00"', b'"2025-10-19T19:30:01.5+02:30"']
    forms.append(b'"2025-10-19T16:00:01.500000-01:00"')
    cols = parse(b"".join(written(ts=form) + b"\n" for form in forms), {})
    assert cols.bad_lines == [] and set(cols.timestamp_us.tolist()) == {1760893201500000}


def test_a_line_blank_only_to_the_twin_gives_neither_row_nor_report(parse):
    # a vertical tab or form feed is whitespace to bytes.strip, not to JSON: the twin skips the line
    cols = parse(stored() + b"\n\x0b\x0c\n" + stored() + b"\n", {})
    assert (len(cols.can_id), cols.bad_lines, cols.lines) == (2, [], 3)


WRITER_RECORDS = st.fixed_dictionaries(
    {
        "us": st.integers(1_760_000_000_000_000, 1_770_000_000_000_000),
        "vehicle": st.sampled_from(["EV-1", "EV-2", "Ä-3", ""]),
        "can": st.integers(0, 0xFFFFFFFF),
        "signals": st.dictionaries(
            st.sampled_from(schema.SIGNALS),
            st.none() | st.floats(allow_nan=False, allow_infinity=False) | st.integers(-(10**6), 10**6),
        ),
        "fraction": st.sampled_from([0, 3, 6]),
        "offset_min": st.sampled_from([0, 0, 60, -330, 23 * 60 + 59]),
        "z": st.sampled_from(["Z", "z", "+00:00"]),
        "keys": st.permutations(["timestamp", "vehicle_id", "can_id", "payload", "ingest_received_at"]),
        "space": st.sampled_from(["", " ", "\t"]),
        "extra": st.sampled_from([None, None, None, "source", "seq"]),
    }
)


def _render(r: dict) -> bytes:
    """``r`` as one writer renders a stored record (key order, whitespace, timestamp form, extras)."""
    offset = dt.timedelta(minutes=r["offset_min"])
    moment = (dt.datetime(1970, 1, 1, tzinfo=dt.UTC) + dt.timedelta(microseconds=r["us"])).astimezone(
        dt.timezone(offset)
    )
    text = moment.strftime("%Y-%m-%dT%H:%M:%S") + (
        f".{moment.microsecond:06d}"[: r["fraction"] + 1] if r["fraction"] else ""
    )
    text += r["z"] if not r["offset_min"] else moment.strftime("%z")[:3] + ":" + moment.strftime("%z")[3:]
    fields = {
        "timestamp": text,
        "vehicle_id": r["vehicle"],
        "can_id": f"0x{r['can']:X}",
        "payload": r["signals"],
        "ingest_received_at": text,
    }
    obj = {k: fields[k] for k in r["keys"]}
    if r["extra"]:
        obj[r["extra"]] = 1
    sp = r["space"]
    return json.dumps(obj, separators=("," + sp, ":" + sp), ensure_ascii=False).encode()


@pytest.mark.skipif(
    jsonl.IMPLEMENTATION != "c", reason="compiled scanner not selected (CANPIPE_NO_EXTENSIONS=1, or not built)"
)
@settings(max_examples=200, deadline=None)
@given(records=st.lists(WRITER_RECORDS, min_size=1, max_size=20))
def test_scanner_twins_agree_on_any_writers_lines(records):
    data = b"".join(_render(r) + b"\n" for r in records)
    results = [(impl, {}) for impl in (jsonl.parse_lines, _jsonl_py.parse_lines)]
    a, b = (impl(data, vehicles) for impl, vehicles in results)
    assert results[0][1] == results[1][1] and a.bad_lines == b.bad_lines and a.lines == b.lines == len(records)
    assert a.bad_lines == [n for n, r in enumerate(records, 1) if r["extra"]]  # an unknown field: corrupt
    for name in ("timestamp_us", "ingest_us", "vehicle", "can_id"):
        assert np.array_equal(getattr(a, name), getattr(b, name)), name
    assert a.values.tobytes() == b.values.tobytes()
    assert a.timestamp_us.tolist() == [r["us"] - r["us"] % 10 ** (6 - r["fraction"]) for r in records if not r["extra"]]
    # the aggregator's mode: the unknown field is ignored, every line is a row, on both twins alike
    a, b = (impl(data, {}, "skip") for impl in (jsonl.parse_lines, _jsonl_py.parse_lines))
    assert a.bad_lines == b.bad_lines == [] and len(a.can_id) == len(records)
    for name in ("timestamp_us", "ingest_us", "vehicle", "can_id"):
        assert np.array_equal(getattr(a, name), getattr(b, name)), name
    assert a.values.tobytes() == b.values.tobytes()
    assert a.timestamp_us.tolist() == [r["us"] - r["us"] % 10 ** (6 - r["fraction"]) for r in records]


# --- one signal list: the schema's, the scanner twins' and the compiled fast path's ---------------------


def test_schema_kernels_and_compiled_scanner_know_the_same_signals():
    # the kernels may not import the schema (ground floor), so their copy is held equal to it here
    assert schema.SIGNALS == _jsonl_py.SIGNALS == jsonl.SIGNALS
    assert tuple(f.name for f in msgspec.structs.fields(schema.Payload)) == schema.SIGNALS
    assert tuple(f.name for f in msgspec.structs.fields(_jsonl_py._Payload)) == schema.SIGNALS
    compiled = pytest.importorskip("engine.kernels._jsonl_c", reason="compiled scanner not built")
    assert compiled.signals() == schema.SIGNALS


def test_each_signal_lands_in_its_own_row_on_both_scanners(parse):
    # one stored line in the receiver's exact shape (the fast path), a distinct value per signal
    line = schema.encode_stored(
        [schema.Telemetry(HOUR_START, "EV-1", "0x132", schema.Payload(**SIGNAL_VALUES))], HOUR_START
    )
    cols = parse(line, {})
    assert cols.bad_lines == []
    assert {name: cols.values[row, 0] for row, name in enumerate(schema.SIGNALS)} == SIGNAL_VALUES


HOUR_START = dt.datetime(2025, 10, 19, 17, tzinfo=schema.UTC)
SIGNAL_VALUES = {
    "battery_soc": 50.5,
    "battery_voltage": 380.25,
    "battery_current": -12.5,
    "cell_voltage_min": 3.75,
    "cell_voltage_max": 3.8125,
    "cell_temp_min": 21.5,
    "cell_temp_max": 24.0,
}


# ---- the receiver's batch checks (engine.batch_decode): check_records on both kernels ----

OFFSETS = [dt.UTC, dt.timezone(dt.timedelta(hours=2)), dt.timezone(dt.timedelta(hours=-5, minutes=-30))]
signal_value = st.one_of(st.none(), st.floats(-500, 500, allow_nan=False), st.integers(-500, 500))
batch_record = st.builds(
    lambda stamp, offset, values, received: batch_decode.BatchRecord(
        stamp.replace(tzinfo=dt.UTC).astimezone(offset),
        "EV-1",
        "0x1",
        batch_decode.BatchPayload(**dict(zip(schema.SIGNALS, values))),
        received,
    ),
    st.datetimes(dt.datetime(1970, 1, 2), dt.datetime(2200, 1, 1)),
    st.sampled_from(OFFSETS),
    st.lists(signal_value, min_size=len(schema.SIGNALS), max_size=len(schema.SIGNALS)),
    st.one_of(st.none(), st.none(), st.none(), st.just("2026-01-01T00:00:00Z")),
)


def reference_check(records: list) -> tuple[int, bool, int, int] | None:
    """What check_records must answer, record by record, in plain Python."""
    nones = 0
    for record in records:
        values = [getattr(record.payload, name) for name in schema.SIGNALS]
        if record.ingest_received_at is not None or values.count(None) == len(values):
            return None
        for low, high in (("cell_voltage_min", "cell_voltage_max"), ("cell_temp_min", "cell_temp_max")):
            a, b = getattr(record.payload, low), getattr(record.payload, high)
            if a is not None and b is not None and a > b:
                return None
        nones += values.count(None)
    micros = [(record.timestamp - _jsonl_py.EPOCH) // _jsonl_py.MICROSECOND for record in records]
    utc = all(record.timestamp.tzinfo is dt.UTC for record in records)
    return nones, utc, min(micros, default=0), max(micros, default=0)


@pytest.fixture(scope="module", params=["c", "py"])
def check(request):
    if request.param == "c" and jsonl.IMPLEMENTATION != "c":
        pytest.skip("compiled kernel not selected (CANPIPE_NO_EXTENSIONS=1, or not built)")
    return jsonl.check_records if request.param == "c" else _jsonl_py.check_records


@settings(max_examples=300, deadline=None)
@given(records=st.lists(batch_record, max_size=12))
def test_batch_checks_answer_as_the_record_by_record_reference_on_both_kernels(check, records):
    stamps = np.full(len(records) + 1, -1, np.int64)
    expected = reference_check(records)
    assert check(records, stamps) == expected
    if expected is not None:
        micros = [(r.timestamp - _jsonl_py.EPOCH) // _jsonl_py.MICROSECOND for r in records]
        assert stamps[: len(records)].tolist() == micros and stamps[-1] == -1


def test_batch_checks_refuse_each_rule_on_both_kernels(check):
    def one(**payload: float | None) -> list:
        values = dict.fromkeys(schema.SIGNALS, 1.0) | payload
        return [batch_decode.BatchRecord(HOUR_START, "EV-1", "0x1", batch_decode.BatchPayload(**values))]

    stamps = np.empty(1, np.int64)
    assert check(one(), stamps) == (0, True, stamps[0], stamps[0])
    assert check(one(cell_voltage_min=3.9, cell_voltage_max=3.8), stamps) is None
    assert check(one(cell_temp_min=30.0, cell_temp_max=20.0, cell_voltage_min=None), stamps) is None
    assert check(one(cell_temp_min=30.0, cell_temp_max=None), stamps) == (1, True, stamps[0], stamps[0])
    assert check(one(**dict.fromkeys(schema.SIGNALS)), stamps) is None
    sent = one()
    sent[0].ingest_received_at = "2026-01-01T00:00:00Z"
    assert check(sent, stamps) is None
    with pytest.raises(ValueError):  # more records than room for their timestamps
        check(one() + one(), stamps)
