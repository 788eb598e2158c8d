"""Downloads against a real local HTTP server: resume, caps, deadlines, hashes, 416, auth, TUF API."""

from __future__ import annotations

import errno
import hashlib
import os
import ssl
import time
from pathlib import Path

import pytest
from tuf.api import exceptions as tuf_exc

from device_client.config import DeviceSettings
from device_client.fetcher import (
    DeadlineExceeded,
    HashMismatch,
    HttpSettings,
    HttpxFetcher,
    Interrupted,
    LengthMismatch,
    TooLarge,
    download_resumable,
    url_origin,
)
from tests.helpers.download_server import Behaviour, serve
from tests.helpers.fs import tiny_filesystem

CONTENT = os.urandom(300_000)
SHA = hashlib.sha256(CONTENT).hexdigest()


def dl(url: str, partial: Path, **kw) -> Path:
    args = {
        "expected_length": len(CONTENT),
        "expected_sha256": SHA,
        "max_bytes": 10_000_000,
        "deadline_s": 10.0,
        "http": HttpSettings(read_timeout_s=5.0),
    }
    args.update(kw)
    return download_resumable(url + "/bundle.tar", partial, **args)


def test_plain_download_with_token(tmp_path: Path) -> None:
    b = Behaviour(content=CONTENT, require_token="tok-123")
    with serve(b) as url:
        final = dl(url, tmp_path / "b.tar.partial", http=HttpSettings(token="tok-123"))
    assert final == tmp_path / "b.tar"
    assert final.read_bytes() == CONTENT
    assert not (tmp_path / "b.tar.partial").exists()
    assert b.seen[0]["auth"] == "Bearer tok-123"


def test_the_token_goes_only_to_its_origin(tmp_path: Path) -> None:
    """A device's token is for the fleet server: a static server or CDN holding the bundles (another
    origin) gets the download request without it; the server's own origin (default port spelled
    or not, host in any case) gets it, for the bundle download and for metadata alike."""
    b = Behaviour(content=CONTENT)
    with serve(b) as url:
        elsewhere = HttpSettings(token="tok-1", token_origin="http://fleet.example:80")
        dl(url, tmp_path / "a.tar.partial", http=elsewhere)
        fetcher = HttpxFetcher(elsewhere, deadline_s=5, max_bytes=1_000_000)
        try:
            assert fetcher.download_bytes(url + "/bundle.tar", len(CONTENT)) == CONTENT
        finally:
            fetcher.close()
        dl(url, tmp_path / "b.tar.partial", http=HttpSettings(token="tok-1", token_origin=url_origin(url)))
    assert [s["auth"] for s in b.seen] == [None, None, "Bearer tok-1"]
    assert (
        url_origin("HTTP://Fleet.Example/tuf/")
        == url_origin("http://fleet.example:80/x")
        == ("http://fleet.example:80")
    )
    assert url_origin("https://fleet.example/") == "https://fleet.example:443"
    assert url_origin("https://fleet.example:8443/") != url_origin("https://fleet.example/")


def test_wrong_token_is_an_http_error(tmp_path: Path) -> None:
    with (
        serve(Behaviour(content=CONTENT, require_token="right")) as url,
        pytest.raises(tuf_exc.DownloadHTTPError) as info,
    ):
        dl(url, tmp_path / "b.tar.partial", http=HttpSettings(token="wrong"))
    assert info.value.status_code == 401


def test_resume_after_a_cut(tmp_path: Path) -> None:
    b = Behaviour(content=CONTENT, cut_after=100_000, cuts=1)
    partial = tmp_path / "b.tar.partial"
    with serve(b) as url:
        with pytest.raises(Interrupted):
            dl(url, partial)
        kept = partial.stat().st_size
        assert 0 < kept <= 100_000
        final = dl(url, partial)
    assert final.read_bytes() == CONTENT
    assert b.seen[0]["range"] is None
    assert b.seen[1]["range"] == f"bytes={kept}-"


