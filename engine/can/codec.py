"""A DBC with its signal map: which DBC signal carries which canonical payload field, decoded and rounded.

A signal map is a TOML file with a ``[signals]`` table of ``canonical_name = "MessageName.SignalName"``
(``CANPIPE_SIGNAL_MAP``). Without one, the map shipped for the DBC is used: ``<dbc stem>.toml`` beside the
DBC, else a map in ``engine/can/data`` whose ``[dbc]`` table names the DBC's SHA-256 or its file name.
The receiver (``/ingest/can``), ``canpipe replay`` and ``canpipe simulate --can`` all load one ``CanCodec``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import tomllib
from decimal import Decimal
from pathlib import Path
from typing import Any

import numpy as np

from engine.errors import ConfigError
from engine.schema import SIGNALS

DATA_DIR = Path(__file__).resolve().parent / "data"
DEFAULT_DBC = DATA_DIR / "canpipe_bms.dbc"
MAX_DECIMALS = 12


@dataclasses.dataclass(frozen=True)
class MappedSignal:
    """One canonical field and the DBC signal that carries it; values are rounded to ``decimals`` places, the
    resolution of the signal's scale and offset (``0.1 * 3`` is stored as ``0.3``, not ``0.30000000000000004``)."""

    canonical: str
    message: str
    signal: str
    frame_id: int
    scale: float
    decimals: int | None  # None: an IEEE float signal, stored as decoded
    multiplexer_ids: tuple[int, ...] | None  # the mux values that select it; None: always present


def decimals_of(*numbers: float) -> int:
    """Decimal places needed to write every one of ``numbers`` exactly (at most ``MAX_DECIMALS``)."""
    places = 0
    for number in numbers:
        if number and math.isfinite(number):
            exponent = Decimal(repr(float(number))).normalize().as_tuple().exponent
            places = max(places, -int(exponent))
    return min(places, MAX_DECIMALS)


def shipped_map_for(dbc_path: Path, content: bytes) -> Path | None:
    """The map shipped for a DBC: ``<stem>.toml`` beside it, else a shipped map naming its hash or file name."""
    beside = dbc_path.with_suffix(".toml")
    if beside.is_file():
        return beside
    digest = hashlib.sha256(content).hexdigest()
    by_name = None
    for candidate in sorted(DATA_DIR.glob("*.toml")):
        dbc = _read_toml(candidate, "the shipped signal map").get("dbc", {})
        if digest in dbc.get("sha256", ()):
            return candidate
        if by_name is None and dbc_path.name in dbc.get("files", ()):
            by_name = candidate
    return by_name


