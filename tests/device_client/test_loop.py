"""BackgroundLoop (device_client/loop.py), the background thread of the daemon's worker and health
publisher and of the server's engine, health rollup, ingest worker and outbox publisher."""

from __future__ import annotations

import logging
import threading

from device_client.loop import BackgroundLoop


def test_a_failing_step_is_logged_on_the_owners_logger_and_the_loop_goes_on(caplog):
    stop, third = threading.Event(), threading.Event()
    calls = []

    def step() -> None:
        calls.append(1)
        if len(calls) < 3:
            raise RuntimeError(f"step {len(calls)} broke")
        third.set()

    owner = logging.getLogger("tests.loop.owner")
    loop = BackgroundLoop("test-loop", step, stop, failure="step failed; going on", logger=owner)
    loop.start()
    try:
        assert third.wait(10), "the loop stopped at the first failing step"
    finally:
        stop.set()
        loop.join(10)
    assert not loop.is_alive()
    failures = [r for r in caplog.records if r.getMessage() == "step failed; going on"]
    assert [r.name for r in failures] == ["tests.loop.owner"] * 2
    assert all(r.exc_info is not None for r in failures)  # with the traceback


def test_a_callable_interval_is_asked_before_every_wait():
    """The rollout engine ticks again at once after a partial tick: its interval changes."""
    stop, done = threading.Event(), threading.Event()
    asked: list[int] = []
    steps: list[int] = []

    def interval() -> float:
        asked.append(1)
        return 0.0 if len(asked) <= 3 else 3600.0  # three steps at once, then a long wait

    def step() -> None:
        steps.append(1)
        if len(steps) == 3:
            done.set()

    loop = BackgroundLoop("test-interval", step, stop, failure="step failed", interval_s=interval)
    loop.start()
    try:
        assert done.wait(10)
    finally:
        stop.set()  # ends the long wait
        loop.join(10)
    assert not loop.is_alive()
    assert len(steps) == 3
    assert len(asked) == 4


def test_joining_a_loop_that_never_started_returns():
    """A component stopped before it started (its start failed, or it was never needed)."""
    loop = BackgroundLoop("never-started", lambda: None, threading.Event(), failure="step failed")
    loop.join(1)
    assert not loop.is_alive()