def test_resume_within_one_call_with_attempts(tmp_path: Path) -> None:
    b = Behaviour(content=CONTENT, cut_after=50_000, cuts=3)
    with serve(b) as url:
        final = dl(url, tmp_path / "b.tar.partial", attempts=5)
    assert final.read_bytes() == CONTENT
    ranges = [s["range"] for s in b.seen]
    assert ranges[0] is None
    assert len(ranges) == 4
    assert all(r is not None and r.startswith("bytes=") for r in ranges[1:])


def test_resume_with_poisoned_prefix_fails_hash_and_deletes(tmp_path: Path) -> None:
    partial = tmp_path / "b.tar.partial"
    partial.write_bytes(b"\0" * 1000)  # not the real first 1000 bytes
    with serve(Behaviour(content=CONTENT)) as url:
        with pytest.raises(HashMismatch):
            dl(url, partial)
        assert not partial.exists()
        assert dl(url, partial).read_bytes() == CONTENT  # the next attempt starts clean


def test_server_ignoring_range_restarts_from_zero(tmp_path: Path) -> None:
    partial = tmp_path / "b.tar.partial"
    partial.write_bytes(CONTENT[:1234])
    b = Behaviour(content=CONTENT, honour_range=False)
    with serve(b) as url:
        final = dl(url, partial)
    assert final.read_bytes() == CONTENT
    assert b.seen[0]["range"] == "bytes=1234-"


def test_416_restarts_from_zero(tmp_path: Path) -> None:
    partial = tmp_path / "b.tar.partial"
    partial.write_bytes(CONTENT[:5000])
    b = Behaviour(content=CONTENT, force_416=1)
    with serve(b) as url:
        final = dl(url, partial)
    assert final.read_bytes() == CONTENT
    assert [s["range"] for s in b.seen] == ["bytes=5000-", None]


def test_complete_partial_is_not_downloaded_again(tmp_path: Path) -> None:
    partial = tmp_path / "b.tar.partial"
    partial.write_bytes(CONTENT)
    b = Behaviour(content=CONTENT)
    with serve(b) as url:
        assert dl(url, partial).read_bytes() == CONTENT
    assert b.seen == []


def test_hash_mismatch(tmp_path: Path) -> None:
    with serve(Behaviour(content=CONTENT)) as url, pytest.raises(HashMismatch):
        dl(url, tmp_path / "b.tar.partial", expected_sha256="0" * 64)
    assert not (tmp_path / "b.tar.partial").exists()
    assert not (tmp_path / "b.tar").exists()


def test_size_cap_before_download(tmp_path: Path) -> None:
    b = Behaviour(content=CONTENT)
    with serve(b) as url, pytest.raises(TooLarge):
        dl(url, tmp_path / "b.tar.partial", max_bytes=1000)
    assert b.seen == []


def test_server_sending_more_than_expected(tmp_path: Path) -> None:
    with serve(Behaviour(content=CONTENT + b"extra")) as url:
        with pytest.raises(TooLarge):
            dl(url, tmp_path / "b.tar.partial")
        with pytest.raises(LengthMismatch):
            dl(url, tmp_path / "c.tar.partial", expected_length=len(CONTENT) + 999)


def test_deadline_on_slow_drip(tmp_path: Path) -> None:
    # 1 KiB every 20 ms would take 6 s; the read timeout (5 s) never fires, the deadline must
    b = Behaviour(content=CONTENT, drip=(1024, 0.02))
    started = time.monotonic()
    with serve(b) as url, pytest.raises(DeadlineExceeded, match="deadline"):
        dl(url, tmp_path / "b.tar.partial", deadline_s=0.4)
    assert time.monotonic() - started < 4.0
    kept = (tmp_path / "b.tar.partial").stat().st_size
    assert 0 < kept < len(CONTENT)  # progress is kept for a later resume


# --------------------------------------------------------------------------- TUF fetcher


