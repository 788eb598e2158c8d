"""The notification protocol on real unix datagram sockets: a path and an abstract (``@``) address,
``$WATCHDOG_USEC`` parsing, and watchdog pings that stop while a liveness check fails."""

from __future__ import annotations

import os

import pytest

from device_client.sdnotify import Notifier, Watchdog, socket_address, watchdog_interval_s
from tests.helpers.notify_socket import NotifySocket


@pytest.mark.parametrize("abstract", [False, True])
def test_ready_and_status_in_one_datagram(tmp_path, abstract):
    sock = NotifySocket(None if abstract else tmp_path / "notify")
    try:
        notifier = Notifier(sock.env_value)
        assert notifier.ready("serving clf 1.0.0")
        assert sock.drain(2) == [["READY=1", "STATUS=serving clf 1.0.0"]]
        assert notifier.stopping()
        assert sock.drain(2) == [["STOPPING=1", "STATUS=stopping"]]
    finally:
        sock.close()


def test_without_a_socket_nothing_is_sent(monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert not Notifier().enabled
    assert not Notifier().ready("x")
    assert socket_address("relative/path") is None
    assert socket_address("@abc") == b"\0abc"


def test_a_vanished_socket_is_logged_not_raised(tmp_path, caplog):
    assert not Notifier(str(tmp_path / "gone")).notify("READY=1")
    assert "cannot notify the service manager" in caplog.text


def test_watchdog_interval():
    pid = str(os.getpid())
    assert watchdog_interval_s({"WATCHDOG_USEC": "30000000"}) == 15.0
    assert watchdog_interval_s({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": pid}) == 15.0
    assert watchdog_interval_s({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}) is None
    assert watchdog_interval_s({}) is None
    assert watchdog_interval_s({"WATCHDOG_USEC": "soon"}) is None
    assert watchdog_interval_s({"WATCHDOG_USEC": "0"}) is None


def test_pings_stop_while_a_check_fails_and_resume(tmp_path, caplog):
    sock = NotifySocket(tmp_path / "notify")
    hung = {"worker": False}
    dog = Watchdog(
        Notifier(sock.env_value),
        0.05,
        {"worker": lambda: "stuck" if hung["worker"] else None, "api": lambda: None},
    )
    dog.start()
    try:
        sock.wait_for("WATCHDOG=1", timeout=5)
        hung["worker"] = True
        for _ in range(100):
            if "not alive (worker: stuck)" in caplog.text:
                break
            sock.drain(0.05)
        assert "not alive (worker: stuck): watchdog pings stop" in caplog.text
        sock.drain(0.1)
        assert sock.drain(0.5) == []  # ten intervals, not one ping
        hung["worker"] = False
        sock.messages.clear()
        sock.wait_for("WATCHDOG=1", timeout=5)
    finally:
        dog.stop()
        sock.close()


def test_a_check_that_raises_is_a_failure():
    def broken() -> str | None:
        raise RuntimeError("boom")

    dog = Watchdog(Notifier(""), 1.0, {"ok": lambda: None, "broken": broken})
    assert dog.failure() == "broken: RuntimeError: boom"
