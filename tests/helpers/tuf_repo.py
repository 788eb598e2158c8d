"""An ImageRepository on real files for tests, with an injected :class:`Clock`, and two ways for a
real ``tuf.ngclient.Updater`` to read it: straight from its directory (:func:`updater_for`) or over
real HTTP (:func:`serve_dir`)."""

from __future__ import annotations

import contextlib
import functools
import json
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from tuf.api import exceptions as tuf_exc
from tuf.ngclient import FetcherInterface, Updater

from server.trust.repository import ImageRepository

BASE = "http://repo.test"


class DirFetcher(FetcherInterface):
    """Serves ``BASE/<relative path>`` straight from the repository directory."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.urls: list[str] = []

    def _fetch(self, url: str) -> Iterator[bytes]:
        self.urls.append(url)
        assert url.startswith(BASE + "/")
        path = self.root / url[len(BASE) + 1 :]
        if not path.is_file():
            raise tuf_exc.DownloadHTTPError(f"404 {url}", 404)
        return iter([path.read_bytes()])


class Clock:
    """A clock the test sets: the repository reads ``now`` for every expiry."""

    def __init__(self) -> None:
        self.now = datetime(2030, 1, 1, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now


def make_repo(tmp_path: Path, clock: Clock | None = None, **kw) -> ImageRepository:
    """An initialised repository under ``tmp_path`` (repo/, keys/); ``kw`` overrides the expiries."""
    expiry = {
        "root_expiry_s": 365 * 86400,
        "targets_expiry_s": 90 * 86400,
        "snapshot_expiry_s": 7 * 86400,
        "timestamp_expiry_s": 86400,
    }
    expiry.update(kw)
    repo = ImageRepository(tmp_path / "repo", tmp_path / "keys", clock=clock or Clock(), **expiry)
    repo.initialize()
    return repo


def updater_for(repo: ImageRepository, tmp_path: Path, name: str = "client") -> Updater:
    """A fresh ngclient that trusts ``repo``'s current root (written as root.json)."""
    client_dir = tmp_path / name
    (client_dir / "targets").mkdir(parents=True, exist_ok=True)
    (client_dir / "root.json").write_text(json.dumps(repo.trusted_root()))
    return Updater(
        metadata_dir=str(client_dir),
        metadata_base_url=f"{BASE}/metadata/",
        target_dir=str(client_dir / "targets"),
        target_base_url=f"{BASE}/targets/",
        fetcher=DirFetcher(repo.repo_dir),
        bootstrap=None,
    )


def bundle(tmp_path: Path, name: str, content: bytes) -> Path:
    """A target file of ``content`` to publish."""
    path = tmp_path / "in" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return path


#: the custom fields of a published model target
CUSTOM = {"model": "resnet", "version": "1.2.0", "release": 1, "variant": "default", "constraints": {}}


@contextlib.contextmanager
def serve_dir(root: Path) -> Iterator[str]:
    """Serve ``root`` over HTTP on a free loopback port; yields the base URL."""
    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
