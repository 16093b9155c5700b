"""canpipe replay against a live pipeline (Granian receiver, a consumer process, the files): candump, ASC and
BLF logs written with python-can, every frame's signals found on disk, skipped frames counted, and a second
replay of the same log leaving the aggregates unchanged."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import can
import cantools
import pytest
from canpipe_testing import API_KEY, on_disk, wait_for

from engine import aggregator
from engine.can.codec import DEFAULT_DBC, CanCodec
from engine.can.replay import Replayer, ReplaySummary, Screen, describe, vehicle_id_for
from engine.can.simulate import FrameEncoder
from engine.cli import main
from engine.storage import raw_hours

pytestmark = pytest.mark.slow

DB = cantools.database.load_file(DEFAULT_DBC)
SAMPLE = {
    "battery_soc": 64.5,
    "battery_voltage": 388.4,
    "battery_current": 55.5,
    "cell_voltage_min": 3.801,
    "cell_voltage_max": 3.8123,
    "cell_temp_min": 21.5,
    "cell_temp_max": 24.25,
}


def aggregator_reads_dbc_lines() -> bool:
    """Whether both stored-line scanners take a line with the optional ``dbc`` field (being taught to the
    aggregator in parallel with the CAN path: until then the aggregate checks skip, saying so)."""
    from engine.kernels import _jsonl_py, jsonl

    line = (
        b'{"timestamp":"2026-01-01T00:00:00Z","vehicle_id":"V","can_id":"0x1","payload":{"battery_soc":1.0},'
        b'"ingest_received_at":"2026-01-01T00:00:00Z","dbc":"sha256:' + b"0" * 64 + b'"}\n'
    )
    return not _jsonl_py.parse_lines(line, {}).bad_lines and not jsonl.parse_lines(line, {}).bad_lines


NO_DBC_FIELD = "the aggregator's scanners do not read the stored dbc field yet (needs the scanner change)"


def bus_frames(start_s: float, ticks: int = 3, spacing_s: float = 0.02) -> list[can.Message]:
    """Every mapped page of the own DBC per tick, plus noise a real bus log holds: an id the DBC lacks and an
    error frame."""
    encoder = FrameEncoder(CanCodec.load(DEFAULT_DBC))
    frames = []
    for tick in range(ticks):
        values = SAMPLE | {"battery_soc": SAMPLE["battery_soc"] - tick * 0.25}
        for frame_id, data in encoder.frames(values):
            frames.append(
                can.Message(
                    timestamp=start_s + len(frames) * spacing_s,
                    arbitration_id=frame_id,
                    is_extended_id=frame_id > 0x7FF,
                    data=data,
                )
            )
    frames.append(can.Message(timestamp=start_s + len(frames) * spacing_s, arbitration_id=0x5A5, data=bytes(8)))
    frames.append(
        can.Message(timestamp=start_s + len(frames) * spacing_s, is_error_frame=True, arbitration_id=0x4, data=b"")
    )
    return frames


def write_log(path: Path, frames: list[can.Message]) -> Path:
    writer = {".log": can.CanutilsLogWriter, ".asc": can.ASCWriter, ".blf": can.BLFWriter}[path.suffix](str(path))
    for frame in frames:
        writer.on_message_received(frame)
    writer.stop()
    return path


def assert_on_disk(data_dir: Path, vehicle_id: str, frames: list[can.Message]) -> None:
    """Every frame the DBC knows has a record of its vehicle, id and decoded signals."""
    stored = [r for r in on_disk(data_dir) if r["vehicle_id"] == vehicle_id]
    codec = CanCodec.load(DEFAULT_DBC)
    known = [f for f in frames if not f.is_error_frame and f.arbitration_id in codec.by_frame]
    assert len(stored) == len(known)
    records = sorted(stored, key=lambda r: r["timestamp"])
    for frame, record in zip(sorted(known, key=lambda f: f.timestamp), records):
        assert record["can_id"] == f"0x{frame.arbitration_id:X}"
        decoded = DB.get_message_by_frame_id(frame.arbitration_id).decode(bytes(frame.data))
        for signal in codec.by_frame[frame.arbitration_id]:
            if signal.signal in decoded:
                assert record["payload"][signal.canonical] == pytest.approx(decoded[signal.signal], abs=signal.scale)


def aggregates(data_dir: Path) -> dict[str, dict]:
    """Per hour and vehicle, the aggregate without the count of copies dropped."""
    out = {}
    for hour in raw_hours(data_dir / "raw"):
        result = aggregator.aggregate_hour(data_dir, hour.start)
        for vehicle in json.loads(Path(result.path).read_text())["vehicles"]:
            vehicle.pop("duplicates_dropped")
            out[f"{hour}/{vehicle.pop('vehicle_id')}"] = vehicle
    return out


def test_a_candump_log_replayed_twice_lands_once_in_the_aggregates(serve, start, env, data_dir, tmp_path):
    url = serve(env | {"CANPIPE_DBC": str(DEFAULT_DBC)})
    start(["consume", "--workers", "1"], env)
    frames = bus_frames(time.time() - 60)
    log = write_log(tmp_path / "drive.log", frames)
    command = ["replay", str(log), "--dbc", str(DEFAULT_DBC), "--url", url, "--speed", "max", "--vehicle-id", "EV-R1"]
    first = start(command, env | {"CANPIPE_API_KEY": API_KEY})
    assert first.popen.wait(60) == 0, first.output()
    sent = len(frames) - 2
    assert f"{len(frames)} frames read, {sent} sent, {sent} accepted, 0 failed, 2 skipped" in first.output()
    assert "skipped 1 frames: CAN id not in the DBC" in first.output()
    assert "skipped 1 frames: error frame" in first.output()
    assert "timestamps: the log's own" in first.output()
    wait_for(lambda: len(on_disk(data_dir)) == sent, 60, "every replayed frame on disk")
    assert_on_disk(data_dir, "EV-R1", frames)
    if not aggregator_reads_dbc_lines():
        pytest.skip(NO_DBC_FIELD)
    before = aggregates(data_dir)
    assert sum(v["message_count"] for v in before.values()) == sent
    second = start(command, env | {"CANPIPE_API_KEY": API_KEY})
    assert second.popen.wait(60) == 0, second.output()
    wait_for(lambda: len(on_disk(data_dir)) == 2 * sent, 60, "the second replay on disk")
    assert aggregates(data_dir) == before  # the same (vehicle, can_id, timestamp) keys: dropped as copies


@pytest.mark.parametrize("suffix", [".asc", ".blf"])
def test_an_old_log_is_rebased_to_now_and_paced_by_its_timestamps(serve, start, env, data_dir, tmp_path, suffix):
    url = serve(env | {"CANPIPE_DBC": str(DEFAULT_DBC)})
    start(["consume", "--workers", "1"], env)
    frames = bus_frames(1_577_836_800.0, spacing_s=0.04)  # 2020-01-01: outside the receiver's clock window
    log = write_log(tmp_path / f"bench run 7{suffix}", frames)
    replayer = Replayer(log, CanCodec.load(DEFAULT_DBC), url, api_key=API_KEY, batch=5)
    assert replayer.vehicle_id == "bench-run-7"
    started = time.time()
    summary = asyncio.run(replayer.run())
    span_s = frames[-3].timestamp - frames[0].timestamp
    assert summary.elapsed_s >= span_s * 0.95  # paced: the log's span at speed 1, not as fast as possible
    assert summary.accepted == summary.sent == len(frames) - 2 and not summary.failed
    assert summary.timestamps.startswith("re-based (the log's own are outside the receiver's clock window)")
    wait_for(lambda: len(on_disk(data_dir)) == summary.sent, 60, "every replayed frame on disk")
    assert_on_disk(data_dir, "bench-run-7", frames)
    stamps = [r["timestamp"] for r in on_disk(data_dir)]
    assert min(stamps) >= time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(started - 1))


def test_a_faster_rebased_replay_ends_the_log_now_and_failures_set_the_exit_status(serve, env, tmp_path):
    url = serve(env | {"CANPIPE_DBC": str(DEFAULT_DBC)})
    log = write_log(tmp_path / "fast.blf", bus_frames(time.time() - 3600, spacing_s=10.0))
    codec = CanCodec.load(DEFAULT_DBC)
    summary = asyncio.run(Replayer(log, codec, url, api_key=API_KEY, speed=50.0, timestamps="now").run())
    assert summary.timestamps.startswith("re-based (asked for): the log's last frame at")
    assert summary.accepted == summary.sent and not summary.failed  # none stamped ahead of the receiver's clock
    wrong = asyncio.run(Replayer(log, codec, url, api_key="test:wrong", speed=None).run())
    assert wrong.accepted == 0 and list(wrong.failed) == [
        'HTTP 401: {"error":"unauthorized","detail":"missing or invalid X-API-Key"}'
    ]
    assert "FAILED 12 frames: HTTP 401" in describe(wrong)


def test_replay_refuses_a_missing_log_or_dbc(tmp_path, monkeypatch, caplog):
    monkeypatch.delenv("CANPIPE_DBC", raising=False)
    log = write_log(tmp_path / "a.log", bus_frames(time.time()))
    assert main(["replay", str(tmp_path / "none.log"), "--dbc", str(DEFAULT_DBC), "--log-format", "text"]) == 1
    assert "replay: no log file" in caplog.text
    assert main(["replay", str(log), "--log-format", "text"]) == 1
    assert "replay needs a DBC" in caplog.text
    with pytest.raises(SystemExit):
        main(["replay", str(log), "--speed", "fast"])
    with pytest.raises(ValueError, match="timestamps must be one of"):
        Replayer(log, CanCodec.load(DEFAULT_DBC), "http://127.0.0.1:9", timestamps="later")


def test_vehicle_ids_from_file_names_and_an_empty_summary():
    assert vehicle_id_for(Path("/x/drive 2024-05-01.blf")) == "drive-2024-05-01"
    assert vehicle_id_for(Path("___.log")) == "replay"
    assert describe(ReplaySummary("empty.log")).startswith("replay empty.log: 0 frames read, 0 sent")


def test_the_screen_skips_what_the_receiver_would_refuse(tmp_path):
    partial = tmp_path / "map.toml"
    partial.write_text(
        "[signals]\n"
        'battery_soc = "BMS_StateOfCharge.BMS_SOC"\n'
        'cell_temp_min = "BMS_CellStats.BMS_CellTempMin"\n'
        'cell_temp_max = "BMS_CellStats.BMS_CellTempMax"\n'
    )
    screen = Screen(CanCodec.load(DEFAULT_DBC, partial))
    soc = DB.get_message_by_name("BMS_StateOfCharge")
    cells = DB.get_message_by_name("BMS_CellStats")
    frames = [
        can.Message(arbitration_id=soc.frame_id, data=soc.encode({"BMS_SOC": 50.0, "BMS_ChargeState": 0})),
        can.Message(
            arbitration_id=soc.frame_id, data=soc.encode({"BMS_SOC": 150.0, "BMS_ChargeState": 0}, strict=False)
        ),
        can.Message(arbitration_id=soc.frame_id, is_remote_frame=True, dlc=4),
        can.Message(arbitration_id=0x3A0, is_extended_id=False, data=bytes(8)),
        can.Message(arbitration_id=soc.frame_id, data=bytes(3)),
        can.Message(arbitration_id=cells.frame_id, is_extended_id=False, data=bytes(8)),  # page 0: voltages
    ]
    assert screen.reasons(frames) == [
        None,
        "decoded value outside the physical ranges",
        "remote frame",
        "message not in the signal map",
        "data length differs from the DBC",
        "multiplexer page without a mapped signal",
    ]


def test_a_receiver_that_never_answers_fails_the_frames_after_the_retries(tmp_path):
    from canpipe_testing import free_port

    log = write_log(tmp_path / "a.log", bus_frames(time.time(), ticks=1))
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    summary = asyncio.run(Replayer(log, CanCodec.load(DEFAULT_DBC), url, speed=None, max_attempts=2).run())
    ((cause, frames),) = summary.failed.items()
    assert frames == summary.sent == 4 and "ClientConnectorError" in cause and "(after 2 attempts)" in cause
    assert summary.retries == 1
