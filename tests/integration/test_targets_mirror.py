"""Bundles served by a plain static server (``FLEET_TARGETS_URL``), as a CDN would: the server's
``repository/targets`` directory as is, no token, no Range support. A real daemon enrolls, learns
the mirror's URL, downloads its bundle there (never sending its device token), verifies it
against the server's TUF metadata and serves it."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from device_client.daemon import Daemon
from tests.helpers.device_fleet import (
    assign,
    device_settings,
    enroll_device,
    infer,
    outcome_for,
    push_model,
)
from tests.helpers.onnx_models import make_model, reference_output

pytestmark = pytest.mark.mqtt


@dataclass
class Mirror:
    url: str
    #: (path, Authorization header) of every GET
    seen: list[tuple[str, str | None]] = field(default_factory=list)


@pytest.fixture
def mirror(mqtt_settings) -> Iterator[Mirror]:
    targets = Path(mqtt_settings.repo_dir) / "targets"
    targets.mkdir(parents=True, exist_ok=True)
    seen: list[tuple[str, str | None]] = []

    class Handler(SimpleHTTPRequestHandler):
        def do_GET(self) -> None:
            seen.append((self.path, self.headers.get("Authorization")))
            super().do_GET()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(Handler, directory=str(targets)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield Mirror(f"http://127.0.0.1:{server.server_address[1]}/", seen)
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def live_settings(live_settings, mirror):
    return live_settings.model_copy(update={"targets_url": mirror.url})


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_device_installs_a_bundle_from_a_static_mirror_without_its_token(live_server, mirror, tmp_path):
    live = live_server
    ident = enroll_device(live, tmp_path / "dev", "edge-cdn")
    assert ident.tuf_targets_url == mirror.url
    assert ident.tuf_metadata_url.startswith(live.url)
    push_model(live, "clf", "1.0.0", make_model(tmp_path / "v1.onnx", scale=3.0))
    daemon = Daemon(device_settings(tmp_path / "dev")).start()
    try:
        seq = assign(live, "edge-cdn", "clf", "1.0.0", probation={"seconds": 0.3, "min_requests": 0})["seq"]
        assert outcome_for(live, "edge-cdn", seq)["phase"] == "succeeded"
        x = np.random.default_rng(1).random((2, 4), dtype=np.float32)
        status, body = infer(daemon.api.url, x)
        assert (status, body["version"]) == (200, "1.0.0")
        np.testing.assert_allclose(body["outputs"]["y"], reference_output(x, scale=3.0), rtol=1e-5)
    finally:
        daemon.stop()
    bundles = [(p, a) for p, a in mirror.seen if p.endswith(".bundle.tar")]
    assert bundles, mirror.seen  # the bundle came from the mirror, by its consistent-snapshot name
    assert all(a is None for _, a in mirror.seen)  # and the device token stayed home
