"""``fleet server run`` and its children as real processes: SIGTERM and SIGKILL leave nothing
behind."""

from __future__ import annotations

import signal
import socket

import pytest

from tests.helpers.server_process import ServerProcess, alive, cmdline, descendants, wait_until

pytestmark = pytest.mark.mqtt


@pytest.fixture
def server(tmp_path):
    started: list[ServerProcess] = []

    def start(**kwargs: object) -> ServerProcess:
        proc = ServerProcess(tmp_path, **kwargs)  # type: ignore[arg-type]
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.kill_tree()


def test_sigterm_stops_the_server_and_its_broker(server):
    srv = server()
    srv.wait_ready()
    [broker] = srv.brokers()

    assert srv.stop(signal.SIGTERM) == 0, srv.output()
    assert not alive(broker), f"mosquitto {broker} outlived the server: {cmdline(broker)}"
    with pytest.raises(OSError):  # nobody listens on the MQTT port any more
        socket.create_connection(("127.0.0.1", srv.mqtt_port), timeout=1).close()
    assert "Application shutdown complete" in srv.output()


def test_sigkill_takes_every_child_along(server):
    srv = server(FLEET_INGEST_PROCESSES="1")
    srv.wait_ready()
    children = {pid: cmdline(pid) for pid in descendants(srv.proc.pid)}
    assert any("mosquitto" in line for line in children.values()), children
    assert any("multiprocessing" in line for line in children.values()), children  # the ingest process

    srv.stop(signal.SIGKILL)

    def survivors() -> list[str]:
        return [line for pid, line in children.items() if alive(pid)]

    wait_until(lambda: not survivors(), 30, lambda: f"children of the killed server still run: {survivors()}")
