"""Fast DBC decoding: all frames of one CAN id at once, through a plan compiled from a cantools Database.

``FrameDecoder(db).decode(frame_id, datas)`` returns one float64 array per signal of the message, the values
cantools gives with ``decode(data, decode_choices=False, scaling=True)`` (choices stay numbers). Each signal is
compiled once into byte terms (byte index, right shift, mask, left shift) that a kernel (``ext/candecode.pyx``,
or its numpy twin) runs over the whole batch: little- and big-endian, signed and unsigned, 1 to 64 bits, IEEE
floats, frames up to 64 bytes (CAN FD). Where cantools would give no value the array holds NaN:

- a multiplexed signal in a frame whose multiplexer value does not select it (also when the value selects
  no page at all, where cantools raises for the whole frame);
- a signal whose multiplexer is not a signal of the message (cantools never decodes those);
- a signal whose bits lie beyond the message's length (cantools refuses the whole message).

An IEEE float signal that carries NaN is NaN too; nothing else is. Values are float64: a raw integer above
2**53 (a long counter) is rounded once to the nearest float64 before scaling, where cantools keeps a Python int.
"""

from __future__ import annotations

import hashlib
import importlib
import os
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

from engine.kernels import candecode


class UnknownFrame(KeyError):
    """The CAN id is not a message of the DBC."""

    def __init__(self, frame_id: int) -> None:
        super().__init__(frame_id)
        self.frame_id = frame_id

    def __str__(self) -> str:
        return f"CAN id 0x{self.frame_id:X} is not in the DBC"


class BadLength(ValueError):
    """A frame's data is not as long as its message (CAN FD included: exactly the DBC's length)."""

    def __init__(self, frame_id: int, index: int, got: int, expected: int) -> None:
        super().__init__(f"frame {index} (CAN id 0x{frame_id:X}) has {got} data bytes; its message has {expected}")
        self.frame_id = frame_id
        self.index = index
        self.got = got
        self.expected = expected


class Plan(NamedTuple):
    """One message compiled for the kernels."""

    length: int
    names: tuple[str, ...]
    terms: np.ndarray  # int64 (T, 4): byte, rshift, mask, lshift
    signals: np.ndarray  # int64 (S, 4): first term, term count, bit length, kind
    scale: np.ndarray
    offset: np.ndarray
    selectors: np.ndarray  # int64 (K, 5): multiplexer row, child row, first id, id count, truncate
    selector_ids: np.ndarray  # float64: the multiplexer values that select each child


