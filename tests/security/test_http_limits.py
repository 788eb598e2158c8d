"""Attacks on the API's resources before authentication: oversized bodies, floods of anonymous
requests, costly CSRs, and re-signing the CRL on every request.

protection: ``server/http/bodylimit.py`` (per-route body caps checked on ``Content-Length`` before
a byte is read and counted while streaming), ``server/http/ratelimit.py`` (token bucket per client
address on enrollment and the CRL; ``X-Forwarded-For`` only from ``FLEET_FORWARDED_ALLOW_IPS``),
``DeviceService.enroll`` (the enrollment token before the CSR), ``server.trust.pki.parse_csr`` (key
size and RSA exponent bounded before the signature is checked), ``server/devices/crl.py`` (the
scheduled CRL served as is, with ETag / Last-Modified / 304).
"""

from __future__ import annotations

import json
import math
import socket
from collections.abc import Iterator

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import rsa
from fastapi.testclient import TestClient

from server.app import create_app
from server.errors import Invalid
from server.mqtt.broker import free_port
from server.runner import ServerThread
from server.trust.pki import check_public_key
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
        wait = int(r.headers["retry-after"])  # one token at 0.01/s: 100 s less the time gone by
        assert 90 <= wait <= 100
        assert r.json() == {
            "detail": f"too many enrollment requests from this address; retry in {wait} s",
            "code": "rate_limited",
        }
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


def _rsa_key_with_exponent(e: int) -> rsa.RSAPrivateKey:
    """A 2048-bit RSA key with public exponent ``e`` (or the next odd one coprime to lambda(n))."""
    base = rsa.generate_private_key(65537, 2048).private_numbers()
    p, q = base.p, base.q
    lam = (p - 1) * (q - 1) // math.gcd(p - 1, q - 1)
    while math.gcd(e, lam) != 1:
        e += 2
    d = pow(e, -1, lam)
    numbers = rsa.RSAPrivateNumbers(
        p, q, d, rsa.rsa_crt_dmp1(d, p), rsa.rsa_crt_dmq1(d, q), rsa.rsa_crt_iqmp(p, q),
        rsa.RSAPublicNumbers(e, p * q),
    )  # fmt: skip
    return numbers.private_key(unsafe_skip_rsa_key_validation=True)


def test_rsa_keys_are_bounded_in_size_and_exponent():
    """Verifying a signature costs with the modulus and the exponent: both are capped."""
    big = rsa.RSAPublicNumbers(65537, (1 << 8199) | 1).public_key()  # 8200 bits
    with pytest.raises(Invalid, match=r"RSA key of 8200 bits is too large \(maximum 8192\)"):
        check_public_key(big)
    for e in (2**32 + 1, 2**64 + 1):  # (cryptography itself refuses even ones and 1)
        key = rsa.RSAPublicNumbers(e, (1 << 2047) | 1).public_key()
        with pytest.raises(Invalid, match="RSA public exponent is not accepted"):
            check_public_key(key)
    check_public_key(rsa.RSAPublicNumbers(65537, (1 << 8191) | 1).public_key())


def test_the_enrollment_token_is_checked_before_the_csr(app_client, admin_headers):
    """Without a valid token the CSR is never parsed; with one, an RSA exponent of 2^40 and more
    (whose verification costs grow with it) is refused before its signature is checked."""
    csr, _ = make_csr("big-exponent", _rsa_key_with_exponent(2**40 + 1))
    body = {"token": "fe.nothere.AAAAAAAAAAAAAAAAAAAAAAAA", "csr_pem": csr, "hardware": HARDWARE}
    r = app_client.post("/api/v1/enroll", json=body)
    assert (r.status_code, r.json()["detail"]) == (401, "unknown enrollment token")
    r = app_client.post("/api/v1/enroll", json={**body, "csr_pem": "-----BEGIN nonsense" + "x" * 64})
    assert (r.status_code, r.json()["detail"]) == (401, "unknown enrollment token")
    token = enroll_token(app_client, admin_headers)
    r = app_client.post("/api/v1/enroll", json={**body, "token": token})
    assert (r.status_code, r.json()["detail"]) == (
        422, "RSA public exponent is not accepted (use 65537; an odd number below 2^32)"
    )  # fmt: skip
    good, _ = make_csr("fine-after-all")  # and the refused CSR did not use the token up
    r = app_client.post("/api/v1/enroll", json={**body, "token": token, "csr_pem": good})
    assert r.status_code == 201, r.text


def test_the_crl_is_served_as_issued_with_caching_headers(app_client, admin_headers):
    """The CRL is not signed per request (ECDSA signatures differ every time: two answers are the
    same bytes), answers conditional GETs with 304, and changes with a decommission."""
    first = app_client.get("/api/v1/pki/crl.pem")
    second = app_client.get("/api/v1/pki/crl.pem")
    assert first.status_code == second.status_code == 200
    assert first.content == second.content
    etag = first.headers["etag"]
    assert first.headers["cache-control"] == "public, max-age=60"
    crl = x509.load_pem_x509_crl(first.content)
    assert first.headers["last-modified"] == crl.last_update_utc.strftime("%a, %d %b %Y %H:%M:%S GMT")

    r = app_client.get("/api/v1/pki/crl.pem", headers={"If-None-Match": etag})
    assert (r.status_code, r.content, r.headers["etag"]) == (304, b"", etag)
    r = app_client.get("/api/v1/pki/crl.pem", headers={"If-Modified-Since": first.headers["last-modified"]})
    assert r.status_code == 304

    token = enroll_token(app_client, admin_headers)
    csr, _ = make_csr("to-retire")
    serial = app_client.post(
        "/api/v1/enroll", json={"token": token, "csr_pem": csr, "hardware": HARDWARE}
    ).json()["certificate_pem"]
    serial = x509.load_pem_x509_certificate(serial.encode()).serial_number
    assert app_client.post("/api/v1/devices/to-retire/decommission", headers=admin_headers).status_code == 200
    r = app_client.get("/api/v1/pki/crl.pem", headers={"If-None-Match": etag})
    assert r.status_code == 200
    assert r.headers["etag"] != etag
    assert [e.serial_number for e in x509.load_pem_x509_crl(r.content)] == [serial]