def test_tuf_fetcher_download_bytes_with_token() -> None:
    b = Behaviour(content=b"x" * 5000, require_token="t")
    fetcher = HttpxFetcher(HttpSettings(token="t"), deadline_s=5, max_bytes=1_000_000)
    try:
        with serve(b) as url:
            assert fetcher.download_bytes(url + "/1.root.json", 10_000) == b"x" * 5000
            with pytest.raises(tuf_exc.DownloadLengthMismatchError):
                fetcher.download_bytes(url + "/1.root.json", 100)  # ngclient's own max_length
    finally:
        fetcher.close()
    assert b.seen[0]["auth"] == "Bearer t"


def test_tuf_fetcher_cap_and_http_errors() -> None:
    fetcher = HttpxFetcher(deadline_s=5, max_bytes=1000)
    try:
        with serve(Behaviour(content=b"y" * 5000)) as url, pytest.raises(TooLarge):
            fetcher.download_bytes(url + "/big", 1_000_000)
        # without a Content-Length the cap is enforced on the bytes as they arrive
        with (
            serve(Behaviour(content=b"y" * 5000, no_length=True)) as url,
            pytest.raises(TooLarge, match="more than 1000"),
        ):
            fetcher.download_bytes(url + "/big", 1_000_000)
        with serve(Behaviour(status=404)) as url:
            with pytest.raises(tuf_exc.DownloadHTTPError) as info:
                fetcher.download_bytes(url + "/missing", 1000)
            assert info.value.status_code == 404
    finally:
        fetcher.close()


def test_tuf_fetcher_deadline_on_slow_drip() -> None:
    fetcher = HttpxFetcher(HttpSettings(read_timeout_s=5), deadline_s=0.3, max_bytes=1_000_000)
    try:
        with (
            serve(Behaviour(content=b"z" * 100_000, drip=(100, 0.02))) as url,
            pytest.raises(tuf_exc.SlowRetrievalError),
        ):
            fetcher.download_bytes(url + "/slow", 1_000_000)
    finally:
        fetcher.close()


def test_connection_refused_is_a_download_error() -> None:
    fetcher = HttpxFetcher(deadline_s=2)
    try:
        with pytest.raises(tuf_exc.DownloadError):
            fetcher.download_bytes("http://127.0.0.1:9/nothing", 100)
    finally:
        fetcher.close()


def test_http_settings_from_device_settings() -> None:
    s = DeviceSettings(device_token="secret-token", download_read_timeout_s=7)
    http = HttpSettings.from_device_settings(s)
    assert http.headers("http://server.example/tuf/targets/x")["Authorization"] == "Bearer secret-token"
    assert http.read_timeout_s == 7


@pytest.mark.parametrize("status", [500, 502, 503, 504, 429])
def test_transient_server_errors_are_retried_within_the_attempts(tmp_path: Path, status: int) -> None:
    partial = tmp_path / "b.tar.partial"
    partial.write_bytes(CONTENT[:3000])
    b = Behaviour(content=CONTENT, fail_next=1, status_once=status)
    with serve(b) as url:
        final = dl(url, partial, attempts=2)
    assert final.read_bytes() == CONTENT
    assert [s["range"] for s in b.seen] == ["bytes=3000-", "bytes=3000-"]  # the partial was kept


def test_transient_errors_beyond_the_attempts_and_permanent_errors_fail(tmp_path: Path) -> None:
    with serve(Behaviour(content=CONTENT, fail_next=5)) as url, pytest.raises(Interrupted, match="HTTP 503"):
        dl(url, tmp_path / "a.partial", attempts=2)
    b = Behaviour(content=CONTENT, status=404)
    with serve(b) as url, pytest.raises(tuf_exc.DownloadHTTPError, match="HTTP 404"):
        dl(url, tmp_path / "b.partial", attempts=3)
    assert len(b.seen) == 1  # a "no" is not retried


# --------------------------------------------------------------------------- the bundle reader
# The bundle download reads the socket straight into a pool of 1 MiB blocks and hashes and writes
# them on threads of their own; these cover what that changes: spans crossing blocks, resumes in
# the middle of a block, bodies without a Content-Length or chunked, small reads, callbacks, TLS,
# and errors raised on the write thread.

