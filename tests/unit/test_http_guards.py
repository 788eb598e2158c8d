"""The pure parts of the HTTP guards: token buckets, client keys, route caps, conditional GETs of
the CRL, fingerprint spelling."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from device_client.tlstrust import InsecureServerUrl, normalize_fingerprint, require_https
from server.config import Settings
from server.devices.crl import CrlDocument
from server.http.bodylimit import body_limits
from server.http.ratelimit import TokenBucket, client_key


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_token_bucket_allows_a_burst_then_the_rate():
    clock = Clock()
    bucket = TokenBucket(2.0, 3, clock=clock)
    assert [bucket.take("a") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.take("a") == pytest.approx(0.5)  # empty: one token in 1/rate s
    assert bucket.take("b") == 0.0  # every key its own bucket
    clock.now += 0.5
    assert bucket.take("a") == 0.0
    assert bucket.take("a") == pytest.approx(0.5)  # a refused request spends nothing
    clock.now += 60
    assert [bucket.take("a") for _ in range(4)][-1] > 0  # refilled to the burst, not beyond


def test_token_bucket_forgets_the_least_recently_used_beyond_its_capacity():
    clock = Clock()
    bucket = TokenBucket(0.001, 1, max_clients=2, clock=clock)
    for key in ("a", "b", "c"):
        assert bucket.take(key) == 0.0
    assert bucket.take("c") > 0
    assert bucket.take("b") > 0
    assert bucket.take("a") == 0.0  # "a" was forgotten: a full bucket again


@pytest.mark.parametrize(
    ("client", "key"),
    [
        (("192.0.2.7", 1), "192.0.2.7"),
        (("2001:db8:1:2:3:4:5:6", 1), "2001:db8:1:2::/64"),
        (("2001:db8:1:2:ffff::1", 1), "2001:db8:1:2::/64"),
        (("::ffff:192.0.2.7", 1), "192.0.2.7"),
        (("testclient", 1), "testclient"),
        (None, "unknown"),
    ],
)
def test_client_keys(client, key):
    assert client_key({"client": client}) == key


def test_body_caps_by_route(tmp_path):
    limits = body_limits(Settings(data_dir=tmp_path, max_upload_bytes=2048))
    assert limits.for_request("POST", "/api/v1/models/det/versions") == (2048, "FLEET_MAX_UPLOAD_BYTES")
    assert limits.for_request("POST", "/api/v1/enroll/bulk") == (8 * 1024**2, "FLEET_MAX_BULK_ENROLL_BYTES")
    assert limits.for_request("PUT", "/api/v1/repository/targets")[1] == "FLEET_MAX_SIGNED_METADATA_BYTES"
    for method, path in [
        ("POST", "/api/v1/enroll"),
        ("POST", "/api/v1/models/det/versions/extra"),
        ("PUT", "/api/v1/models/det/versions"),
        ("POST", "/api/v1/repository/targets"),
    ]:
        assert limits.for_request(method, path) == (1024**2, "FLEET_MAX_BODY_BYTES")


def test_crl_conditional_get():
    doc = CrlDocument(b"pem", '"abc"', datetime(2030, 1, 2, 3, 4, 5, 600, tzinfo=UTC), None)
    assert doc.headers()["Last-Modified"] == "Wed, 02 Jan 2030 03:04:05 GMT"
    assert doc.not_modified('"abc"', None)
    assert doc.not_modified('"x", W/"abc"', None)
    assert doc.not_modified("*", None)
    assert not doc.not_modified('"x"', "Wed, 02 Jan 2030 03:04:05 GMT")  # If-None-Match wins
    assert doc.not_modified(None, "Wed, 02 Jan 2030 03:04:05 GMT")
    assert not doc.not_modified(None, "Wed, 02 Jan 2030 03:04:04 GMT")
    assert not doc.not_modified(None, "yesterday")
    assert not doc.not_modified(None, None)


def test_fingerprints_and_server_urls():
    hex64 = "ab" * 32
    assert normalize_fingerprint(hex64.upper()) == hex64
    assert normalize_fingerprint(":".join(["AB"] * 32)) == hex64
    assert normalize_fingerprint(f"sha256:{hex64}") == hex64
    assert normalize_fingerprint("SHA256 Fingerprint=" + ":".join(["AB"] * 32)) == hex64
    for bad in ("ab" * 31, "zz" * 32, ""):
        with pytest.raises(ValueError, match="is not a SHA-256 fingerprint"):
            normalize_fingerprint(bad)
    require_https("https://fleet.example")
    require_https("http://127.0.0.1:8080", insecure_http=True)
    for url in ("http://fleet.example", "ftp://fleet.example", "fleet.example"):
        with pytest.raises(InsecureServerUrl):
            require_https(url)