def _read_toml(path: Path, what: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as file:
            return tomllib.load(file)
    except OSError as exc:
        raise ConfigError(f"{what}: cannot read {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{what}: {path} is not valid TOML: {exc}") from None


def read_signal_map(path: Path) -> dict[str, tuple[str, str]]:
    """``canonical -> (message, signal)`` from a map file; a ConfigError names the bad entry."""
    what = "CANPIPE_SIGNAL_MAP"
    table = _read_toml(path, what).get("signals")
    if not isinstance(table, dict) or not table:
        raise ConfigError(f'{what}: {path} has no [signals] table of canonical_name = "Message.Signal"')
    mapping = {}
    for canonical, target in table.items():
        if canonical not in SIGNALS:
            raise ConfigError(f"{what}: {path}: {canonical!r} is not a payload field (one of {', '.join(SIGNALS)})")
        message, dot, signal = target.partition(".") if isinstance(target, str) else ("", "", "")
        if not dot or not message or not signal:
            raise ConfigError(f'{what}: {path}: {canonical} = {target!r} is not "MessageName.SignalName"')
        mapping[canonical] = (message, signal)
    return mapping


def _load_database(path: Path, content: bytes) -> Any:
    try:
        import cantools
    except ImportError:  # pragma: no cover - the [can] extra is installed wherever the CAN path is tested
        raise ConfigError("CANPIPE_DBC needs cantools: pip install 'canpipe[can]'") from None
    try:
        # not strict: real DBCs (Model3CAN.dbc among them) hold signals that overlap or overrun their message,
        # which cantools refuses by default; cp1252, as cantools reads DBC files
        encoding = "cp1252" if _format(path) in ("dbc", None) else "utf-8"
        text = content.decode(encoding, "replace")
        return cantools.database.load_string(text, database_format=_format(path), strict=False)
    except Exception as exc:  # cantools raises many kinds (ParseError, ValueError, KeyError...) on a bad file
        raise ConfigError(f"CANPIPE_DBC: {path} is not a database cantools can read: {exc}") from None


def _format(path: Path) -> str | None:
    return {".dbc": "dbc", ".kcd": "kcd", ".sym": "sym", ".arxml": "arxml"}.get(path.suffix.lower())


class CanCodec:
    """A DBC, its signal map and a fast decoder (``engine.can.decode.FrameDecoder``).

    ``dbc_ref`` (``sha256:<hex>`` of the DBC's bytes) is stored with every record decoded with it, so a record
    can be decoded again later with the same file.
    """

    def __init__(self, dbc_path: Path, content: bytes, database: Any, mapping: dict[str, tuple[str, str]]) -> None:
        from engine.can.decode import FrameDecoder

        self.dbc_path = dbc_path
        self.database = database
        self.content_hash = hashlib.sha256(content).hexdigest()
        self.dbc_ref = f"sha256:{self.content_hash}"
        self.decoder = FrameDecoder(database)
        by_frame: dict[int, list[MappedSignal]] = {}
        for canonical, (message_name, signal_name) in mapping.items():
            try:
                message = database.get_message_by_name(message_name)
            except KeyError:
                raise ConfigError(
                    f"CANPIPE_SIGNAL_MAP: {canonical}: no message {message_name!r} in {dbc_path}"
                ) from None
            try:
                signal = message.get_signal_by_name(signal_name)
            except KeyError:
                raise ConfigError(
                    f"CANPIPE_SIGNAL_MAP: {canonical}: message {message_name} has no signal {signal_name!r}"
                ) from None
            ids = signal.multiplexer_ids
            by_frame.setdefault(message.frame_id, []).append(
                MappedSignal(
                    canonical,
                    message_name,
                    signal_name,
                    message.frame_id,
                    float(signal.scale),
                    None if signal.is_float else decimals_of(float(signal.scale), float(signal.offset)),
                    None if ids is None else tuple(ids),
                )
            )
        # in the payload's field order, so a record's keys come out as /ingest's encoder writes them
        self.by_frame = {
            frame_id: tuple(sorted(signals, key=lambda s: SIGNALS.index(s.canonical)))
            for frame_id, signals in by_frame.items()
        }

    @classmethod
    def load(cls, dbc: str | Path, signal_map: str | Path | None = None) -> CanCodec:
        """Read the DBC and the map (``signal_map``, else the one shipped for the DBC); ConfigError names what
        is missing or wrong: an unreadable file, a DBC cantools cannot parse, a map entry the DBC lacks."""
        dbc_path = Path(dbc)
        try:
            content = dbc_path.read_bytes()
        except OSError as exc:
            raise ConfigError(f"CANPIPE_DBC: cannot read {dbc_path}: {exc.strerror or exc}") from None
        if signal_map:
            map_path: Path | None = Path(signal_map)
        else:
            map_path = shipped_map_for(dbc_path, content)
            if map_path is None:
                raise ConfigError(f"CANPIPE_SIGNAL_MAP: no signal map is shipped for {dbc_path}; set one")
        assert map_path is not None
        mapping = read_signal_map(map_path)
        return cls(dbc_path, content, _load_database(dbc_path, content), mapping)

    def message(self, frame_id: int) -> Any:
        """The cantools message of ``frame_id``; KeyError if the DBC has none."""
        return self.database.get_message_by_frame_id(frame_id)

    def columns(self, frame_id: int, datas: list[bytes]) -> dict[str, np.ndarray]:
        """The canonical fields of a frame id's message for every frame, rounded, NaN where a frame does not
        hold the field (its multiplexer selects another page). Raises the decoder's ``UnknownFrame`` /
        ``BadLength``."""
        decoded = self.decoder.decode(frame_id, datas)
        return {
            s.canonical: decoded[s.signal] if s.decimals is None else np.round(decoded[s.signal], s.decimals)
            for s in self.by_frame.get(frame_id, ())
        }

    def payloads(self, frame_id: int, datas: list[bytes]) -> list[dict[str, float]]:
        """Per frame, its canonical fields and rounded values: only the signals the frame holds."""
        columns = {name: values.tolist() for name, values in self.columns(frame_id, datas).items()}
        return [{name: v[j] for name, v in columns.items() if v[j] == v[j]} for j in range(len(datas))]