BIG = os.urandom(3 * 1024 * 1024 + 12_345)  # several blocks and a ragged end
BIG_SHA = hashlib.sha256(BIG).hexdigest()


def dl_big(url: str, partial: Path, **kw) -> Path:
    return dl(url, partial, expected_length=len(BIG), expected_sha256=BIG_SHA, **kw)


def test_multi_block_download_and_resume_mid_block(tmp_path: Path) -> None:
    partial = tmp_path / "b.tar.partial"
    cut = 1024 * 1024 + 777_777  # the second attempt starts inside the second block
    b = Behaviour(content=BIG, cut_after=cut, cuts=1)
    with serve(b) as url:
        with pytest.raises(Interrupted, match=r"connection broke: closed .* before the announced end"):
            dl_big(url, partial)
        kept = partial.stat().st_size
        assert 0 < kept <= cut
        assert partial.read_bytes() == BIG[:kept]  # everything received was written, in order
        final = dl_big(url, partial)
    assert final.read_bytes() == BIG
    assert b.seen[1]["range"] == f"bytes={kept}-"


@pytest.mark.parametrize("read_bytes", [1024, 5000, 1024 * 1024])
def test_read_size_bounds_every_read_and_progress_is_monotonic(tmp_path: Path, read_bytes: int) -> None:
    progress: list[int] = []
    partial = tmp_path / "b.tar.partial"
    with serve(Behaviour(content=BIG)) as url:
        final = dl_big(url, partial, read_bytes=read_bytes, on_progress=lambda n, _: progress.append(n))
    assert final.read_bytes() == BIG
    steps = [b - a for a, b in zip([0, *progress], progress, strict=False)]
    assert all(0 < s <= read_bytes for s in steps)
    assert progress[-1] == len(BIG)


def test_on_response_sees_status_and_headers(tmp_path: Path) -> None:
    partial = tmp_path / "b.tar.partial"
    partial.write_bytes(CONTENT[:4096])
    seen: list[tuple[int, str | None]] = []
    with serve(Behaviour(content=CONTENT, fail_next=1)) as url:
        dl(url, partial, attempts=2, on_response=lambda s, h: seen.append((s, h.get("content-range"))))
    assert seen == [(503, None), (206, f"bytes 4096-{len(CONTENT) - 1}/{len(CONTENT)}")]


def test_on_progress_raising_stops_and_keeps_what_arrived(tmp_path: Path) -> None:
    class Stop(Exception):
        pass

    def stop_after_a_megabyte(received: int, total: int) -> None:
        if received >= 1024 * 1024:
            raise Stop

    partial = tmp_path / "b.tar.partial"
    with serve(Behaviour(content=BIG)) as url:
        with pytest.raises(Stop):
            dl_big(url, partial, read_bytes=64 * 1024, on_progress=stop_after_a_megabyte)
        kept = partial.stat().st_size
        assert kept >= 1024 * 1024  # written before the call returned
        assert partial.read_bytes() == BIG[:kept]
        assert dl_big(url, partial).read_bytes() == BIG


def test_body_without_length_is_read_to_the_end_and_capped(tmp_path: Path) -> None:
    with serve(Behaviour(content=BIG, no_length=True)) as url:
        assert dl_big(url, tmp_path / "a.tar.partial").read_bytes() == BIG
    # one byte more than expected, with nothing announced: stopped at the cap and deleted
    with serve(Behaviour(content=BIG + b"!", no_length=True)) as url, pytest.raises(TooLarge):
        dl_big(url, tmp_path / "b.tar.partial")
    assert not (tmp_path / "b.tar.partial").exists()
    assert not (tmp_path / "b.tar").exists()


def test_bytes_beyond_the_declared_length_are_not_read(tmp_path: Path) -> None:
    # Content-Length says the expected size; whatever follows it on the connection is not the body
    with serve(Behaviour(content=CONTENT + b"garbage", fake_length=len(CONTENT))) as url:
        assert dl(url, tmp_path / "b.tar.partial").read_bytes() == CONTENT


