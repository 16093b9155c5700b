"""POST /ingest/can in process (Starlette's TestClient) on a real embedded SQLite queue, with the project's own
DBC (engine/can/data/canpipe_bms.dbc): what each answer leaves in the queue, the signal maps, the start-up
refusals. Through Granian, a consumer and the files: tests/integration/test_can_pipeline.py."""

from __future__ import annotations

import dataclasses
import datetime as dt
import functools
import json
import shutil
from pathlib import Path

import cantools
import msgspec
import pytest
from canpipe_testing import free_port
from starlette.testclient import TestClient

from engine.can.codec import DEFAULT_DBC, CanCodec, decimals_of, shipped_map_for
from engine.can.frame import format_frame_id, frame_id
from engine.cli import main
from engine.config import Settings
from engine.errors import ConfigError
from engine.openapi import openapi_document
from engine.queues import open_queue
from engine.receiver import create_app
from engine.schema import stored_decoder

KEY = "fleet1:s3cret-for-tests"
JSON = {"X-API-Key": KEY, "Content-Type": "application/json"}
MODEL3 = Path(__file__).resolve().parents[2] / "shared" / "data" / "dbc" / "Model3CAN.dbc"
DB = cantools.database.load_file(DEFAULT_DBC)
SOC_ID = 0x18FF50E5  # the extended id of the own DBC


def now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def frame(message: str, can_id: int | str | None = None, vehicle_id: str = "EV-1", **values: float) -> dict:
    msg = DB.get_message_by_name(message)
    return {
        "timestamp": now(),
        "vehicle_id": vehicle_id,
        "can_id": format_frame_id(msg.frame_id) if can_id is None else can_id,
        "data": msg.encode(values, strict=False).hex(),
    }


def pack(**kw) -> dict:
    return frame("BMS_PackStatus", BMS_PackVoltage=396.22, BMS_PackCurrent=-42.3, BMS_StatusCounter=1, **kw)


@pytest.fixture
def settings(tmp_path):
    return Settings.from_env(
        {
            "CANPIPE_DATA_DIR": str(tmp_path),
            "CANPIPE_API_KEYS": KEY,
            "CANPIPE_DBC": str(DEFAULT_DBC),
            "CANPIPE_MAX_RECORDS_PER_REQUEST": "50",
        }
    )


@pytest.fixture
def queue(settings):
    return open_queue(settings.queue_url, max_bytes=0)


@pytest.fixture
def client(settings, queue):
    with TestClient(create_app(settings, queue), base_url="http://127.0.0.1") as client:
        yield client


def queued(client, queue) -> list[dict]:
    bodies = [m.body for m in client.portal.call(functools.partial(queue.receive, 10, 0.0))]
    return [json.loads(line) for body in bodies for line in body.splitlines()]


def test_every_message_of_the_own_dbc_becomes_a_record_of_its_signals(client, queue):
    frames = [
        pack(),
        frame("BMS_StateOfCharge", can_id=SOC_ID, BMS_SOC=81.25, BMS_ChargeState=1),
        frame("BMS_CellStats", BMS_CellStatsMux=0, BMS_CellVoltageMin=3.9012, BMS_CellVoltageMax=3.9456),
        frame("BMS_CellStats", can_id="930", BMS_CellStatsMux=1, BMS_CellTempMin=-5.25, BMS_CellTempMax=30.5),
    ]
    response = client.post("/ingest/can", content=json.dumps(frames), headers=JSON)
    assert (response.status_code, response.json()) == (202, {"accepted": 4})
    lines = queued(client, queue)
    digest = "sha256:" + __import__("hashlib").sha256(DEFAULT_DBC.read_bytes()).hexdigest()
    assert [line["payload"] for line in lines] == [
        {"battery_voltage": 396.22, "battery_current": -42.3},  # -42.3, not -42.300000000000004: rounded to 0.1
        {"battery_soc": 81.25},
        {"cell_voltage_min": 3.9012, "cell_voltage_max": 3.9456},
        {"cell_temp_min": -5.25, "cell_temp_max": 30.5},
    ]
    assert [line["can_id"] for line in lines] == ["0x3A0", "0x18FF50E5", "0x3A2", "0x3A2"]
    assert {line["dbc"] for line in lines} == {digest}
    for line, sent in zip(lines, frames):
        assert (line["vehicle_id"], line["timestamp"]) == (sent["vehicle_id"], sent["timestamp"])
        stored_decoder.decode(json.dumps(line))  # what a consumer accepts


