"""The seed's stack, the other anchor of ``bench/bench_receiver.py``: FastAPI with a pydantic model of the same
record (the same ranges and patterns), served by uvicorn; it validates and answers 202, with no queue at all.
"""

from __future__ import annotations

import datetime as dt

from fastapi import FastAPI
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

app = FastAPI()


class Payload(BaseModel):
    model_config = ConfigDict(extra="forbid")

    battery_soc: float | None = Field(None, ge=0.0, le=100.0, allow_inf_nan=False)
    battery_voltage: float | None = Field(None, ge=0.0, le=1500.0, allow_inf_nan=False)
    battery_current: float | None = Field(None, ge=-3000.0, le=3000.0, allow_inf_nan=False)
    cell_voltage_min: float | None = Field(None, ge=0.0, le=5.0, allow_inf_nan=False)
    cell_voltage_max: float | None = Field(None, ge=0.0, le=5.0, allow_inf_nan=False)
    cell_temp_min: float | None = Field(None, ge=-50.0, le=150.0, allow_inf_nan=False)
    cell_temp_max: float | None = Field(None, ge=-50.0, le=150.0, allow_inf_nan=False)


class Telemetry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    timestamp: AwareDatetime
    vehicle_id: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$")
    can_id: str = Field(pattern=r"^0x[0-9A-Fa-f]{1,8}$")
    payload: Payload


@app.post("/ingest", status_code=202)
async def ingest(record: Telemetry) -> dict[str, int]:
    record.timestamp.astimezone(dt.UTC)
    return {"accepted": 1}


@app.get("/health")
async def health() -> dict[str, str]:
    return {"status": "ok"}
