"""Downloads against a real local HTTP server: resume, caps, deadlines, hashes, 416, auth, TUF API."""

from __future__ import annotations

import hashlib
import os
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
)
from tests.device_client.http_server import Behaviour, serve

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
    assert http.headers()["Authorization"] == "Bearer secret-token"
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
