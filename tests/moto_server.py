"""moto's server, with one emulator race closed: run as ``python tests/moto_server.py -H HOST -p PORT``.

moto's ``ReceiveMessage`` checks that a message is visible and then marks it received with no lock in
between, and its server answers each request on a thread of its own. Two receives at the same moment
can therefore both take one message, which SQS does not do to a message inside its visibility
timeout (getmoto/moto#519 describes it; moto 5.2 still has it). Tests of competing consumers then
failed now and then on a duplicate that came from the emulator, not from canpipe.

Here each pass over the queue runs under one lock (with no wait, so it never blocks); the long poll
waits outside the lock, on the queue's own condition, as moto's does. Everything else is moto's
server unchanged, over real HTTP.
"""

from __future__ import annotations

import threading
import time

from moto.server import main
from moto.sqs.models import SQSBackend

_one_pass_at_a_time = threading.Lock()
_receive_once = SQSBackend.receive_message


def _receive_message(self, queue_name, count, wait_seconds_timeout, visibility_timeout, *args, **kwargs):
    queue = self.get_queue(queue_name)
    deadline = time.monotonic() + (wait_seconds_timeout or 0)
    while True:
        with _one_pass_at_a_time:
            got = _receive_once(self, queue_name, count, 0, visibility_timeout, *args, **kwargs)
        left = deadline - time.monotonic()
        if got or left <= 0:
            return got
        queue.wait_for_messages(min(1.0, left))


SQSBackend.receive_message = _receive_message

if __name__ == "__main__":
    main()
