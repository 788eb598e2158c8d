"""A device's view of the app's TUF repository in tests: enroll a device through the API and run a
real ``tuf.ngclient.Updater`` over the app's TestClient with its device token."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from tuf.api import exceptions as tuf_exc
from tuf.ngclient import FetcherInterface, Updater

from tests.helpers.catalog import auth
from tests.helpers.pki import HARDWARE, make_csr


class TestClientFetcher(FetcherInterface):
    """ngclient's network layer over the app's TestClient, sending the device token."""

    __test__ = False  # not a test class

    def __init__(self, client, headers: dict[str, str]) -> None:
        self.client = client
        self.headers = headers
        self.urls: list[str] = []

    def _fetch(self, url: str) -> Iterator[bytes]:
        self.urls.append(url)
        r = self.client.get(url, headers=self.headers)
        if r.status_code != 200:
            raise tuf_exc.DownloadHTTPError(f"HTTP {r.status_code} for {url}", r.status_code)
        return iter([r.content])


def enroll_device(client, admin_headers, device_id: str) -> dict:
    r = client.post("/api/v1/enroll-tokens", json={}, headers=admin_headers)
    assert r.status_code == 201, r.text
    csr, _ = make_csr(device_id)
    r = client.post("/api/v1/enroll", json={"token": r.json()["token"], "csr_pem": csr, "hardware": HARDWARE})
    assert r.status_code == 201, r.text
    return r.json()


def target_url(art: dict) -> str:
    parent, _, name = art["target_path"].rpartition("/")
    return f"/tuf/targets/{parent}/{art['sha256']}.{name}"


def updater(
    client, device: dict, workdir: Path, root: dict | None = None
) -> tuple[Updater, TestClientFetcher]:
    (workdir / "targets").mkdir(parents=True, exist_ok=True)
    (workdir / "root.json").write_text(json.dumps(root or device["tuf_root"]))
    fetcher = TestClientFetcher(client, auth(device["device_token"]))
    up = Updater(
        metadata_dir=str(workdir),
        metadata_base_url=device["tuf_metadata_url"],
        target_dir=str(workdir / "targets"),
        target_base_url=device["tuf_targets_url"],
        fetcher=fetcher,
        bootstrap=None,
    )
    return up, fetcher
