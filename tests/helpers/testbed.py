"""A device under attack: a real daemon, a real Mosquitto, a real python-tuf image repository, and
an HTTP mirror that the attacker controls.

The mirror serves the repository's ``metadata/`` and ``targets/`` exactly like the server's
``/tuf`` routes, except where a test tells it to lie (:meth:`Mirror.lie`): other bytes for a path,
a false ``Content-Length`` or none at all, a slow drip. That is the network attacker (or a
compromised server / CDN) of the trust model (docs/architecture.md). The director key and the
repository keys are the real ones unless a test signs with a foreign key, so "a stolen online key"
attacks are real too.

The control server is not needed here: desired states are published on the device's topic with
the server's own MQTT identity and reports are read from the device's report topic, which keeps a
testbed cheap (one per test module, see :func:`running_testbed`).
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import paho.mqtt.client as mqtt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from device_client.daemon import Daemon
from device_client.enroll import Identity
from device_client.protocol import DesiredState
from device_client.protocol.messages import utcnow
from device_client.protocol.signing import public_key_to_pem, sign_envelope
from server.mqtt.broker import issue_client_files
from server.trust.keys import atomic_write
from server.trust.pki import FleetCA
from server.trust.repository import ImageRepository
from tests.helpers.bundles import make_bundle
from tests.helpers.device_fleet import device_settings, wait_for
from tests.helpers.mosquitto import Broker, start_broker

QUICK = {"seconds": 0.2, "min_requests": 0}
X = np.random.default_rng(7).random((1, 4), dtype=np.float32)
DEVICE_ID = "edge-sec"


# --------------------------------------------------------------------------- the mirror


@dataclass
class Lie:
    """What the mirror answers for one path instead of the truth."""

    body: bytes | None = None  # None: the real file
    #: announced Content-Length; None: the true length of ``body``; -1: none (close-delimited)
    length: int | None = None
    drip: tuple[int, float] | None = None  # (bytes per write, seconds between writes)


@dataclass
class Mirror:
    root: Path
    lies: dict[str, Lie] = field(default_factory=dict)
    requests: list[str] = field(default_factory=list)
    url: str = ""

    def lie(self, path: str, **kw: Any) -> None:
        self.lies["/" + path.lstrip("/")] = Lie(**kw)

    def truth(self) -> None:
        self.lies.clear()


def _mirror_handler(m: Mirror) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            m.requests.append(path)
            lie = m.lies.get(path, Lie())
            body = lie.body
            if body is None:
                file = (m.root / path.lstrip("/")).resolve()
                if not file.is_relative_to(m.root.resolve()) or not file.is_file():
                    return self._send(404, b"not found")
                body = file.read_bytes()
            self._send(200, body, lie)

        def _send(self, status: int, body: bytes, lie: Lie | None = None) -> None:
            lie = lie or Lie()
            self.send_response(status)
            if lie.length == -1:
                self.send_header("Connection", "close")
                self.close_connection = True
            else:
                self.send_header("Content-Length", str(len(body) if lie.length is None else lie.length))
            self.end_headers()
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                if lie.drip is None:
                    self.wfile.write(body)
                else:
                    step, pause = lie.drip
                    for i in range(0, len(body), step):
                        self.wfile.write(body[i : i + step])
                        self.wfile.flush()
                        time.sleep(pause)
            if lie.length is not None:
                self.close_connection = True

    return Handler


@contextlib.contextmanager
def serve_mirror(root: Path) -> Iterator[Mirror]:
    mirror = Mirror(root)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _mirror_handler(mirror))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    mirror.url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        yield mirror
    finally:
        server.shutdown()
        server.server_close()


# --------------------------------------------------------------------------- the testbed


class Testbed:
    """One enrolled device serving ``clf`` 2.0.0 (release 2), under attack; see the module doc."""

    __test__ = False

    def __init__(self, workdir: Path, broker: Broker, mirror: Mirror, repo: ImageRepository) -> None:
        self.workdir = workdir
        self.broker = broker
        self.mirror = mirror
        self.repo = repo
        self.ca: FleetCA = broker.ca
        self.director = Ed25519PrivateKey.generate()
        self.data_dir = workdir / "device"
        self.reports: list[dict[str, Any]] = []
        #: every payload published on the device's desired topic (an eavesdropper's capture)
        self.sent: list[bytes] = []
        self._reports_lock = threading.Lock()
        self.daemon: Daemon | None = None
        self._seq = 0
        self.server: mqtt.Client | None = None

    # -- setup -------------------------------------------------------------------------------
    def enroll(self) -> None:
        """Write what ``fleet device enroll`` writes, with this testbed's CA, director and root."""
        d = self.data_dir
        d.mkdir(mode=0o700)
        issue_client_files(self.ca, DEVICE_ID, d / "device.crt", d / "device.key")
        atomic_write(d / "ca.crt", self.ca.cert_pem.encode())
        atomic_write(d / "director.pem", public_key_to_pem(self.director.public_key()).encode())
        atomic_write(d / "tuf" / "root.json", json.dumps(self.repo.trusted_root()).encode())
        ident = Identity(
            device_id=DEVICE_ID,
            server_url=self.mirror.url,
            mqtt_host="127.0.0.1",
            mqtt_port=self.broker.port,
            mqtt_tls=True,
            tuf_metadata_url=f"{self.mirror.url}/metadata/",
            tuf_targets_url=f"{self.mirror.url}/targets/",
            device_token="fd.edge-sec.not-a-real-secret",
            data_dir=d,
        )
        atomic_write(d / "identity.json", ident.to_json(), mode=0o600)

    def start(self, **settings: Any) -> Testbed:
        self.server = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id="testbed-server", protocol=mqtt.MQTTv5
        )
        self.server.tls_set(
            ca_certs=str(self.broker.files.ca),
            certfile=str(self.broker.files.server_cert),
            keyfile=str(self.broker.files.server_key),
        )
        subscribed = threading.Event()
        self.server.on_connect = lambda c, *_: c.subscribe(f"fleet/v1/d/{DEVICE_ID}/report", qos=1)
        self.server.on_subscribe = lambda *_: subscribed.set()
        self.server.on_message = self._on_report
        self.server.connect("127.0.0.1", self.broker.port)
        self.server.loop_start()
        assert subscribed.wait(10), "the testbed's server identity could not subscribe"
        values = {"download_deadline_s": 20.0, "metadata_deadline_s": 10.0, **settings}
        self.daemon = Daemon(device_settings(self.data_dir, **values)).start()
        return self

    def stop(self) -> None:
        if self.daemon is not None:
            self.daemon.stop()
        if self.server is not None:
            self.server.disconnect()
            self.server.loop_stop()

    def _on_report(self, client: Any, userdata: Any, msg: Any) -> None:
        with self._reports_lock:
            self.reports.append(json.loads(msg.payload))

    # -- the image repository ------------------------------------------------------------------
    def publish(self, version: str, release: int, *, scale: float = 1.0) -> tuple[str, Any]:
        """Build a real bundle and list it in the repository; return (target path, TargetFile)."""
        tar, _ = make_bundle(
            self.workdir / "bundles" / version, name="clf", version=version, release=release, scale=scale
        )
        path = f"clf/{version}/default/bundle.tar"
        custom = {"model": "clf", "version": version, "release": release, "variant": "default"}
        return path, self.repo.add_target(path, tar, {**custom, "constraints": {}})

    def target_url_path(self, version: str) -> str:
        """The mirror path of ``version``'s bundle (its consistent-snapshot name)."""
        path = f"clf/{version}/default/bundle.tar"
        return "/targets/" + str(self.repo.target_file(path).relative_to(self.repo.targets_dir))

    def heal(self, times: int = 3) -> None:
        """Publish legitimate metadata versions above anything an attack made the device trust."""
        with self.repo._locked():
            root = self.repo._root().signed
            for _ in range(times):
                self.repo._publish(root, self.repo._clock(), self.repo._targets(), force_snapshot=True)

    # -- desired states ------------------------------------------------------------------------
    def next_seq(self) -> int:
        """A seq above every one the device has seen (accepted or rejected), as the director's."""
        assert self.daemon is not None
        st = self.daemon.state
        self._seq = max(self._seq, st.last_desired_seq, st.last_rejected_seq or 0) + 1
        return self._seq

    def desired(self, version: str, **overrides: Any) -> dict[str, Any]:
        """A DesiredState dict for the listed ``version`` (length/hashes from the repository)."""
        path = f"clf/{version}/default/bundle.tar"
        info = self.repo.get_target(path)
        now = utcnow()
        fields: dict[str, Any] = {
            "device_id": DEVICE_ID,
            "seq": self.next_seq(),
            "issued_at": now,
            "expires_at": now + timedelta(hours=1),
            "model": "clf",
            "version": version,
            "release": info.custom["release"] if info else 1,
            "target": path,
            "length": info.length if info else 1000,
            "hashes": {"sha256": info.hashes["sha256"] if info else "ab" * 32},
            "probation": QUICK,
        }
        fields.update(overrides)
        return DesiredState.build(**fields).to_dict()

    def sign(self, desired: dict[str, Any], key: Ed25519PrivateKey | None = None) -> dict[str, Any]:
        return sign_envelope(desired, key or self.director)

    def send(self, payload: bytes | dict[str, Any]) -> int:
        """Publish on the device's desired topic (QoS 1, retained, as the server does); return the
        report count before it (a marker for :meth:`wait_report`)."""
        assert self.server is not None
        mark = len(self.reports)
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        self.sent.append(data)
        self.server.publish(f"fleet/v1/d/{DEVICE_ID}/desired", data, qos=1, retain=True).wait_for_publish(5)
        return mark

    # -- observing -----------------------------------------------------------------------------
    def wait_report(
        self, match: Callable[[dict[str, Any]], bool], since: int = 0, timeout: float = 20.0
    ) -> dict[str, Any]:
        def find() -> dict[str, Any] | None:
            with self._reports_lock:
                return next((r for r in self.reports[since:] if match(r)), None)

        return wait_for(find, timeout, interval=0.02, what="device report")

    def outcome(self, desired_seq: int, since: int = 0, timeout: float = 30.0) -> dict[str, Any]:
        terminal = {"succeeded", "failed", "rolled_back", "cancelled"}
        return self.wait_report(
            lambda r: r.get("desired_seq") == desired_seq and r["phase"] in terminal, since, timeout
        )

    def rejection(self, since: int, timeout: float = 20.0) -> dict[str, Any]:
        """The next ``failed`` report after ``since``."""
        return self.wait_report(lambda r: r["phase"] == "failed", since, timeout)

    def install(self, version: str) -> dict[str, Any]:
        """Send a genuine desired state for ``version`` and wait for it to succeed."""
        d = self.desired(version)
        mark = self.send(self.sign(d))
        out = self.outcome(d["seq"], mark)
        assert out["phase"] == "succeeded", out
        return out

    def assert_serving(self, version: str) -> None:
        """The device still answers inference with ``version`` and has no update in flight."""
        assert self.daemon is not None
        api = self.daemon.api.url
        r = httpx.post(api + "/v1/infer", json={"inputs": {"x": X.tolist()}}, timeout=10)
        assert r.status_code == 200, r.text
        assert r.json()["version"] == version
        assert self.daemon.state.current["clf"].version == version
        wait_for(lambda: self.daemon.state.update is None, 10, what="no update in flight")


@contextlib.contextmanager
def running_testbed(workdir: Path, *, baseline: str = "2.0.0", **settings: Any) -> Iterator[Testbed]:
    """A started testbed whose device serves ``clf`` ``baseline`` (release 2)."""
    workdir.mkdir(parents=True, exist_ok=True)
    broker = start_broker(FleetCA(workdir / "ca"), workdir)
    repo = ImageRepository(workdir / "repo", workdir / "repo-keys")
    repo.initialize()
    try:
        with serve_mirror(workdir / "repo") as mirror:
            tb = Testbed(workdir, broker, mirror, repo)
            tb.publish(baseline, 2, scale=2.0)
            tb.enroll()
            tb.start(**settings)
            try:
                tb.install(baseline)
                yield tb
            finally:
                tb.stop()
    finally:
        broker.process.stop()
