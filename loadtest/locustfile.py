"""Locust scenarios for canpipe's receiver, with the simulator's payloads (engine.simulator.PackModel).

Run through the runner, which sets the rate and reports records/s (``python -m loadtest --rate 500``), or
by hand, picking a scenario by user class (abusers only when named)::

    CANPIPE_API_KEY=key_id:secret locust -f loadtest/locustfile.py --host http://127.0.0.1:8000 \\
        --headless -u 100 -r 100 -t 60s Vehicle

Scenarios (user class / tag, request name):
- ``Vehicle`` / ``single``: one record per request, ``LOADTEST_REQUESTS_PER_USER_S`` requests/s per user
  (default 5: the seed's 200 ms sampling), named ``/ingest [single]``;
- ``Gateway`` / ``batched``: ``LOADTEST_BATCH`` records (default 100, one per vehicle behind it) per NDJSON
  request, named ``/ingest [batch N]``;
- ``Abuser`` / ``abuse``: wrong keys and out-of-range values, which must get 401 / 422 and change nothing,
  named ``/ingest [abuse]``. Only runs when asked for by class name or ``--tags abuse``.

``--tags single`` (or ``batched``, ``abuse``) keeps only the classes with tasks of that tag, so no class is
left without tasks. Pacing is ``constant_throughput``: a constant arrival rate per user as long as the
receiver answers within the period; when it does not, the achieved rate falls short and the report says so.
"""

from __future__ import annotations

import datetime as dt
import itertools
import os
import random
import secrets

import msgspec
from locust import FastHttpUser, constant_throughput, events, tag, task

from engine.simulator import CAN_IDS, PackModel

KEY = os.environ.get("CANPIPE_API_KEY", "")
REQUESTS_PER_USER_S = float(os.environ.get("LOADTEST_REQUESTS_PER_USER_S", "5"))
BATCH = int(os.environ.get("LOADTEST_BATCH", "100"))
# vehicle ids unique across locust worker processes and runs: the dedup key counts records on disk
RUN = os.environ.get("LOADTEST_RUN") or secrets.token_hex(3)
_ids = itertools.count()
_encoder = msgspec.json.Encoder()
# Each locust process writes how many records it saw accepted here when it stops: with --processes the
# master's totals can miss the workers' last report, and "lost" must not be computed from an undercount.
COUNT_DIR = os.environ.get("LOADTEST_COUNT_DIR", "")
_accepted = [0]


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


class _Fleet:
    """Vehicles as the simulator models them: each ticks through the three CAN ids in turn."""

    def __init__(self, count: int) -> None:
        self.vehicles = [f"LT-{RUN}-{os.getpid()}-{next(_ids)}" for _ in range(count)]
        self.packs = [PackModel(random.Random(v)) for v in self.vehicles]
        self.tick = 0

    def records(self) -> list[dict]:
        period_s = 1.0 / REQUESTS_PER_USER_S
        can_id = CAN_IDS[self.tick % len(CAN_IDS)]
        self.tick += 1
        now = _now()
        return [
            {"timestamp": now, "vehicle_id": v, "can_id": can_id, "payload": pack.step(period_s)}
            for v, pack in zip(self.vehicles, self.packs)
        ]


def _expect_accepted(response, count: int) -> None:
    """Only ``202 {"accepted": count}`` is a success: a 503 is a record the pipeline did not take."""
    if response.status_code == 202 and response.json() == {"accepted": count}:
        _accepted[0] += count
        response.success()
    else:
        response.failure(f"{response.status_code}: {(response.text or response.error or '')!s:.200}")


class Vehicle(FastHttpUser):
    wait_time = constant_throughput(REQUESTS_PER_USER_S)

    def on_start(self) -> None:
        self.fleet = _Fleet(1)

    @tag("single")
    @task
    def post_one(self) -> None:
        body = _encoder.encode(self.fleet.records()[0])
        headers = {"X-API-Key": KEY, "Content-Type": "application/json"}
        with self.client.post("/ingest", data=body, headers=headers, name="/ingest [single]", catch_response=True) as r:
            _expect_accepted(r, 1)


class Gateway(FastHttpUser):
    wait_time = constant_throughput(REQUESTS_PER_USER_S)

    def on_start(self) -> None:
        self.fleet = _Fleet(BATCH)

    @tag("batched")
    @task
    def post_batch(self) -> None:
        body = b"\n".join(_encoder.encode(r) for r in self.fleet.records()) + b"\n"
        headers = {"X-API-Key": KEY, "Content-Type": "application/x-ndjson"}
        name = f"/ingest [batch {BATCH}]"
        with self.client.post("/ingest", data=body, headers=headers, name=name, catch_response=True) as r:
            _expect_accepted(r, BATCH)


class Abuser(FastHttpUser):
    wait_time = constant_throughput(2)

    @tag("abuse")
    @task
    def wrong_key(self) -> None:
        with self.client.post(
            "/ingest", json={}, headers={"X-API-Key": "nobody:wrong"}, name="/ingest [abuse]", catch_response=True
        ) as r:
            if r.status_code == 401:
                r.success()
            else:
                r.failure(f"expected 401, got {r.status_code}")

    @tag("abuse")
    @task
    def out_of_range(self) -> None:
        bad = _Fleet(1).records()[0]
        bad["payload"]["battery_soc"] = 140.0
        with self.client.post(
            "/ingest", json=bad, headers={"X-API-Key": KEY}, name="/ingest [abuse]", catch_response=True
        ) as r:
            if r.status_code == 422 and r.json()["errors"][0]["path"] == "$.payload.battery_soc":
                r.success()
            else:
                r.failure(f"expected 422 at $.payload.battery_soc, got {r.status_code}")


@events.test_stop.add_listener
@events.quitting.add_listener
def _write_accepted(**_kwargs) -> None:
    """Write (again) this process's accepted-record count: called once users stopped and at exit."""
    if COUNT_DIR:
        path = os.path.join(COUNT_DIR, f"accepted-{os.getpid()}.txt")
        with open(path + ".tmp", "w") as f:
            f.write(str(_accepted[0]))
        os.replace(path + ".tmp", path)


def _tags_of(user_class: type) -> set[str]:
    return {t for method in user_class.tasks for t in getattr(method, "locust_tag_set", set())}


@events.init.add_listener
def _pick_scenarios(environment, **_kwargs) -> None:
    """Drop the classes a run did not ask for before locust filters tasks by tag: without this, ``--tags
    single`` left Abuser without tasks ("No tasks defined on Abuser"), and a plain run spawned abusers."""
    options = environment.parsed_options
    named = set(getattr(options, "user_classes", None) or [])
    tags = set(getattr(options, "tags", None) or [])
    keep = [
        cls
        for cls in environment.user_classes
        if (cls.__name__ in named) or (not named and (_tags_of(cls) & tags if tags else cls is not Abuser))
    ]
    if keep:
        environment.user_classes[:] = keep
