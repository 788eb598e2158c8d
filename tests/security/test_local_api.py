"""The device's local inference API under attack, on a real daemon, over raw sockets.

protection (``device_client/api.py``): a ``Host`` that is not this device is a 421 (a browser under
DNS rebinding sends the attacker's name), a POST that is neither JSON nor npy is a 415 (what a web
page may send cross-origin without a CORS preflight), the bearer token when one is configured
(401), one deadline per request for its line, headers and body (a client that sends half a
request, or drips it, is let go), and a cap on connections served at once (over it: a 503, no
thread).
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from device_client.api import ApiConfigError, InferenceServer, load_api_token
from device_client.config import DeviceSettings
from device_client.protocol.bundle import extract_bundle
from device_client.runtime import ModelHost
from tests.helpers.bundles import make_bundle
from tests.helpers.device_fleet import wait_for
from tests.helpers.testbed import Testbed

pytestmark = pytest.mark.mqtt

TOKEN = "local-api-secret-0123456789"
CAP = 4
TESTBED_SETTINGS = {
    "api_token": TOKEN,
    "api_allowed_hosts": "edge-sec.local, Kiosk.Example.",
    "api_max_connections": CAP,
    "api_timeout_s": 1.0,
}
INFER = json.dumps({"inputs": {"x": np.ones((1, 4), np.float32).tolist()}}).encode()
AUTH = ("Authorization", f"Bearer {TOKEN}")
JSON_CT = ("Content-Type", "application/json")


def request(
    method: str,
    path: str,
    *,
    host: str | None = "localhost",
    headers: tuple[tuple[str, str], ...] = (AUTH,),
    body: bytes | None = None,
) -> bytes:
    lines = [f"{method} {path} HTTP/1.1"]
    if host is not None:
        lines.append(f"Host: {host}")
    lines += [f"{k}: {v}" for k, v in headers]
    if body is not None:
        lines.append(f"Content-Length: {len(body)}")
    lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + (body or b"")


def read_all(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def exchange(port: int, raw: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send ``raw`` on a fresh connection; (status, headers, body) of the answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=15) as sock:
        sock.sendall(raw)
        data = read_all(sock)
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (h.partition(":") for h in header_lines)}
    return int(status_line.split()[1]), headers, body


def handler_threads() -> int:
    return sum("process_request_thread" in t.name for t in threading.enumerate())


@pytest.fixture
def api(tb: Testbed) -> Iterator[int]:
    """The daemon's API port; after the test every slot is free again and it answers."""
    assert tb.daemon is not None
    port = tb.daemon.api.port
    yield port
    wait_for(lambda: handler_threads() == 0, 15, what="all connections released")
    assert exchange(port, request("GET", "/v1/health"))[0] == 200


def test_a_foreign_host_header_is_421(api):
    # DNS rebinding: evil.example resolves to 127.0.0.1, the browser sends Host: evil.example
    for host in ("evil.example", f"evil.example:{api}", "localhost.evil.example", "127.0.0.1.nip.io", None):
        status, _, body = exchange(api, request("GET", "/v1/health", host=host))
        assert status == 421, (host, body)
        assert "is not this device" in json.loads(body)["error"]
        status, _, _ = exchange(
            api, request("POST", "/v1/infer", host=host, headers=(AUTH, JSON_CT), body=INFER)
        )
        assert status == 421, host
    allowed = (
        "localhost",
        f"localhost:{api}",
        f"127.0.0.1:{api}",
        f"[::1]:{api}",
        "edge-sec.local",
        "KIOSK.example",  # configured as "Kiosk.Example."
        "kiosk.example.:8500",
    )
    for host in allowed:
        assert exchange(api, request("GET", "/v1/health", host=host))[0] == 200, host
    status, headers, body = exchange(api, request("POST", "/v1/infer", headers=(AUTH, JSON_CT), body=INFER))
    assert status == 200, body
    assert headers["x-fleet-model-version"] == "2.0.0"


@pytest.mark.parametrize(
    "ctype", [None, "text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"]
)
def test_a_post_that_is_not_json_or_npy_is_415(api, ctype):
    # the content types a web page may POST cross-origin without a preflight
    headers = (AUTH,) if ctype is None else (AUTH, ("Content-Type", ctype))
    status, _, body = exchange(api, request("POST", "/v1/infer", headers=headers, body=INFER))
    assert status == 415, body
    assert json.loads(body)["error"] == "Content-Type must be application/json or application/x-npy"
    ok = (AUTH, ("Content-Type", "application/json; charset=utf-8"))
    assert exchange(api, request("POST", "/v1/infer", headers=ok, body=INFER))[0] == 200


