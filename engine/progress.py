"""Progress of a long command on a terminal: one line rewritten in place on stderr, nothing in a pipe.

A script or a log collector reading canpipe's output gets the summary only; a person at a terminal sees that
a 60 s ``simulate`` is working instead of 60 s of silence.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, TextIO, TypeVar

if TYPE_CHECKING:
    from engine.simulator import SimulationResult

T = TypeVar("T")


class Progress:
    """``update(text)`` rewrites the line when the stream is a terminal; ``done()`` ends it."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty()
        self._width = 0

    def update(self, text: str) -> None:
        if not self.enabled:
            return
        self.stream.write("\r" + text.ljust(self._width))
        self.stream.flush()
        self._width = len(text)

    def done(self) -> None:
        if self.enabled and self._width:
            self.stream.write("\r" + " " * self._width + "\r")
            self.stream.flush()
            self._width = 0


async def with_progress(
    work: Awaitable[T], describe: Callable[[float], str], interval_s: float = 1.0, stream: TextIO | None = None
) -> T:
    """Await ``work``, showing ``describe(elapsed_s)`` every ``interval_s`` on a terminal."""
    import asyncio  # here, not at the top: ``canpipe aggregate`` uses ``Progress`` and starts without asyncio

    progress = Progress(stream)
    task = asyncio.ensure_future(work)
    start = time.monotonic()
    try:
        while progress.enabled and not task.done():
            await asyncio.wait({task}, timeout=interval_s)
            if not task.done():
                progress.update(describe(time.monotonic() - start))
        return await task
    finally:
        progress.done()


def simulation_line(result: SimulationResult, duration_s: float, elapsed_s: float) -> str:
    """``simulate: 12/60 s, sent 1200, accepted 1190, rejected 0, failed 0``, from a running simulation."""
    return (
        f"simulate: {min(elapsed_s, duration_s):.0f}/{duration_s:.0f} s, sent {result.sent}, "
        f"accepted {result.accepted}, rejected {result.rejected}, failed {result.failed}"
    )