def test_ndjson_and_a_single_object_are_accepted(client, queue):
    body = "\n".join(json.dumps(pack(vehicle_id=f"EV-{i}")) for i in range(3)) + "\n\n"
    response = client.post("/ingest/can", content=body, headers=JSON | {"Content-Type": "application/x-ndjson"})
    assert (response.status_code, response.json()) == (202, {"accepted": 3})
    assert client.post("/ingest/can", content=json.dumps(pack()), headers=JSON).json() == {"accepted": 1}
    assert len(queued(client, queue)) == 4


@pytest.mark.parametrize("can_id", ["0x3A0", "0x3a0", "0X3A0", "928", 928])
def test_the_can_id_may_be_hex_decimal_or_a_number_and_is_stored_in_one_form(client, queue, can_id):
    assert client.post("/ingest/can", content=json.dumps(pack(can_id=can_id)), headers=JSON).status_code == 202
    assert [line["can_id"] for line in queued(client, queue)] == ["0x3A0"]


def test_the_extended_id_as_decimal_text_is_the_same_frame(client, queue):
    soc = frame("BMS_StateOfCharge", can_id=str(SOC_ID), BMS_SOC=50.0, BMS_ChargeState=0)
    assert client.post("/ingest/can", content=json.dumps(soc), headers=JSON).status_code == 202
    assert queued(client, queue)[0]["can_id"] == "0x18FF50E5"


def rejected(client, queue, frames, status=422) -> list[dict]:
    response = client.post("/ingest/can", content=json.dumps(frames), headers=JSON)
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) >= {"error", "detail"}
    assert queued(client, queue) == []  # all-or-nothing: the good frames of the request are not queued either
    return body.get("errors", [])


def test_a_can_id_not_in_the_dbc_is_422_naming_the_frame(client, queue):
    errors = rejected(client, queue, [pack(), pack(can_id="0x123"), pack(can_id=0x1ABCDEF)])
    assert [e["path"] for e in errors] == ["$[1].can_id", "$[2].can_id"]
    assert "0x123 is not in the DBC canpipe_bms.dbc" in errors[0]["message"]


def test_a_wrong_data_length_is_422_naming_the_frame(client, queue):
    short = pack()
    short["data"] = short["data"][:-2]
    errors = rejected(client, queue, [pack(), short, dict(pack(), data=pack()["data"] + "00")])
    assert [e["path"] for e in errors] == ["$[1].data", "$[2].data"]
    assert errors[0]["message"] == "7 data bytes; BMS_PackStatus (0x3A0) has 8"


@pytest.mark.parametrize(
    ("change", "path"),
    [
        ({"data": "zz" * 8}, "$[0].data"),
        ({"data": "123"}, "$[0].data"),
        ({"data": "00" * 65}, "$[0].data"),
        ({"can_id": "0x20000000"}, "$[0].can_id"),
        ({"can_id": 0x20000000}, "$[0].can_id"),
        ({"can_id": -1}, "$[0].can_id"),
        ({"can_id": "0x1_0"}, "$[0].can_id"),
        ({"vehicle_id": "../etc"}, "$[0].vehicle_id"),
        ({"timestamp": "2026-11-28T10:00:00"}, "$[0].timestamp"),
        ({"payload": {}}, "$[0]"),
    ],
)
def test_malformed_frames_are_422_with_the_path(client, queue, change, path):
    errors = rejected(client, queue, [dict(pack(), **change)])
    assert errors[0]["path"] == path


def test_a_key_given_twice_is_422(client, queue):
    body = json.dumps(pack())[:-1] + ', "data": "00"}'
    response = client.post("/ingest/can", content=body, headers=JSON)
    assert response.status_code == 422 and "duplicate key `data`" in response.text
    escaped = json.dumps(pack()).replace('"data"', '"d\\u0061ta"', 1)  # the exact check sees through escapes
    assert client.post("/ingest/can", content=escaped, headers=JSON).status_code == 202


def test_a_clock_out_of_the_window_is_422(client, queue):
    old = dict(pack(), timestamp="2020-01-01T00:00:00Z")
    assert rejected(client, queue, [pack(), old]) == [
        {"path": "$[1].timestamp", "message": "timestamp is more than 604800 s old"}
    ]


