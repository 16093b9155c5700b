"""The supervisor's restart policy."""

from __future__ import annotations

from engine.supervisor import RestartBackoff


def test_restart_backoff_doubles_while_crashing_and_starts_over_after_a_healthy_run():
    backoff = RestartBackoff(healthy_s=30.0)
    assert [backoff.delay_s(ran_s=1.0) for _ in range(7)] == [0.5, 1.0, 2.0, 4.0, 8.0, 10.0, 10.0]
    assert backoff.delay_s(ran_s=3600.0) == 0.5  # a crash after an hour of work is not a crash loop
    assert backoff.delay_s(ran_s=1.0) == 1.0