def test_the_bearer_token_is_required(api):
    for headers in ((), (("Authorization", "Bearer wrong"),), (("Authorization", TOKEN),)):
        status, got, body = exchange(api, request("GET", "/v1/health", headers=headers))
        assert status == 401, headers
        assert got["www-authenticate"] == "Bearer"
        assert json.loads(body) == {"error": "a valid bearer token is required"}
        status, _, _ = exchange(api, request("POST", "/v1/infer", headers=(*headers, JSON_CT), body=INFER))
        assert status == 401
    assert exchange(api, request("GET", "/v1/health"))[0] == 200


def test_half_a_request_holds_nothing(api):
    # slowloris: CAP connections each send half the headers and then nothing; the deadline closes
    # each of them (the socket reads EOF: no answer was due), so every slot is free again
    slow = [socket.create_connection(("127.0.0.1", api), timeout=15) for _ in range(CAP)]
    try:
        for sock in slow:
            sock.sendall(b"POST /v1/infer HTTP/1.1\r\nHost: localhost\r\n")
        for sock in slow:
            assert read_all(sock) == b""
    finally:
        for sock in slow:
            sock.close()
    assert exchange(api, request("GET", "/v1/health"))[0] == 200


def test_a_dripped_request_is_cut_off(api):
    # one header byte at a time, each well within the deadline: the whole request is not
    with socket.create_connection(("127.0.0.1", api), timeout=15) as sock:
        sock.sendall(b"GET /v1/health HTTP/1.1\r\nHost: localhost\r\nX-Drip: ")
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            for _ in range(600):  # 60 s if the server never cut it off
                sock.sendall(b"a")
                time.sleep(0.1)
        with contextlib.suppress(ConnectionResetError):
            assert read_all(sock) == b""


def test_a_body_that_never_arrives_is_408(api):
    head = request("POST", "/v1/infer", headers=(AUTH, JSON_CT), body=b"x" * 100)[:-100]
    with socket.create_connection(("127.0.0.1", api), timeout=15) as sock:
        sock.sendall(head + INFER[:10])
        data = read_all(sock)
    assert data.startswith(b"HTTP/1.1 408 "), data
    assert b"body of 100 bytes not received in time" in data


@contextlib.contextmanager
def standalone(workdir: Path, settings: DeviceSettings | None = None, **kw: Any) -> Iterator[InferenceServer]:
    """An API server of its own on a real model (no daemon), configured by ``settings`` or ``kw``."""
    tar, _ = make_bundle(workdir / "bundle", name="clf", version="1.0.0")
    extract_bundle(tar, workdir / "slot")
    host = ModelHost("clf", warmup_runs=0)
    host.install(workdir / "slot")
    if settings is not None:
        server = InferenceServer.from_settings(host, settings)
    else:
        server = InferenceServer(host, port=0, **kw)
    server.start()
    try:
        yield server
    finally:
        server.stop()
        host.close()


def test_over_the_cap_a_connection_gets_503_and_no_thread(tmp_path):
    # slots held for as long as the deadline allows (60 s here): nothing else gets a thread
    with standalone(tmp_path, max_connections=CAP, timeout_s=60) as server:
        port = server.port
        slow = [socket.create_connection(("127.0.0.1", port), timeout=15) for _ in range(CAP)]
        try:
            for sock in slow:
                sock.sendall(b"POST /v1/infer HTTP/1.1\r\nHost: localhost\r\n")
            wait_for(lambda: handler_threads() == CAP, 15, what="every slot taken")
            idle = [socket.create_connection(("127.0.0.1", port), timeout=15) for _ in range(50)]
            for sock in idle:
                assert read_all(sock).startswith(b"HTTP/1.1 503 Service Unavailable\r\n")
                sock.close()
            status, headers, body = exchange(port, request("GET", "/v1/health"))
            assert (status, headers["retry-after"]) == (503, "1")
            assert json.loads(body) == {"error": f"busy: {CAP} connections are being served"}
            assert handler_threads() == CAP
            assert server.refused_connections == 51
        finally:
            for sock in slow:
                sock.close()
        wait_for(lambda: exchange(port, request("GET", "/v1/health"))[0] == 200, 15, what="slots free")


def test_the_token_file_in_the_data_dir(tmp_path):
    settings = DeviceSettings(data_dir=tmp_path, api_port=0)
    assert load_api_token(settings) is None
    (tmp_path / "api-token").write_text("from-the-file-0123456789\n")
    assert load_api_token(settings) == "from-the-file-0123456789"
    assert load_api_token(DeviceSettings(data_dir=tmp_path, api_token="env-wins")) == "env-wins"
    (tmp_path / "api-token").write_text("\n")
    with pytest.raises(ApiConfigError, match="api-token is empty"):
        load_api_token(settings)

    (tmp_path / "api-token").write_text("from-the-file-0123456789")
    with standalone(tmp_path / "api", settings) as server:
        assert exchange(server.port, request("GET", "/v1/health", headers=()))[0] == 401
        auth = (("Authorization", "Bearer from-the-file-0123456789"),)
        assert exchange(server.port, request("GET", "/v1/health", headers=auth))[0] == 200