def test_partial_response_running_past_the_expected_length_is_capped(tmp_path: Path) -> None:
    partial = tmp_path / "b.tar.partial"
    partial.write_bytes(CONTENT[:1000])
    # a 206 with the right Content-Range whose body (and Content-Length) runs 5 bytes past the end
    b = Behaviour(content=CONTENT, extra=b"extra")
    with serve(b) as url, pytest.raises(TooLarge, match="more than the expected"):
        dl(url, partial)
    assert b.seen[0]["range"] == "bytes=1000-"
    assert not partial.exists()


@pytest.mark.parametrize("chunk", [1000, 200_000])
def test_chunked_body(tmp_path: Path, chunk: int) -> None:
    with serve(Behaviour(content=BIG, chunked=True, chunk=chunk)) as url:
        assert dl_big(url, tmp_path / "b.tar.partial").read_bytes() == BIG
    with serve(Behaviour(content=CONTENT + b"x", chunked=True, chunk=chunk)) as url, pytest.raises(TooLarge):
        dl(url, tmp_path / "c.tar.partial")


def test_chunked_body_cut_resumes(tmp_path: Path) -> None:
    b = Behaviour(content=BIG, chunked=True, cut_after=2_000_000, cuts=1)
    with serve(b) as url:
        final = dl_big(url, tmp_path / "b.tar.partial", attempts=2)
    assert final.read_bytes() == BIG
    assert b.seen[1]["range"] is not None


def test_stall_beyond_the_read_timeout_is_an_interruption(tmp_path: Path) -> None:
    partial = tmp_path / "b.tar.partial"
    b = Behaviour(content=CONTENT, drip=(50_000, 1.0))  # 50 kB, then a second of silence
    with serve(b) as url, pytest.raises(Interrupted, match="stalled"):
        dl(url, partial, http=HttpSettings(read_timeout_s=0.3))
    assert partial.read_bytes() == CONTENT[: partial.stat().st_size]
    assert partial.stat().st_size >= 50_000


def test_bad_urls_are_download_errors(tmp_path: Path) -> None:
    for url in ("ftp://127.0.0.1", "http://127.0.0.1:99999"):
        with pytest.raises(tuf_exc.DownloadError) as info:
            dl(url, tmp_path / "b.tar.partial", attempts=3)
        assert not isinstance(info.value, Interrupted)  # nothing a retry could change
    assert not (tmp_path / "b.tar.partial").exists()


def test_connection_refused_is_retried_within_the_attempts(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="device_client.fetcher")
    with pytest.raises(Interrupted, match="connection failed: ConnectionRefusedError"):
        dl("http://127.0.0.1:9", tmp_path / "b.tar.partial", attempts=3)
    assert "resuming (attempt 3)" in caplog.text
    assert not (tmp_path / "b.tar.partial").exists()


def test_connection_dropped_before_the_headers_is_resumed(tmp_path: Path) -> None:
    b = Behaviour(content=CONTENT, drop_next=2)
    with serve(b) as url:
        with pytest.raises(Interrupted, match="connection failed"):
            dl(url, tmp_path / "a.tar.partial", attempts=1)
        final = dl(url, tmp_path / "b.tar.partial", attempts=2)
    assert final.read_bytes() == CONTENT
    assert len(b.seen) == 3


def test_no_status_line_within_the_read_timeout_is_resumed(tmp_path: Path) -> None:
    b = Behaviour(content=CONTENT, stall_next=1, stall_s=1.0)
    with serve(b) as url:
        final = dl(url, tmp_path / "b.tar.partial", attempts=2, http=HttpSettings(read_timeout_s=0.3))
    assert final.read_bytes() == CONTENT
    assert len(b.seen) == 2


