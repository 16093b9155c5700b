"""The fast CAN decoder against cantools: random DBC messages, the project's own DBC and the public Model 3 DBC.

Both kernels (compiled and numpy twin) run every check. The oracle is cantools'
``decode(data, decode_choices=False, scaling=True)``: where it gives a value ours must be equal, where it gives
none (a multiplexer page the frame does not select) ours is NaN.
"""

from __future__ import annotations

import hashlib
import math
import random
from pathlib import Path

import cantools
import numpy as np
import pytest
from cantools.database.can import Database, Message, Signal
from cantools.database.conversion import BaseConversion
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.can.decode import BadLength, FrameDecoder, UnknownFrame
from engine.kernels import candecode

ROOT = Path(__file__).resolve().parent.parent
MODEL3 = ROOT.parent / "shared" / "data" / "dbc" / "Model3CAN.dbc"
OWN_DBC = ROOT / "engine" / "can" / "data" / "canpipe_bms.dbc"
FD_LENGTHS = [0, 1, 2, 3, 4, 5, 6, 7, 8, 12, 16, 20, 24, 32, 48, 64]

IMPLEMENTATIONS = ["py"] + (["c"] if candecode.IMPLEMENTATION == "c" else [])


@pytest.fixture(params=IMPLEMENTATIONS)
def implementation(request) -> str:
    return request.param


# --- the oracle ------------------------------------------------------------------------------------------------