def test_decoded_values_out_of_the_physical_range_are_422_naming_the_value(client, queue):
    soc = frame("BMS_StateOfCharge", BMS_SOC=150.0, BMS_ChargeState=0)  # the DBC allows 655.35, the schema 100
    cells = frame("BMS_CellStats", BMS_CellStatsMux=0, BMS_CellVoltageMin=4.0, BMS_CellVoltageMax=3.9)
    errors = rejected(client, queue, [pack(), soc, cells])
    assert [e["path"] for e in errors] == ["$[1].data", "$[2].data"]
    assert "battery_soc = 150" in errors[0]["message"]
    assert "cell_voltage_min must be <= cell_voltage_max" in errors[1]["message"]


def test_a_multiplexer_value_that_selects_no_mapped_signal_is_422(client, queue):
    page = pack(can_id="0x3A2")
    page["data"] = "05" + "00" * 7
    errors = rejected(client, queue, [page])
    assert errors[0]["path"] == "$[0].data" and "none of the mapped signals" in errors[0]["message"]


def test_empty_requests_bad_keys_and_too_many_frames(client, queue):
    assert rejected(client, queue, [])[0]["message"] == "empty"
    response = client.post("/ingest/can", content=json.dumps(pack()), headers=JSON | {"X-API-Key": "fleet1:wrong"})
    assert response.status_code == 401
    response = client.post("/ingest/can", content=json.dumps(pack()), headers=JSON | {"Content-Type": "text/plain"})
    assert response.status_code == 415
    rejected(client, queue, [pack()] * 51, status=413)
    assert client.post("/ingest/can", content=b"x" * (5 << 20), headers=JSON).status_code == 413


def test_without_a_dbc_the_route_answers_503_and_queues_nothing(settings, queue):
    bare = Settings.from_env({"CANPIPE_DATA_DIR": str(settings.data_dir), "CANPIPE_API_KEYS": KEY})
    with TestClient(create_app(bare, queue), base_url="http://127.0.0.1") as client:
        response = client.post("/ingest/can", content=json.dumps(pack()), headers=JSON)
        assert response.status_code == 503 and response.json()["error"] == "no_dbc"
        assert client.post("/ingest/can", content=json.dumps(pack())).status_code == 401  # the key first
        assert queued(client, queue) == []
        metrics = client.get("/metrics").text
    assert 'canpipe_ingest_rejected_requests_total{reason="no_dbc"} 1.0' in metrics
    assert "/ingest/can" not in openapi_document(bare)["paths"]


def test_a_saturated_or_broken_queue_is_503_with_retry_after(settings, tmp_path):
    small = open_queue(settings.queue_url, max_bytes=400)  # one request's message fits, a second does not
    with TestClient(create_app(settings, small), base_url="http://127.0.0.1") as client:
        assert client.post("/ingest/can", content=json.dumps(pack()), headers=JSON).status_code == 202
        response = client.post("/ingest/can", content=json.dumps(pack()), headers=JSON)
        assert (response.status_code, response.json()["error"], response.headers["retry-after"]) == (
            503,
            "saturated",
            "1",
        )
        (tmp_path / "queue.db").unlink()
        response = client.post("/ingest/can", content=json.dumps(pack()), headers=JSON)
        assert (response.status_code, response.json()["error"], response.headers["retry-after"]) == (
            503,
            "queue_unavailable",
            "2",
        )


def test_frames_count_against_the_keys_record_rate(settings, queue):
    limited = dataclasses.replace(settings, rate_limit_records_per_s=1.0, rate_limit_burst=2.0)
    with TestClient(create_app(limited, queue), base_url="http://127.0.0.1") as client:
        assert client.post("/ingest/can", content=json.dumps([pack(), pack()]), headers=JSON).status_code == 202
        response = client.post("/ingest/can", content=json.dumps([pack(), pack()]), headers=JSON)
        assert (response.status_code, response.json()["error"]) == (429, "rate_limited")
        assert int(response.headers["retry-after"]) >= 1
        assert len(queued(client, queue)) == 2


def test_the_openapi_document_declares_the_route_with_a_dbc(settings):
    route = openapi_document(settings)["paths"]["/ingest/can"]["post"]
    frame_schema = route["requestBody"]["content"]["application/json"]["schema"]["oneOf"][0]
    assert frame_schema == {"$ref": "#/components/schemas/CanFrame"}
    assert set(route["responses"]) >= {"202", "401", "413", "422", "503"}