def byte_terms(start: int, length: int, big_endian: bool, size: int) -> list[tuple[int, int, int, int]] | None:
    """The (byte, rshift, mask, lshift) terms of a signal in a ``size``-byte frame; None when it overruns it.

    ``start`` is cantools' start bit: the least significant bit of a little-endian signal, the most
    significant one (in the DBC's sawtooth numbering) of a big-endian one."""
    terms = []
    if big_endian:
        # network order: bit 0 is the most significant bit of byte 0
        first = (start // 8) * 8 + 7 - start % 8
        end = first + length
        if first < 0 or end > size * 8:
            return None
        for byte in range(first // 8, (end - 1) // 8 + 1):
            low, high = max(first, byte * 8), min(end, byte * 8 + 8)
            terms.append((byte, byte * 8 + 8 - high, (1 << (high - low)) - 1, end - high))
    else:
        end = start + length
        if start < 0 or end > size * 8:
            return None
        for byte in range(start // 8, (end - 1) // 8 + 1):
            low, high = max(start, byte * 8), min(end, byte * 8 + 8)
            terms.append((byte, low - byte * 8, (1 << (high - low)) - 1, low - start))
    return terms


def _kind(signal: Any) -> int:
    if signal.is_float:
        return {16: candecode.FLOAT16, 32: candecode.FLOAT32, 64: candecode.FLOAT64}.get(
            signal.length, candecode.OUTSIDE
        )
    return candecode.SIGNED if signal.is_signed else candecode.UNSIGNED


def compile_message(message: Any) -> Plan:
    """The plan of one cantools message."""
    size = message.length
    names = tuple(signal.name for signal in message.signals)
    row_of = {name: row for row, name in enumerate(names)}
    terms: list[tuple[int, int, int, int]] = []
    rows = []
    for signal in message.signals:
        found = byte_terms(signal.start, signal.length, signal.byte_order == "big_endian", size)
        kind = _kind(signal) if found is not None else candecode.OUTSIDE
        rows.append((len(terms), len(found or ()), signal.length, kind))
        terms.extend(found or ())
    children = []
    for row, signal in enumerate(message.signals):
        if signal.multiplexer_ids is not None:
            children.append((row, row_of.get(signal.multiplexer_signal), sorted(signal.multiplexer_ids)))

    def depth(row: int | None, seen: int = 0) -> int:
        parent = next((mux for child, mux, _ in children if child == row), None)
        return 0 if parent is None or seen > len(children) else 1 + depth(parent, seen + 1)

    selectors: list[tuple[int, int, int, int, bool]] = []
    selector_ids: list[int] = []
    for row, mux, ids in sorted(children, key=lambda child: depth(child[0])):
        if mux is None:  # its multiplexer is not a signal of the message (cantools never decodes it)
            mux, ids = row, []
        conversion = message.signals[mux].conversion
        integral = float(conversion.scale).is_integer() and float(conversion.offset).is_integer()
        selectors.append((mux, row, len(selector_ids), len(ids), not integral))
        selector_ids.extend(ids)
    return Plan(
        size,
        names,
        np.array(terms, dtype=np.int64).reshape(-1, 4),
        np.array(rows, dtype=np.int64).reshape(-1, 4),
        np.array([float(signal.scale) for signal in message.signals], dtype=np.float64),
        np.array([float(signal.offset) for signal in message.signals], dtype=np.float64),
        np.array(selectors, dtype=np.int64).reshape(-1, 5),
        np.array(selector_ids, dtype=np.float64),
    )


class FrameDecoder:
    """Decodes batches of raw CAN frames with a cantools Database; plans are compiled on first use of an id."""

    def __init__(self, db: Any, *, content_hash: str | None = None, implementation: str | None = None) -> None:
        """``implementation``: ``"c"`` or ``"py"`` to force a kernel (tests, benchmarks); by default the one
        the selector picked (``engine.kernels.candecode.IMPLEMENTATION``)."""
        self.db = db
        self._content_hash = content_hash
        self._plans: dict[int, Plan] = {}
        self._compiled: dict[int, Any] = {}  # frame id -> the plan as the kernel runs it
        if implementation is None:
            self._kernel: Any = candecode
        elif implementation in ("c", "py"):
            self._kernel = importlib.import_module(f"engine.kernels._candecode_{implementation}")
        else:
            raise ValueError(f"implementation must be 'c' or 'py', not {implementation!r}")
        self.implementation = implementation or candecode.IMPLEMENTATION

    @property
    def content_hash(self) -> str:
        """SHA-256 (hex) of the DBC file's bytes (``from_file``), else of ``db.as_dbc_string()``; of the messages'
        and signals' descriptions for a database no DBC can express (a half-precision float signal)."""
        if self._content_hash is None:
            try:
                text = self.db.as_dbc_string()
            except Exception:  # cantools raises KeyError, ValueError... on what the DBC format cannot hold
                text = "\n".join(repr(message) + "".join(map(repr, message.signals)) for message in self.db.messages)
            self._content_hash = hashlib.sha256(text.encode()).hexdigest()
        return self._content_hash

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> FrameDecoder:
        """Load a DBC (or KCD, SYM, ARXML) with ``cantools.database.load_file``; not strict, as real DBCs hold
        overlapping signals that cantools refuses by default."""
        import cantools

        with open(path, "rb") as file:
            content = file.read()
        return cls(cantools.database.load_file(path, strict=False), content_hash=hashlib.sha256(content).hexdigest())

    def plan(self, frame_id: int) -> Plan:
        """The compiled plan of ``frame_id`` (``message.frame_id``: 11 or 29 bits, a standard id first where the
        DBC has both); UnknownFrame if the DBC has no such message."""
        plan = self._plans.get(frame_id)
        if plan is None:
            try:
                message = self.db.get_message_by_frame_id(frame_id)
            except KeyError:
                try:  # an extended message whose id is <= 0x7FF: cantools finds it only when told it is extended
                    message = self.db.get_message_by_frame_id(frame_id, force_extended_id=True)
                except KeyError:
                    raise UnknownFrame(frame_id) from None
            plan = self._plans[frame_id] = compile_message(message)
        return plan

    def signals(self, frame_id: int) -> tuple[str, ...]:
        """Signal names of the message of ``frame_id``, in the order cantools lists them."""
        return self.plan(frame_id).names

    def decode(self, frame_id: int, data: Sequence[bytes]) -> dict[str, np.ndarray]:
        """``{signal: float64 array of len(data)}`` for frames all of ``frame_id``; BadLength names the first
        frame of another length than the message's."""
        plan = self.plan(frame_id)
        if not isinstance(data, (list, tuple)):
            data = list(data)
        out = np.empty((len(plan.names), len(data)), dtype=np.float64)
        compiled = self._compiled.get(frame_id)
        if compiled is None:
            compiled = self._compiled[frame_id] = self._kernel.compile_plan(
                plan.length, plan.terms, plan.signals, plan.scale, plan.offset, plan.selectors, plan.selector_ids
            )
        bad = self._kernel.decode_into(data, compiled, out)
        if bad >= 0:
            raise BadLength(frame_id, bad, len(data[bad]), plan.length)
        return dict(zip(plan.names, out))

    def decode_batch(
        self, frame_ids: Sequence[int], data: Sequence[bytes]
    ) -> list[tuple[np.ndarray, dict[str, np.ndarray]]]:
        """Frames of mixed ids: per id in order of first appearance, the indices of its frames in the input
        and their decoded signals. UnknownFrame / BadLength (its ``index`` into the input) as ``decode``."""
        if len(frame_ids) != len(data):
            raise ValueError(f"{len(frame_ids)} frame ids for {len(data)} data items")
        ids = np.asarray(frame_ids, dtype=np.int64)
        unique, first, inverse = np.unique(ids, return_index=True, return_inverse=True)
        order = np.argsort(inverse, kind="stable")  # the frames of each id together, in input order
        ends = np.cumsum(np.bincount(inverse, minlength=len(unique)))
        starts = np.concatenate(([0], ends[:-1]))
        results = []
        for group in np.argsort(first, kind="stable"):
            indices = order[starts[group] : ends[group]]
            frame_id = int(unique[group])
            try:
                decoded = self.decode(frame_id, [data[i] for i in indices.tolist()])
            except BadLength as exc:
                raise BadLength(frame_id, int(indices[exc.index]), exc.got, exc.expected) from None
            results.append((indices, decoded))
        return results
