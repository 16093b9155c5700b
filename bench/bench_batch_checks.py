"""The receiver's per-record checks of a decoded 100-record batch (``check_records``): compiled against its twin.

``engine.batch_decode.decode_checked`` runs them once per request after msgspec decoded the body: no
client-sent ``ingest_received_at``, a signal in every payload, each cell min <= its max, the absent signals
counted and every client timestamp read as integer microseconds (for the clock check and the ingest-stage
latency). The twin is the Python it replaced (columns of ``astuple``, ``datetime.timestamp`` per record).

A pass checks 200 batches made of 10 distinct ones, about 1 MB of records: in cache, as the receiver's one
freshly decoded batch is. With 200 distinct batches (10 MB) scattered over a long session's fragmented heap,
both sides wait on memory for ~200 ns a record, and the full CI runs read 2.4x (compiled 383-390 ns a
record) where a fresh process read 5x; a fragmented heap built on purpose gave the same 2.3x with 200
distinct batches and 5.2x with 10.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from timing import ratio

from engine.batch_decode import decode_batch
from engine.kernels import _jsonl_py, jsonl

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from canpipe_testing import make_record  # noqa: E402

RECORDS = 100
BATCHES = 200
DISTINCT = 10


def batches() -> list[list]:
    out = []
    for b in range(DISTINCT):
        body = "".join(
            json.dumps(make_record(b * RECORDS + i, vehicle_id=f"EV-{i % 50:05d}")) + "\n" for i in range(RECORDS)
        )
        records = decode_batch(body.encode(), ndjson=True)
        assert records is not None, "a plain 100-record body fell to the exact door"
        out.append(records)
    return out * (BATCHES // DISTINCT)


def run(check, data: list[list]) -> None:
    stamps = np.empty(RECORDS, np.int64)
    for records in data:
        if check(records, stamps) is None:
            raise AssertionError("a valid batch was refused")


@pytest.fixture(scope="module")
def data() -> list[list]:
    return batches()


def test_check_records_compiled(benchmark, data):
    if jsonl.IMPLEMENTATION != "c":
        pytest.fail("engine.kernels.jsonl is not compiled: this benchmark measures the compiled kernel")
    benchmark.group = f"batch checks: {BATCHES} x {RECORDS} decoded records ({DISTINCT} distinct batches)"
    benchmark(run, jsonl.check_records, data)


def test_check_records_twin(benchmark, data):
    benchmark.group = f"batch checks: {BATCHES} x {RECORDS} decoded records ({DISTINCT} distinct batches)"
    benchmark(run, _jsonl_py.check_records, data)


def test_guard_batch_checks(data):
    """CI guard: the compiled checks >= 3x their twin (measured 4-5.5x; 1x if the kernel is lost)."""
    twin_s, c_s, speedup = ratio(lambda: run(_jsonl_py.check_records, data), lambda: run(jsonl.check_records, data))
    per = BATCHES * RECORDS
    print(f"batch checks: compiled {c_s / per * 1e9:.0f} ns a record, twin {twin_s / per * 1e9:.0f} ns; {speedup:.1f}x")
    assert speedup >= 3, f"compiled check_records only {speedup:.1f}x its twin (guard 3x): is ext/jsonl compiled?"