# --- the codec: DBC, signal maps, rounding -------------------------------------------------------------------


def test_decimals_follow_the_scale_and_offset():
    assert [decimals_of(1.0), decimals_of(0.1), decimals_of(0.002, -40), decimals_of(-0.05, 500)] == [0, 1, 3, 2]
    assert decimals_of(1 / 3) == 12 and decimals_of(float("nan"), 0.0) == 0


def test_frame_ids_parse_and_format():
    assert [frame_id(x) for x in ("0x132", "306", 306, "0x1FFFFFFF")] == [306, 306, 306, 0x1FFFFFFF]
    with pytest.raises(ValueError, match="more than 29 bits"):
        frame_id("0xFFFFFFFF")


def test_the_map_beside_the_dbc_is_the_default_and_a_copy_elsewhere_finds_it_by_name(tmp_path):
    assert shipped_map_for(DEFAULT_DBC, DEFAULT_DBC.read_bytes()) == DEFAULT_DBC.with_suffix(".toml")
    copy = tmp_path / "canpipe_bms.dbc"
    shutil.copy(DEFAULT_DBC, copy)
    codec = CanCodec.load(copy)
    assert {s.canonical for signals in codec.by_frame.values() for s in signals} == {
        "battery_soc", "battery_voltage", "battery_current",
        "cell_voltage_min", "cell_voltage_max", "cell_temp_min", "cell_temp_max",
    }  # fmt: skip
    other = tmp_path / "mine.dbc"
    shutil.copy(DEFAULT_DBC, other)
    with pytest.raises(ConfigError, match="CANPIPE_SIGNAL_MAP: no signal map is shipped for"):
        CanCodec.load(other)


@pytest.mark.skipif(not MODEL3.is_file(), reason=f"the public Model3CAN.dbc is not at {MODEL3} (../shared absent)")
def test_the_model3_map_is_found_by_the_dbcs_hash_under_any_name(tmp_path):
    renamed = tmp_path / "tesla.dbc"
    shutil.copy(MODEL3, renamed)
    codec = CanCodec.load(renamed)
    assert sorted(codec.by_frame) == [0x132, 0x292, 0x332]
    assert {s.canonical: s.decimals for s in codec.by_frame[0x332]} == {
        "cell_temp_min": 1, "cell_temp_max": 1, "cell_voltage_min": 3, "cell_voltage_max": 3,
    }  # fmt: skip


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("not toml [", "is not valid TOML"),
        ("[other]\nx = 1", "has no [signals] table"),
        ('[signals]\nbattery_power = "BMS_PackStatus.BMS_PackVoltage"', "'battery_power' is not a payload field"),
        ('[signals]\nbattery_soc = "BMS_SOC"', 'is not "MessageName.SignalName"'),
        ('[signals]\nbattery_soc = "NoSuch.BMS_SOC"', "no message 'NoSuch'"),
        ('[signals]\nbattery_soc = "BMS_StateOfCharge.NoSuch"', "has no signal 'NoSuch'"),
    ],
)
def test_a_bad_signal_map_is_a_config_error_naming_the_entry(tmp_path, text, message):
    path = tmp_path / "map.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match="CANPIPE_SIGNAL_MAP") as error:
        CanCodec.load(DEFAULT_DBC, path)
    assert message in str(error.value)


def test_a_missing_or_unparsable_dbc_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="CANPIPE_DBC: cannot read"):
        CanCodec.load(tmp_path / "none.dbc")
    with pytest.raises(ConfigError, match="CANPIPE_SIGNAL_MAP: cannot read"):
        CanCodec.load(DEFAULT_DBC, tmp_path / "none.toml")
    broken = tmp_path / "broken.dbc"
    broken.write_text("BO_ this is not a DBC")
    with pytest.raises(ConfigError, match="is not a database cantools can read"):
        CanCodec.load(broken, DEFAULT_DBC.with_suffix(".toml"))


