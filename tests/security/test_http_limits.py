"""Attacks on the API's resources before authentication: oversized bodies and floods of anonymous
requests.

protection: ``server/http/bodylimit.py`` (per-route body caps checked on ``Content-Length`` before
a byte is read and counted while streaming), ``server/http/ratelimit.py`` (token bucket per client
address on enrollment and the CRL; ``X-Forwarded-For`` only from ``FLEET_FORWARDED_ALLOW_IPS``).
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator

import httpx
import pytest
from fastapi.testclient import TestClient

from server.app import create_app
from server.mqtt.broker import free_port
from server.runner import ServerThread
from tests.helpers.pki import HARDWARE, make_csr

MIB = 1024 * 1024


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def enroll_token(client, headers, uses: int = 1) -> str:
    r = client.post("/api/v1/enroll-tokens", json={"uses": uses}, headers=headers)
    assert r.status_code == 201, r.text
    return r.json()["token"]


def _padded_json(doc: dict, size: int) -> bytes:
    """``doc`` as JSON followed by whitespace up to ``size`` bytes (still valid JSON)."""
    body = json.dumps(doc).encode()
    return body + b" " * (size - len(body))


def _chunks(total: int, chunk: int = 64 * 1024) -> Iterator[bytes]:
    """A body of ``total`` bytes sent without Content-Length (chunked)."""
    yield b'{"token": "'
    sent = 11
    while sent < total:
        yield b"a" * chunk
        sent += chunk
    yield b'"}'


@pytest.fixture
def live(settings) -> Iterator[ServerThread]:
    port = free_port()
    server = ServerThread(
        settings.model_copy(update={"host": "127.0.0.1", "port": port, "public_url": f"http://127.0.0.1:{port}"})
    ).start()
    yield server
    server.stop()


def test_an_announced_huge_body_is_refused_before_it_is_sent(live):
    """4 GiB announced on the anonymous enrollment: 413 comes back while not one byte of the body
    has been sent (without the cap the server sits waiting for the body)."""
    with socket.create_connection(("127.0.0.1", live.settings.port), timeout=10) as sock:
        sock.sendall(
            b"POST /api/v1/enroll HTTP/1.1\r\nHost: fleet\r\nContent-Type: application/json\r\n"
            b"Content-Length: 4294967296\r\n\r\n"
        )
        reply = b""
        while b"\r\n\r\n" not in reply or not reply.rstrip().endswith(b"}"):
            data = sock.recv(65536)
            if not data:
                break
            reply += data
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413 "), head
    assert json.loads(body) == {
        "detail": "request body exceeds the limit of 1048576 bytes for this route (FLEET_MAX_BODY_BYTES)",
        "code": "too_large",
    }


def test_streamed_bodies_are_cut_off_at_the_cap_on_every_json_route(app_client, make_token):
    """No Content-Length (chunked): counted while streaming; 413 whether or not a token comes
    along, since FastAPI reads a JSON body before it authenticates."""
    operator = bearer(make_token("operator"))
    for method, path, headers in [
        ("POST", "/api/v1/enroll", {}),
        ("POST", "/api/v1/rollouts", {}),
        ("POST", "/api/v1/rollouts", operator),
        ("PATCH", "/api/v1/devices/dev-1/tags", operator),
        ("POST", "/api/v1/enroll/bulk", {}),
    ]:
        limit = 8 * MIB if path.endswith("/bulk") else MIB
        headers = {**headers, "Content-Type": "application/json"}
        r = app_client.request(method, path, content=_chunks(limit + MIB), headers=headers)
        assert r.status_code == 413, (method, path, r.text)
        assert r.json()["code"] == "too_large"
        assert f"exceeds the limit of {limit} bytes" in r.json()["detail"]


def test_each_route_has_its_own_cap(app_client, make_token):
    """Bulk enrollment takes more than the 1 MiB of other JSON bodies (1,000 CSRs), a model push
    more still (FLEET_MAX_UPLOAD_BYTES); a body above a route's cap is refused by its length."""
    operator = bearer(make_token("operator"))
    item = {"csr_pem": make_csr("bulk-1")[0], "hardware": HARDWARE}
    bulk = {"token": "fe.nothere.AAAAAAAAAAAAAAAAAAAAAAAA", "devices": [item]}
    json_headers = {**operator, "Content-Type": "application/json"}
    r = app_client.post("/api/v1/enroll/bulk", content=_padded_json(bulk, 2 * MIB), headers=json_headers)
    assert (r.status_code, r.json()["detail"]) == (401, "unknown enrollment token")  # read and parsed
    r = app_client.post("/api/v1/enroll/bulk", content=_padded_json(bulk, 9 * MIB), headers=json_headers)
    assert r.status_code == 413
    assert r.json()["detail"] == (
        "request body exceeds the limit of 8388608 bytes for this route (FLEET_MAX_BULK_ENROLL_BYTES)"
    )
    r = app_client.post("/api/v1/rollouts", content=_padded_json({}, 2 * MIB), headers=json_headers)
    assert r.status_code == 413
    assert "(FLEET_MAX_BODY_BYTES)" in r.json()["detail"]
    # a 2 MiB push passes the cap (and is refused for what it is: not an ONNX model)
    r = app_client.post(
        "/api/v1/models/m/versions", data={"version": "1.0.0"}, files={"file": ("m.onnx", b"\0" * (2 * MIB))},
        headers=operator,
    )  # fmt: skip
    assert r.status_code == 422, r.text


