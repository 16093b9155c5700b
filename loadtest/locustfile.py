"""Locust scenarios for canpipe's receiver: a fleet of vehicles posting battery telemetry.

    pip install -e ".[load]"
    CANPIPE_API_KEY=key_id:secret locust -f loadtest/locustfile.py --host http://127.0.0.1:8000 \\
        --headless -u 200 -r 50 -t 60s --only-summary

Scenarios (pick with a tag, e.g. ``--tags batched``):
- ``single``: one record per request, every vehicle every 200 ms (the seed's rate: 5 records/s/vehicle);
- ``batched``: a gateway posting 100 records per request (NDJSON), once a second;
- ``abuse``: wrong keys, malformed and out-of-range payloads, which must get 401/422 and change nothing.

Locust runs on this machine too: for throughput figures use bench/pipeline.py, whose generator costs far
less CPU per request; Locust is for realistic mixes, error paths and soak runs.
"""

from __future__ import annotations

import datetime as dt
import itertools
import json
import os
import random

from locust import FastHttpUser, between, constant, tag, task

KEY = os.environ.get("CANPIPE_API_KEY", "")
UTC = dt.UTC
_ids = itertools.count()


def record(vehicle: str, rng: random.Random, soc: float) -> dict:
    current = round(rng.gauss(40, 60), 1)
    cell = round(3.0 + 1.2 * soc / 100, 3)
    return {
        "timestamp": dt.datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z"),
        "vehicle_id": vehicle,
        "can_id": "0x132",
        "payload": {
            "battery_soc": round(soc, 2),
            "battery_voltage": round(96 * cell - current * 0.07, 1),
            "battery_current": current,
            "cell_voltage_min": cell - 0.004,
            "cell_voltage_max": cell + 0.004,
            "cell_temp_min": 24.0,
            "cell_temp_max": 26.5,
        },
    }


class Vehicle(FastHttpUser):
    wait_time = constant(0.2)

    def on_start(self) -> None:
        self.vehicle = f"LOC-{next(_ids):05d}"
        self.rng = random.Random(self.vehicle)
        self.soc = self.rng.uniform(40, 95)

    @tag("single")
    @task
    def post_one(self) -> None:
        self.soc = max(0.0, self.soc - 0.001)
        with self.client.post(
            "/ingest", json=record(self.vehicle, self.rng, self.soc), headers={"X-API-Key": KEY}, catch_response=True
        ) as response:
            if response.status_code == 503:
                response.success()  # load shedding is an answer, not an error: the client retries later
            elif response.status_code != 202:
                response.failure(f"{response.status_code}: {response.text[:200]}")


class Gateway(FastHttpUser):
    wait_time = constant(1.0)

    def on_start(self) -> None:
        self.rng = random.Random(next(_ids))
        self.vehicles = [f"GW-{self.rng.randrange(10**6):06d}" for _ in range(100)]

    @tag("batched")
    @task
    def post_batch(self) -> None:
        body = "\n".join(json.dumps(record(v, self.rng, 60.0)) for v in self.vehicles) + "\n"
        with self.client.post(
            "/ingest",
            data=body,
            headers={"X-API-Key": KEY, "Content-Type": "application/x-ndjson"},
            catch_response=True,
        ) as response:
            if response.status_code != 202 or response.json() != {"accepted": 100}:
                response.failure(f"{response.status_code}: {response.text[:200]}")


class Abuser(FastHttpUser):
    wait_time = between(0.5, 1.0)

    @tag("abuse")
    @task
    def wrong_key(self) -> None:
        with self.client.post("/ingest", json={}, headers={"X-API-Key": "nobody:wrong"}, catch_response=True) as r:
            if r.status_code == 401:
                r.success()
            else:
                r.failure(f"expected 401, got {r.status_code}")

    @tag("abuse")
    @task
    def out_of_range(self) -> None:
        bad = record("LOC-BAD", random.Random(), 50.0)
        bad["payload"]["battery_soc"] = 140.0
        with self.client.post("/ingest", json=bad, headers={"X-API-Key": KEY}, catch_response=True) as r:
            if r.status_code == 422 and r.json()["errors"][0]["path"] == "$.payload.battery_soc":
                r.success()
            else:
                r.failure(f"expected 422 at $.payload.battery_soc, got {r.status_code}")