def test_serve_refuses_to_start_on_an_unreadable_dbc(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("CANPIPE_DBC", str(tmp_path / "gone.dbc"))
    monkeypatch.setenv("CANPIPE_DATA_DIR", str(tmp_path))
    monkeypatch.delenv("CANPIPE_QUEUE_URL", raising=False)
    assert main(["serve", "--insecure-no-auth", "--port", str(free_port()), "--log-format", "text"]) == 1
    assert f"CANPIPE_DBC: cannot read {tmp_path / 'gone.dbc'}" in caplog.text


def test_the_stored_dbc_field_is_checked_by_the_consumers_schema():
    line = {
        "timestamp": now(),
        "vehicle_id": "EV-1",
        "can_id": "0x3A0",
        "payload": {"battery_soc": 50.0},
        "ingest_received_at": now(),
    }
    assert stored_decoder.decode(json.dumps(line)).dbc is None
    with pytest.raises(msgspec.ValidationError, match=r"\$\.dbc"):
        stored_decoder.decode(json.dumps(line | {"dbc": "md5:abc"}))


def test_ndjson_errors_name_the_record_and_the_line(client, queue):
    lines = [json.dumps(pack()), json.dumps(dict(pack(), data="zz")), json.dumps(dict(pack(), can_id="0x7"))]
    ndjson = JSON | {"Content-Type": "application/x-ndjson"}
    response = client.post("/ingest/can", content="\n".join(lines), headers=ndjson)
    assert response.status_code == 422
    assert [e["path"] for e in response.json()["errors"]] == ["$[1].data"]
    response = client.post("/ingest/can", content=lines[0] + "\n{not json", headers=ndjson)
    assert response.status_code == 422 and "line 2" in response.json()["detail"]
    assert client.post("/ingest/can", content=b'{"data": "\xff"}', headers=JSON).status_code == 422
    assert client.post("/ingest/can", content=b"[" * 100_000, headers=JSON).status_code == 422
    assert queued(client, queue) == []


def test_a_message_the_map_leaves_out_is_422_saying_so(settings, queue, tmp_path):
    partial = tmp_path / "soc-only.toml"
    partial.write_text('[signals]\nbattery_soc = "BMS_StateOfCharge.BMS_SOC"\n')
    narrow = dataclasses.replace(settings, signal_map=str(partial))
    with TestClient(create_app(narrow, queue), base_url="http://127.0.0.1") as client:
        response = client.post("/ingest/can", content=json.dumps(pack()), headers=JSON)
        assert response.status_code == 422
        assert "the signal map maps no signal of BMS_PackStatus" in response.json()["errors"][0]["message"]


def test_an_ieee_float_signal_is_stored_as_decoded_not_rounded_to_its_unit_scale(tmp_path, queue):
    dbc = tmp_path / "float.dbc"
    dbc.write_text(
        'VERSION ""\n\nNS_ :\n\nBS_:\n\nBU_: BMS\n\n'
        'BO_ 256 PackFloat: 4 BMS\n SG_ Voltage : 0|32@1- (1,0) [0|1500] "V" Vector__XXX\n\n'
        "SIG_VALTYPE_ 256 Voltage : 1;\n"
    )
    (tmp_path / "float.toml").write_text('[signals]\nbattery_voltage = "PackFloat.Voltage"\n')
    settings = Settings.from_env({"CANPIPE_DATA_DIR": str(tmp_path), "CANPIPE_API_KEYS": KEY, "CANPIPE_DBC": str(dbc)})
    data = cantools.database.load_file(dbc).get_message_by_name("PackFloat").encode({"Voltage": 396.25}).hex()
    frame = {"timestamp": now(), "vehicle_id": "EV-1", "can_id": "0x100", "data": data}
    with TestClient(create_app(settings, queue), base_url="http://127.0.0.1") as client:
        assert client.post("/ingest/can", content=json.dumps(frame), headers=JSON).status_code == 202
        assert queued(client, queue)[0]["payload"] == {"battery_voltage": 396.25}


def test_a_gzip_body_is_decoded_and_an_unknown_coding_is_415(client, queue):
    import gzip

    body = gzip.compress(json.dumps([pack(), pack(vehicle_id="EV-2")]).encode())
    response = client.post("/ingest/can", content=body, headers=JSON | {"Content-Encoding": "gzip"})
    assert (response.status_code, response.json()) == (202, {"accepted": 2})
    response = client.post("/ingest/can", content=b"x", headers=JSON | {"Content-Encoding": "br"})
    assert response.status_code == 415 and "Content-Encoding" in response.json()["detail"]
    response = client.post("/ingest/can", content=b"not gzip", headers=JSON | {"Content-Encoding": "gzip"})
    assert response.status_code == 400
    assert len(queued(client, queue)) == 2
