"""What one load-test run asks for: a records/s target turned into locust users and per-user pacing."""

from __future__ import annotations

import dataclasses
import math

PER_VEHICLE_HZ = 5.0  # the seed's sampling rate: one record per vehicle every 200 ms
BATCH_REQUESTS_HZ = 5.0  # a gateway posts its batch as often as its vehicles sample
SINGLE_USER_CLASS = "Vehicle"
BATCH_USER_CLASS = "Gateway"


@dataclasses.dataclass(frozen=True)
class Scenario:
    """A constant arrival rate: ``users`` locust users, each posting ``requests_per_user_s`` requests/s of
    ``batch`` records, so that users * requests_per_user_s * batch = ``rate`` records/s."""

    rate: float  # target records/s
    duration_s: float
    batch: int = 1
    consumers: int = 2
    receiver_workers: int = 1
    locust_processes: int = 0  # 0: decided from the request rate (see ``processes``)

    @property
    def user_class(self) -> str:
        return SINGLE_USER_CLASS if self.batch == 1 else BATCH_USER_CLASS

    @property
    def label(self) -> str:
        """The request name suffix and scenario tag: ``single`` or ``batch 100``."""
        return "single" if self.batch == 1 else f"batch {self.batch}"

    @property
    def name(self) -> str:
        """Report folder name, e.g. ``rate-500-single`` or ``rate-5000-batch-100``."""
        return f"rate-{self.rate:g}-{self.label.replace(' ', '-')}"

    @property
    def request_rate(self) -> float:
        """Target HTTP requests/s."""
        return self.rate / self.batch

    @property
    def users(self) -> int:
        """One user per simulated vehicle (single) or gateway (batch), each at 5 requests/s or less."""
        per_user = PER_VEHICLE_HZ if self.batch == 1 else BATCH_REQUESTS_HZ
        return max(1, math.ceil(self.request_rate / per_user))

    @property
    def requests_per_user_s(self) -> float:
        return self.request_rate / self.users

    @property
    def processes(self) -> int:
        """Locust processes: one gevent loop posts ~600-900 small requests/s on one shared core here, so past
        600 requests/s the runner forks locust workers (``--processes``); more than the machine's cores
        would only fight the receiver for CPU."""
        if self.locust_processes:
            return self.locust_processes
        return 1 if self.request_rate <= 600 else 2