def _rate_limited_client(settings, **limits) -> TestClient:
    return TestClient(create_app(settings.model_copy(update=limits)), client=("198.51.100.7", 40000))


def test_anonymous_enrollment_and_crl_are_rate_limited_per_client_address(settings):
    csr, _ = make_csr("dev-1")
    bogus = {"token": "fe.nothere.AAAAAAAAAAAAAAAAAAAAAAAA", "csr_pem": csr, "hardware": HARDWARE}
    limits = {"enroll_rate_per_s": 0.01, "enroll_rate_burst": 3, "crl_rate_per_s": 0.01, "crl_rate_burst": 2}
    with _rate_limited_client(settings, **limits) as client:
        for _ in range(3):
            assert client.post("/api/v1/enroll", json=bogus).status_code == 401
        r = client.post("/api/v1/enroll", json=bogus)
        assert r.status_code == 429
        assert r.json() == {
            "detail": "too many enrollment requests from this address; retry in 100 s",
            "code": "rate_limited",
        }
        assert r.headers["retry-after"] == "100"
        # a refused request is not read at all: even an oversized one gets the 429
        assert client.post("/api/v1/enroll", content=b"x" * (2 * MIB)).status_code == 429
        for _ in range(2):
            assert client.get("/api/v1/pki/crl.pem").status_code == 200
        r = client.get("/api/v1/pki/crl.pem")
        assert (r.status_code, r.json()["code"]) == (429, "rate_limited")
        assert "too many CRL requests" in r.json()["detail"]
        # another address has buckets of its own; authenticated endpoints are not limited
        other = TestClient(client.app, client=("198.51.100.8", 40000))
        assert other.post("/api/v1/enroll", json=bogus).status_code == 401
        assert other.get("/api/v1/pki/crl.pem").status_code == 200
        assert client.get("/api/v1/pki/ca.pem").status_code == 200


@pytest.mark.parametrize(
    ("allow", "separate"), [("127.0.0.1", True), ("", False)], ids=["trusted-proxy", "no-proxy"]
)
def test_x_forwarded_for_counts_only_from_a_trusted_proxy(settings, allow, separate):
    """Behind a proxy in FLEET_FORWARDED_ALLOW_IPS each forwarded client has its own bucket; from
    anyone else the header is ignored, so forging it does not buy a fresh bucket."""
    port = free_port()
    live = ServerThread(
        settings.model_copy(update={
            "host": "127.0.0.1", "port": port, "public_url": f"http://127.0.0.1:{port}",
            "crl_rate_per_s": 0.01, "crl_rate_burst": 1, "forwarded_allow_ips": allow,
        })
    ).start()  # fmt: skip
    try:
        url = f"{live.url}/api/v1/pki/crl.pem"
        first = httpx.get(url, headers={"X-Forwarded-For": "203.0.113.1"}, timeout=10)
        second = httpx.get(url, headers={"X-Forwarded-For": "203.0.113.2"}, timeout=10)
        assert first.status_code == 200
        assert second.status_code == (200 if separate else 429)
    finally:
        live.stop()