@pytest.mark.parametrize("mib", [3, 9])
def test_disk_full_on_the_write_thread_raises_enospc(tmp_path: Path, mib: int) -> None:
    # 3 MiB: the failed write thread's error is raised when the body is complete; 9 MiB: the
    # receiver runs out of blocks first and gets it while waiting for one (it does not hang)
    content = os.urandom(mib * 1024 * 1024)
    with tiny_filesystem(tmp_path / "small", "1m") as small, serve(Behaviour(content=content)) as url:
        partial = small / "b.tar.partial"
        with pytest.raises(OSError) as info:
            download_resumable(
                url + "/bundle.tar",
                partial,
                expected_length=len(content),
                expected_sha256=hashlib.sha256(content).hexdigest(),
                max_bytes=len(content),
                deadline_s=30,
                attempts=3,
            )
        assert info.value.errno == errno.ENOSPC
        assert not isinstance(info.value, tuf_exc.DownloadError)  # the daemon reports disk_full
        kept = partial.stat().st_size
        assert 0 < kept < len(content)
        assert partial.read_bytes() == content[:kept]
        assert not (small / "b.tar").exists()


# --------------------------------------------------------------------------- TLS


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A fleet CA, a server certificate for 127.0.0.1 and a device client certificate."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509 import load_pem_x509_csr

    from server.trust.pki import FleetCA
    from tests.helpers.pki import key_pem, make_csr

    root = tmp_path_factory.mktemp("pki")
    ca = FleetCA(root / "ca")
    server_key = ec.generate_private_key(ec.SECP256R1())
    server_cert = ca.issue_server(server_key.public_key(), "test server", ["localhost"], ["127.0.0.1"])
    csr_pem, device_key = make_csr("dev-1")
    device_cert = ca.issue_client(load_pem_x509_csr(csr_pem.encode()), "dev-1", days=1)
    other = FleetCA(root / "other")  # a CA the device does not trust
    files = {
        "ca": (root / "ca.pem", ca.cert_pem.encode()),
        "other_ca": (root / "other.pem", other.cert_pem.encode()),
        "server_cert": (root / "server.pem", server_cert.public_bytes(serialization.Encoding.PEM)),
        "server_key": (root / "server.key", key_pem(server_key)),
        "device_cert": (root / "device.pem", device_cert.public_bytes(serialization.Encoding.PEM)),
        "device_key": (root / "device.key", key_pem(device_key)),
    }
    for path, data in files.values():
        path.write_bytes(data)
    return {name: path for name, (path, _) in files.items()}


def server_tls(pki: dict[str, Path], *, require_client_cert: bool = False) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(pki["server_cert"], pki["server_key"])
    if require_client_cert:
        ctx.load_verify_locations(pki["ca"])
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def test_https_with_the_fleet_ca_and_a_client_certificate(tmp_path: Path, pki: dict[str, Path]) -> None:
    http = HttpSettings(
        token="tok", ca_cert=pki["ca"], client_cert=pki["device_cert"], client_key=pki["device_key"]
    )
    b = Behaviour(content=BIG, require_token="tok", cut_after=1_500_000, cuts=1)
    with serve(b, tls=server_tls(pki, require_client_cert=True)) as url:
        assert url.startswith("https://")
        final = dl_big(url, tmp_path / "b.tar.partial", http=http, attempts=2)
    assert final.read_bytes() == BIG
    assert [s["range"] is not None for s in b.seen] == [False, True]


def test_https_refuses_a_server_outside_the_fleet_ca(tmp_path: Path, pki: dict[str, Path]) -> None:
    b = Behaviour(content=CONTENT)
    with serve(b, tls=server_tls(pki)) as url:
        with pytest.raises(tuf_exc.DownloadError, match="CERTIFICATE_VERIFY_FAILED"):
            dl(url, tmp_path / "a.tar.partial", http=HttpSettings(ca_cert=pki["other_ca"]))
        # without a fleet CA, the public CAs (certifi, as httpx) do not vouch for it either
        with pytest.raises(tuf_exc.DownloadError, match="CERTIFICATE_VERIFY_FAILED"):
            dl(url, tmp_path / "b.tar.partial")
    assert b.seen == []
    assert not (tmp_path / "a.tar").exists()