def bit_field(signal, size: int) -> tuple[int, str]:
    """(shift, byte order) of a signal in its frame read as one integer: independent of the decoder's plan."""
    if signal.byte_order == "little_endian":
        return signal.start, "little"
    first = (signal.start // 8) * 8 + 7 - signal.start % 8  # network bit number of its most significant bit
    return size * 8 - first - signal.length, "big"


def with_multiplexer(message, data: bytes, value: int) -> bytes:
    """``data`` with its multiplexer's bits set to ``value``."""
    mux = next(signal for signal in message.signals if signal.is_multiplexer)
    shift, order = bit_field(mux, len(data))
    mask = ((1 << mux.length) - 1) << shift
    return ((int.from_bytes(data, order) & ~mask) | (value << shift)).to_bytes(len(data), order)


def expected_values(message, data: bytes) -> dict:
    """cantools' decode; for a frame whose multiplexer value selects no page (cantools refuses the frame): the
    multiplexer's value and the signals outside every page as cantools decodes them once a page is selected."""
    try:
        return message.decode(data, decode_choices=False, scaling=True)
    except cantools.database.DecodeError as exc:
        if "expected multiplexer id" not in str(exc):
            raise
    mux = next(signal for signal in message.signals if signal.is_multiplexer)
    shift, order = bit_field(mux, len(data))
    raw = (int.from_bytes(data, order) >> shift) & ((1 << mux.length) - 1)
    page = min(i for signal in message.signals for i in signal.multiplexer_ids or ())
    selected = message.decode(with_multiplexer(message, data, page), decode_choices=False, scaling=True)
    expected = {s.name: selected[s.name] for s in message.signals if s.multiplexer_ids is None and s.name in selected}
    expected[mux.name] = mux.conversion.raw_to_scaled(raw, False)
    return expected


def assert_as_cantools(message, decoded: dict[str, np.ndarray], frames: list[bytes], what: str) -> None:
    """Every signal of every frame as cantools decodes it: equal where cantools has a value, NaN where not."""
    assert list(decoded) == [signal.name for signal in message.signals], what
    for index, data in enumerate(frames):
        expected = expected_values(message, data)
        for signal in message.signals:
            got = float(decoded[signal.name][index])
            where = f"{what}: {message.name}.{signal.name} frame {index} {data.hex()}"
            if signal.name not in expected:
                assert math.isnan(got), f"{where}: cantools has no value, we decoded {got}"
                continue
            want = expected[signal.name]
            if isinstance(want, int) and abs(want) > 2**53:
                # cantools computes in Python integers and rounds once; ours rounds the raw value first
                assert got == pytest.approx(want, rel=2**-50), where
            elif math.isnan(want):
                assert math.isnan(got), where
            else:
                assert got == float(want), f"{where}: {got!r} != cantools {want!r}"


# --- random messages -----------------------------------------------------------------------------------------


def covered_bits(start: int, length: int, big_endian: bool) -> set[int]:
    """The DBC (sawtooth) bit numbers a signal covers."""
    if not big_endian:
        return set(range(start, start + length))
    first = (start // 8) * 8 + 7 - start % 8
    return {(p // 8) * 8 + 7 - p % 8 for p in range(first, first + length)}


@st.composite
def signals_in(draw, size: int, taken: set[int], name: str, mux: bool = False) -> Signal | None:
    """A random signal in the free bits of a ``size``-byte frame (marked taken), or None if the draw collides."""
    if size == 0:
        return None
    is_float = not mux and draw(st.integers(0, 7)) == 0
    if is_float:
        length = draw(st.sampled_from([n for n in (32, 64) if n <= size * 8] or [0]))
        if not length:
            return None
    else:
        length = draw(st.integers(1, min(8 if mux else 64, size * 8)))
    big_endian = draw(st.booleans())
    position = draw(st.integers(0, size * 8 - length))  # first bit, numbered in its byte order
    start = (position // 8) * 8 + 7 - position % 8 if big_endian else position
    bits = covered_bits(start, length, big_endian)
    if bits & taken:
        return None
    taken |= bits
    if mux:
        scale, offset = 1, 0
    else:
        scale = draw(st.sampled_from([1, 2, 0.1, 0.5, 0.25, 0.01, 0.001, 3.7, -1, 1e-6]))
        offset = draw(st.sampled_from([0, 1, -40, 0.5, -1000.25, 273.15, 1e6]))
    choices = {0: "off", 1: "on"} if not mux and draw(st.integers(0, 4)) == 0 else None
    return Signal(
        name,
        start,
        length,
        "big_endian" if big_endian else "little_endian",
        is_signed=not mux and not is_float and draw(st.booleans()),
        conversion=BaseConversion.factory(scale=scale, offset=offset, choices=choices, is_float=is_float),
        is_multiplexer=mux,
    )


@st.composite
def messages(draw) -> Message:
    """A random message: standard or extended id, classic or FD length, 0 to 8 signals, maybe multiplexed
    (pages of one or two multiplexer values, the signals of one page free to overlap those of another)."""
    extended = draw(st.booleans())
    frame_id = draw(st.integers(0, 0x1FFFFFFF if extended else 0x7FF))
    size = draw(st.sampled_from(FD_LENGTHS))
    root: set[int] = set()
    mux = draw(signals_in(size, root, "Mux", mux=True)) if draw(st.booleans()) else None
    signals = [mux] if mux else []
    pages: dict[tuple[int, ...], set[int]] = {}
    for number in range(draw(st.integers(0, 8))):
        ids = None
        taken = root
        if mux is not None and draw(st.booleans()):
            top = min(3, (1 << mux.length) - 1)
            ids = tuple(sorted(set(draw(st.lists(st.integers(0, top), min_size=1, max_size=2)))))
            if any(set(ids) & set(other) for other in pages if other != ids):
                continue  # a multiplexer value selects one page
            taken = pages.setdefault(ids, set(root))
        signal = draw(signals_in(size, taken, f"S{number}"))
        if signal is None:
            continue
        if ids is not None:
            signal.multiplexer_ids = list(ids)
            signal.multiplexer_signal = "Mux"
        elif pages:
            continue  # a root signal after pages could collide with them
        signals.append(signal)
    return Message(frame_id, "M", size, signals, is_extended_frame=extended, is_fd=size > 8)


def random_raw(signal: Signal, rng: random.Random) -> int | float:
    if signal.is_float:
        value = rng.choice([0.0, -0.0, 1.5, -2.25, 3.0e38, 1e-40, rng.uniform(-1e6, 1e6)])
        return float(np.float32(value)) if signal.length == 32 else value
    raw = rng.choice([0, 1, (1 << signal.length) - 1, 1 << (signal.length - 1), rng.getrandbits(signal.length)])
    if signal.is_signed and raw >= 1 << (signal.length - 1):
        raw -= 1 << signal.length
    return raw


def encoded_frames(message: Message, rng: random.Random, count: int) -> list[bytes]:
    """Frames cantools encodes from random raw values, one multiplexer page each."""
    pages = sorted({i for signal in message.signals for i in signal.multiplexer_ids or ()})
    frames = []
    for _ in range(count):
        values: dict[str, int | float] = {}
        page = rng.choice(pages) if pages else None
        for signal in message.signals:
            if signal.is_multiplexer:
                values[signal.name] = page if page is not None else random_raw(signal, rng)
            elif signal.multiplexer_ids is None or page in signal.multiplexer_ids:
                values[signal.name] = random_raw(signal, rng)
        frames.append(message.encode(values, scaling=False, padding=rng.random() < 0.5, strict=False))
    return frames


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(message=messages(), seed=st.integers(0, 2**32 - 1))
def test_random_messages_decode_as_cantools(message, seed):
    rng = random.Random(seed)
    frames = encoded_frames(message, rng, 8) + [rng.randbytes(message.length) for _ in range(8)]
    db = Database(messages=[message])
    db.refresh()
    for implementation in IMPLEMENTATIONS:
        decoded = FrameDecoder(db, implementation=implementation).decode(message.frame_id, frames)
        assert_as_cantools(message, decoded, frames, f"{implementation} seed={seed}")


# --- real DBCs -----------------------------------------------------------------------------------------------


def random_frames(message, rng: random.Random, count: int) -> list[bytes]:
    """Random bytes; for a multiplexed message most frames select one of its pages."""
    pages = sorted({i for signal in message.signals for i in signal.multiplexer_ids or ()})
    frames = [rng.randbytes(message.length) for _ in range(count)]
    if pages and any(signal.is_multiplexer for signal in message.signals):
        frames = [
            with_multiplexer(message, data, rng.choice(pages)) if i % 4 else data for i, data in enumerate(frames)
        ]
    return frames


def test_own_dbc_every_message(implementation):
    decoder = FrameDecoder.from_file(OWN_DBC)
    rng = random.Random(12)
    for message in decoder.db.messages:
        frames = random_frames(message, rng, 64)
        assert_as_cantools(message, decoder.decode(message.frame_id, frames), frames, implementation)


@pytest.mark.skipif(not MODEL3.is_file(), reason=f"the public Model3CAN.dbc is not at {MODEL3} (../shared absent)")
def test_model3_every_signal_of_every_message(implementation):
    decoder = FrameDecoder(cantools.database.load_file(MODEL3, strict=False), implementation=implementation)
    rng = random.Random(3)
    refused = []
    for message in decoder.db.messages:
        frames = random_frames(message, rng, 40)
        decoded = decoder.decode(message.frame_id, frames)
        outside = [
            s
            for s in message.signals
            if max(covered_bits(s.start, s.length, s.byte_order == "big_endian")) >= message.length * 8
        ]
        if outside:
            # signals past the message's end: cantools refuses the whole message ("unpacking failed")
            with pytest.raises(cantools.database.DecodeError):
                message.decode(frames[0], decode_choices=False)
            assert all(np.isnan(decoded[s.name]).all() for s in outside), message.name
            refused.append(message.name)
            continue
        assert_as_cantools(message, decoded, frames, implementation)
    assert len(refused) <= 2, refused  # ID5D5RearDItemps and ID556FrontDItemps


@pytest.mark.skipif(not MODEL3.is_file(), reason=f"the public Model3CAN.dbc is not at {MODEL3} (../shared absent)")
def test_model3_bms_frames_encoded_by_cantools(implementation):
    decoder = FrameDecoder.from_file(MODEL3)
    assert decoder.content_hash == hashlib.sha256(MODEL3.read_bytes()).hexdigest()
    decoder = FrameDecoder(decoder.db, content_hash=decoder.content_hash, implementation=implementation)
    pack = decoder.db.get_message_by_frame_id(0x132)
    values = {s.name: s.offset for s in pack.signals} | {"BattVoltage132": 396.25, "SmoothBattCurrent132": -12.5}
    decoded = decoder.decode(0x132, [pack.encode(values)])
    assert (decoded["BattVoltage132"].tolist(), decoded["SmoothBattCurrent132"].tolist()) == ([396.25], [-12.5])
    cells = decoder.db.get_message_by_frame_id(0x332)
    pages = [
        cells.encode(
            {"BattCellMultiplexer332": page} | {s.name: s.offset for s in cells.signals if s.multiplexer_ids == [page]}
        )
        for page in (0, 1)
    ]
    decoded = decoder.decode(0x332, pages)
    for signal in cells.signals:
        ids = signal.multiplexer_ids
        present = [ids is None or 0 in ids, ids is None or 1 in ids]
        assert (~np.isnan(decoded[signal.name])).tolist() == present, signal.name


# --- errors and batches --------------------------------------------------------------------------------------


def test_unknown_frame_names_the_id(implementation):
    decoder = (
        FrameDecoder.from_file(OWN_DBC, implementation=implementation)
        if False
        else FrameDecoder(cantools.database.load_file(OWN_DBC), implementation=implementation)
    )
    with pytest.raises(UnknownFrame) as caught:
        decoder.decode(0x7AB, [bytes(8)])
    assert caught.value.frame_id == 0x7AB and "0x7AB" in str(caught.value)
    with pytest.raises(KeyError):
        decoder.signals(0x7AB)
    with pytest.raises(UnknownFrame):
        decoder.decode_batch([928, 0x7AB], [bytes(8), bytes(8)])


def test_bad_length_names_the_frame(implementation):
    decoder = FrameDecoder(cantools.database.load_file(OWN_DBC), implementation=implementation)
    for frames, index, got in (([bytes(8), bytes(7)], 1, 7), ([bytes(9), bytes(8)], 0, 9), ([b""], 0, 0)):
        with pytest.raises(BadLength) as caught:
            decoder.decode(928, frames)
        assert (caught.value.frame_id, caught.value.index, caught.value.got, caught.value.expected) == (
            928,
            index,
            got,
            8,
        )
    with pytest.raises(BadLength) as caught:
        decoder.decode_batch([928, 0x18FF50E5, 928, 0x18FF50E5], [bytes(8), bytes(4), bytes(8), bytes(5)])
    assert (caught.value.frame_id, caught.value.index, caught.value.got, caught.value.expected) == (
        0x18FF50E5,
        3,
        5,
        4,
    )


def test_decode_batch_groups_by_id_keeping_input_order(implementation):
    db = cantools.database.load_file(OWN_DBC)
    decoder = FrameDecoder(db, implementation=implementation)
    rng = random.Random(5)
    ids = [rng.choice([928, 930, 0x18FF50E5]) for _ in range(300)]
    frames = [rng.randbytes(db.get_message_by_frame_id(i).length) for i in ids]
    frames = [
        with_multiplexer(db.get_message_by_frame_id(i), f, rng.randrange(2)) if i == 930 else f
        for i, f in zip(ids, frames)
    ]
    groups = decoder.decode_batch(ids, frames)
    assert [ids[int(indices[0])] for indices, _ in groups] == list(dict.fromkeys(ids))
    assert sorted(int(i) for indices, _ in groups for i in indices) == list(range(len(ids)))
    for indices, decoded in groups:
        frame_id = ids[int(indices[0])]
        assert all(ids[i] == frame_id for i in indices.tolist())
        assert indices.tolist() == sorted(indices.tolist())
        selected = [frames[i] for i in indices.tolist()]
        assert_as_cantools(db.get_message_by_frame_id(frame_id), decoded, selected, implementation)
    with pytest.raises(ValueError):
        decoder.decode_batch([928], [])


def test_inputs_other_than_a_list_of_bytes(implementation):
    decoder = FrameDecoder(cantools.database.load_file(OWN_DBC), implementation=implementation)
    frame = bytes(range(8))
    expected = decoder.decode(928, [frame])
    for frames in ((frame,), iter([frame]), [bytearray(frame)], [memoryview(frame)]):
        decoded = decoder.decode(928, frames)
        assert {k: v.tolist() for k, v in decoded.items()} == {k: v.tolist() for k, v in expected.items()}
    assert {k: v.tolist() for k, v in decoder.decode(928, []).items()} == {k: [] for k in decoder.signals(928)}


def test_extended_id_at_most_0x7ff_and_hash_of_an_in_memory_database():
    message = Message(0x123, "Ext", 2, [Signal("A", 0, 16)], is_extended_frame=True)
    db = Database(messages=[message])
    db.refresh()
    decoder = FrameDecoder(db)
    assert decoder.decode(0x123, [b"\x34\x12"])["A"].tolist() == [float(0x1234)]
    assert decoder.content_hash == hashlib.sha256(db.as_dbc_string().encode()).hexdigest()
    with pytest.raises(ValueError):
        FrameDecoder(db, implementation="fortran")


def test_kernel_rejects_a_plan_it_cannot_run():
    if candecode.IMPLEMENTATION != "c":
        pytest.skip("the compiled kernel is not built")
    from engine.kernels import _candecode_c

    terms = np.array([[8, 0, 255, 0]], dtype=np.int64)  # byte 8 of a 8-byte frame
    signals = np.array([[0, 1, 8, 0]], dtype=np.int64)
    fine = np.array([[0, 0, 255, 0]], dtype=np.int64)
    no_selector = (np.zeros((0, 5), dtype=np.int64), np.zeros(0))
    args = (np.ones(1), np.zeros(1))

    def run(terms=fine, signals=signals, selectors=no_selector, out_rows=1):
        plan = _candecode_c.compile_plan(8, terms, signals, *args, *selectors)
        return _candecode_c.decode_into([bytes(8)], plan, np.empty((out_rows, 1)))

    assert run() == -1
    for wrong in (
        {"terms": terms},
        {"out_rows": 2},
        {"signals": np.array([[0, 2, 8, 0]], dtype=np.int64)},
        {"selectors": (np.array([[0, 3, 0, 0, 0]], dtype=np.int64), np.zeros(0))},
        {"selectors": (np.zeros((0, 4), dtype=np.int64), np.zeros(0))},
    ):
        with pytest.raises(ValueError):
            run(**wrong)


def test_signal_past_the_frame_is_nan_and_a_scaled_multiplexer_selects_as_in_cantools(implementation):
    past = Message(
        0x10, "Past", 1, [Signal("In", 0, 4), Signal("Out", 7, 16, "big_endian")], strict=False
    )  # Out's bits run into a second byte the frame does not have
    halves = BaseConversion.factory(scale=0.5, offset=0, choices=None, is_float=False)
    scaled = Message(
        0x11,
        "Scaled",
        2,
        [
            Signal("Mux", 0, 4, conversion=halves, is_multiplexer=True),
            Signal("P1", 8, 8, multiplexer_ids=[1], multiplexer_signal="Mux"),
            Signal("P2", 8, 8, multiplexer_ids=[2], multiplexer_signal="Mux"),
        ],
        strict=False,
    )
    db = Database(messages=[past, scaled], strict=False)
    db.refresh()
    decoder = FrameDecoder(db, implementation=implementation)
    decoded = decoder.decode(0x10, [b"\x0b"])
    assert decoded["In"].tolist() == [11.0] and np.isnan(decoded["Out"]).all()
    frames = [bytes([raw, 7]) for raw in (2, 3, 4, 5)]  # the multiplexer reads 1.0, 1.5, 2.0, 2.5: int() 1,1,2,2
    assert_as_cantools(scaled, decoder.decode(0x11, frames), frames, implementation)
    assert np.isnan(decoder.decode(0x11, [bytes([1, 7])])["P1"]).all()  # 0.5: no page


def test_ieee_float_signals_half_single_double(implementation):
    def floating(name: str, start: int, length: int, order: str, scale: float = 1.0) -> Signal:
        conversion = BaseConversion.factory(scale=scale, offset=0, choices=None, is_float=True)
        return Signal(name, start, length, order, conversion=conversion)

    message = Message(
        0x400,
        "Floats",
        16,
        [
            floating("Half", 0, 16, "little_endian"),
            floating("HalfBE", 23, 16, "big_endian", scale=0.5),
            floating("Single", 32, 32, "little_endian"),
            floating("Double", 71, 64, "big_endian"),
        ],
        is_fd=True,
    )
    db = Database(messages=[message])
    db.refresh()
    rng = random.Random(7)
    values = [0.0, -0.0, 1.5, -1000.0, 6e-8]
    frames = [message.encode({s.name: rng.choice(values) for s in message.signals}, strict=False) for _ in range(20)]
    frames += [rng.randbytes(16) for _ in range(40)]  # NaNs, infinities and subnormals of every width
    frames += [bytes([0, 0x7C, 0x01, 0xFC]) + bytes(12), bytes([0x01, 0, 0, 0x80]) + bytes(12)]
    decoder = FrameDecoder(db, implementation=implementation)
    assert_as_cantools(message, decoder.decode(0x400, frames), frames, implementation)
    # no DBC can hold a half-precision signal: the hash describes the messages instead, stable across decoders
    assert decoder.content_hash == FrameDecoder(db).content_hash != FrameDecoder(Database()).content_hash


NESTED_DBC = """VERSION ""
BU_: N
BO_ 100 Nested: 2 N
 SG_ Top M : 0|4@1+ (1,0) [0|15] "" N
 SG_ Inner m1M : 4|4@1+ (1,0) [0|15] "" N
 SG_ Leaf m2 : 8|8@1+ (1,0) [0|255] "" N
 SG_ Other m0 : 8|8@1- (0.5,0) [0|255] "" N

SG_MUL_VAL_ 100 Inner Top 1-1;
SG_MUL_VAL_ 100 Leaf Inner 2-2;
SG_MUL_VAL_ 100 Other Top 0-0;
"""


def test_extended_multiplexing_a_page_inside_a_page(implementation):
    db = cantools.database.load_string(NESTED_DBC)
    message = db.get_message_by_frame_id(100)
    # 0x20: Top 0 with Inner's bits reading 2; Leaf is on no page then, though its own multiplexer's bits say 2
    frames = [bytes([0x21, 7]), bytes([0x20, 0xF0]), bytes([0x21, 0x80]), bytes([0x00, 0x01])]
    decoded = FrameDecoder(db, implementation=implementation).decode(100, frames)
    assert_as_cantools(message, decoded, frames, implementation)
    assert np.isnan(decoded["Leaf"][1]) and decoded["Other"][1] == -8.0
