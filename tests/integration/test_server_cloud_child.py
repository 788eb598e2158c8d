"""``fleet server run`` with its embedded cloud tier as real processes: the child answers the Open
Inference Protocol, installs a pushed model with the token the server minted for it, is listed in
``/readyz``, stops with the server (SIGTERM) and dies with it (SIGKILL), is restarted when it dies,
and is not started at all with ``FLEET_CLOUD_EMBEDDED=false``."""

from __future__ import annotations

import os
import signal
import socket
import sqlite3
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest

from server.db import Database
from server.security import ADMIN_PREFIX
from tests.helpers.onnx_models import make_model
from tests.helpers.server_process import ServerProcess, alive, cmdline, wait_until
from tests.helpers.tokens import create_admin_token

pytestmark = pytest.mark.mqtt


@pytest.fixture
def server(tmp_path):
    started: list[ServerProcess] = []

    def start(**kwargs: str) -> ServerProcess:
        proc = ServerProcess(tmp_path, **{"FLEET_CLOUD_EMBEDDED": "true", **kwargs})
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.kill_tree()


def cloud_check(srv: ServerProcess) -> dict:
    return httpx.get(f"{srv.url}/readyz", timeout=5).json()["checks"].get("cloud")


def live(srv: ServerProcess) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{srv.cloud_port}/v2/health/live", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def child_tokens(workdir: Path) -> list[tuple[str, str, str | None, str | None]]:
    """(name, role, revoked_at, expires_at) of the admin tokens in the server's database."""
    with sqlite3.connect(workdir / "fleet-data" / "fleet.db") as db:
        return db.execute("SELECT name, role, revoked_at, expires_at FROM admin_tokens").fetchall()


def test_the_embedded_cloud_tier_answers_and_stops_with_the_server(server, tmp_path):
    srv = server()
    srv.wait_ready()  # the cloud check is part of readiness: the child runs and answers
    [child] = srv.clouds()
    assert live(srv)
    check = cloud_check(srv)
    # no model configured: listed as not ready, without failing the admin API's readiness
    assert (check["ok"], check["ready"]) == (True, False), check
    assert "FLEET_CLOUD_MODELS" in check["detail"]
    assert check["pid"] == child
    assert check["url"] == f"http://127.0.0.1:{srv.cloud_port}"
    [(name, role, revoked, expires)] = child_tokens(tmp_path)
    assert (name, role, revoked) == ("embedded-cloud", "cloud", None)
    assert expires is not None

    assert srv.stop(signal.SIGTERM) == 0, srv.output()
    assert not alive(child), f"the cloud tier {child} outlived the server: {cmdline(child)}"
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", srv.cloud_port), timeout=1).close()
    [(_, _, revoked, _)] = child_tokens(tmp_path)
    assert revoked is not None  # its token is revoked when it stops
    out = srv.output()
    assert "embedded cloud tier serving at" in out
    assert f"{ADMIN_PREFIX}." not in out  # the token is never logged


def test_the_child_installs_a_pushed_model_with_its_minted_token(server, tmp_path):
    srv = server(FLEET_CLOUD_MODELS="clf", FLEET_CLOUD_REFRESH_S="0.3")
    srv.wait_ready()
    db = Database(f"sqlite:///{tmp_path / 'fleet-data' / 'fleet.db'}")
    try:
        token = create_admin_token(SimpleNamespace(db=db), "admin")
    finally:
        db.dispose()
    model = make_model(tmp_path / "m.onnx", seed=1)
    pushed = httpx.post(
        f"{srv.url}/api/v1/models/clf/versions",
        headers={"Authorization": f"Bearer {token}"},
        data={"version": "1.0.0"},
        files={"file": ("model.onnx", model.read_bytes(), "application/octet-stream")},
        timeout=120,
    )
    assert pushed.status_code == 201, pushed.text
    wait_until(lambda: cloud_check(srv)["ready"], 120, lambda: f"the child serves clf: {cloud_check(srv)}")
    ready = httpx.get(f"http://127.0.0.1:{srv.cloud_port}/v2/health/ready", timeout=5)
    assert ready.json() == {"ready": True}


def test_sigkill_of_the_server_kills_the_cloud_child(server):
    srv = server()
    srv.wait_ready()
    [child] = srv.clouds()

    srv.stop(signal.SIGKILL)

    wait_until(lambda: not alive(child), 30, lambda: f"the cloud child still runs: {cmdline(child)}")


def test_a_cloud_child_that_dies_is_restarted(server):
    srv = server()
    srv.wait_ready()
    [first] = srv.clouds()

    os.kill(first, signal.SIGKILL)
    wait_until(lambda: srv.clouds() and srv.clouds() != [first], 60, "a new cloud child under the server")
    wait_until(lambda: live(srv) and cloud_check(srv)["restarts"] == 1, 60, lambda: str(cloud_check(srv)))
    srv.wait_ready()
    out = srv.output()
    assert "embedded cloud tier exited (code -9)" in out, out
    assert "embedded cloud tier restarted" in out, out


def test_embedded_false_starts_no_cloud_child(server):
    srv = server(FLEET_CLOUD_EMBEDDED="false")
    srv.wait_ready()
    assert srv.clouds() == []
    assert cloud_check(srv) is None
    assert not live(srv)


def test_a_taken_cloud_port_fails_start_up_with_one_line(server):
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        srv = server(FLEET_CLOUD_PORT=str(port))
        srv.cloud_port = port
        code = srv.proc.wait(60)
    out = srv.output()
    assert code != 0, out
    assert f"port {port} is in use by another process; set FLEET_CLOUD_PORT" in out, out
    assert "Traceback" not in out
