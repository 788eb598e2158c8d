"""``fleet server run`` and its children as real processes: SIGTERM and SIGKILL leave nothing
behind, a taken MQTT port fails start-up with one line, a broker that dies is restarted."""

from __future__ import annotations

import os
import signal
import socket

import httpx
import pytest

from tests.helpers.server_process import ServerProcess, alive, cmdline, descendants, wait_until

pytestmark = pytest.mark.mqtt


@pytest.fixture
def server(tmp_path):
    started: list[ServerProcess] = []

    def start(**kwargs) -> ServerProcess:
        proc = ServerProcess(tmp_path, **kwargs)
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
    out = srv.output()
    assert "Application shutdown complete" in out
    # the server's own INFO lines are its log; the libraries' INFO chatter is not
    assert "INFO server.runner: embedded Mosquitto listening on 127.0.0.1:" in out
    assert "INFO alembic" not in out


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


def test_a_taken_mqtt_port_fails_start_up_with_one_line(server):
    with socket.socket() as squatter:  # a plain listening socket, like a broker left behind
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        srv = server(mqtt_port=port)
        code = srv.proc.wait(60)
    out = srv.output()
    assert code != 0, out
    expected = f"port {port} is in use by another process; set FLEET_MQTT_PORT or stop it"
    assert expected in out.splitlines(), out
    assert "Traceback" not in out
    assert "listening" not in out  # no claim that the embedded Mosquitto runs
    assert not srv.brokers()


def test_a_broker_that_dies_is_restarted_and_logged(server):
    srv = server()
    srv.wait_ready()
    [first] = srv.brokers()

    os.kill(first, signal.SIGKILL)
    wait_until(lambda: srv.brokers() and srv.brokers() != [first], 60, "a new broker under the server")
    srv.wait_ready()  # the MQTT links are back on the new broker
    out = srv.output()
    assert "embedded Mosquitto exited (code -9;" in out, out
    assert "embedded Mosquitto restarted" in out, out
    assert httpx.get(f"{srv.url}/healthz").status_code == 200
