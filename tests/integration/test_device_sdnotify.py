"""``fleet device run`` under a ``Type=notify`` unit: a real daemon process notifies a real unix
datagram socket given as ``$NOTIFY_SOCKET`` (READY once it serves, STATUS with what it serves,
WATCHDOG pings at half of ``$WATCHDOG_USEC`` while its threads are alive, STOPPING on SIGTERM);
a worker that hangs stops the pings."""

from __future__ import annotations

import signal
from collections.abc import Iterator

import pytest

from tests.helpers.device_fleet import DaemonProcess, enroll_device, wait_for
from tests.helpers.notify_socket import NotifySocket

pytestmark = pytest.mark.mqtt

WATCHDOG_USEC = "400000"  # a ping every 0.2 s


@pytest.fixture
def notify(monkeypatch) -> Iterator[NotifySocket]:
    """An abstract-namespace socket (``@name``) as the daemon's ``$NOTIFY_SOCKET``, with a watchdog."""
    sock = NotifySocket()
    monkeypatch.setenv("NOTIFY_SOCKET", sock.env_value)
    monkeypatch.setenv("WATCHDOG_USEC", WATCHDOG_USEC)
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    yield sock
    sock.close()


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_ready_status_watchdog_and_stopping(live_server, tmp_path, notify):
    data = tmp_path / "dev"
    enroll_device(live_server, data, "edge-sd")
    daemon = DaemonProcess(data, tmp_path / "run.log")
    try:
        ready = notify.wait_for("READY=1")
        assert "STATUS=device edge-sd: no model assigned" in ready
        daemon.wait_api(5)  # READY came once the local API serves
        wait_for(lambda: notify.listen() and notify.count("WATCHDOG=1") >= 3, what="watchdog pings")
        assert notify.count("STOPPING=1") == 0
        daemon.proc.send_signal(signal.SIGTERM)
        notify.wait_for("STOPPING=1")
        assert daemon.proc.wait(20) == 0
    finally:
        daemon.terminate()


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_hung_worker_stops_the_watchdog_pings(live_server, tmp_path, notify):
    data = tmp_path / "dev"
    enroll_device(live_server, data, "edge-hang")
    log = tmp_path / "run.log"
    daemon = DaemonProcess(data, log, test_hang_worker_after_s=2, stall_timeout_s=1.5)
    try:
        notify.wait_for("READY=1")
        wait_for(lambda: notify.listen() and "pings stop" in log.read_text(), timeout=30, what="pings stop")
        assert notify.count("WATCHDOG=1") >= 1  # they went out while the worker was alive
        assert "worker: one step has run for more than 1.5 s" in log.read_text()
        notify.drain(0.1)
        before = notify.count("WATCHDOG=1")
        notify.drain(1.5)  # seven intervals of 0.2 s
        assert notify.count("WATCHDOG=1") == before
        assert "liveness restored" not in log.read_text()
        assert daemon.alive  # still running: systemd's WatchdogSec= is what kills it
    finally:
        daemon.terminate()


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_logs_for_the_journal_carry_priorities_and_no_timestamps(live_server, tmp_path, monkeypatch):
    data, log = tmp_path / "dev", tmp_path / "run.log"
    enroll_device(live_server, data, "edge-journal")
    log.touch()
    st = log.stat()
    monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")  # stderr is this file
    daemon = DaemonProcess(data, log)
    try:
        daemon.wait_api()
        wait_for(lambda: "device edge-journal started" in log.read_text(), what="the start logged")
    finally:
        daemon.terminate()
    lines = [line for line in log.read_text().splitlines() if "device_client" in line]
    assert "<6>device_client.daemon.lifecycle: device edge-journal started; serving {}" in lines
    assert all(line.startswith("<") for line in lines), lines
