"""Hybrid edge/cloud inference on a real daemon: a real server and Mosquitto, a real onnxruntime
edge model installed through TUF, and a real Open Inference Protocol peer as the cloud tier.

DesiredStates carrying a routing policy are signed with the server's own director key and
published on the device's topic with the server's operator identity, which also reads the
device's reports and health windows off the broker (what the server's ingest receives)."""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import paho.mqtt.client as mqtt
import pytest

from device_client.daemon import Daemon
from device_client.protocol import DesiredState
from device_client.protocol.messages import utcnow
from device_client.protocol.routing import parse_routing_policy
from device_client.protocol.signing import sign_envelope
from server.mqtt.broker import free_port
from tests.helpers.device_fleet import device_settings, enroll_device, push_model, wait_for
from tests.helpers.oip_server import OipPeer, PeerModel, serve_oip
from tests.helpers.onnx_models import make_model

pytestmark = pytest.mark.mqtt

DEVICE = "edge-hy"
QUICK = {"seconds": 0.3, "min_requests": 0}
#: with the edge model (scale 4, seed 0): all scores equal (unsure) / one class far ahead (sure)
UNSURE = np.zeros((1, 4), np.float32)
SURE = np.array([[3, -3, 3, -3]], np.float32)


def policy(mode: str = "prefer_edge", **over: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "mode": mode,
        "confidence": {"output": "y", "softmax": True, "kind": "max_prob", "threshold": 0.9},
        "cloud": {"endpoint": "fleet", "model": "big", "timeout_ms": 3000},
        "budget": {"per_minute": 6000, "burst": 200},
    }
    doc.update(over)
    return doc


class Bus:
    """The server's operator identity on the broker: publishes signed DesiredStates on the
    device's topic and records the device's reports and health windows."""

    def __init__(self, live: Any) -> None:
        self.live = live
        self.reports: list[dict[str, Any]] = []
        self.health: list[dict[str, Any]] = []
        self.seq = 0
        self._lock = threading.Lock()
        broker_dir = live.settings.broker_dir
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="hybrid", protocol=mqtt.MQTTv5)
        self.client.tls_set(
            ca_certs=str(broker_dir / "ca.crt"),
            certfile=str(broker_dir / "fleet_server.crt"),
            keyfile=str(broker_dir / "fleet_server.key"),
        )
        subscribed = threading.Event()
        topics = [(f"fleet/v1/d/{DEVICE}/report", 1), (f"fleet/v1/d/{DEVICE}/health", 0)]
        self.client.on_connect = lambda c, *_: c.subscribe(topics)
        self.client.on_subscribe = lambda *_: subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", live.settings.mqtt_port)
        self.client.loop_start()
        assert subscribed.wait(10), "could not subscribe to the device's topics"

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        doc = json.loads(msg.payload)
        with self._lock:
            (self.reports if msg.topic.endswith("/report") else self.health).append(doc)

    def desired(self, version: str, routing: dict[str, Any] | None, **fields: Any) -> dict[str, Any]:
        """A DesiredState for the listed clf ``version`` (next seq), as a dict."""
        path, info = next(
            (p, i) for p, i in self.live.ctx.repo.list_targets().items() if p.startswith(f"clf/{version}/")
        )
        self.seq += 1
        now = utcnow()
        values: dict[str, Any] = {
            "device_id": DEVICE,
            "seq": self.seq,
            "issued_at": now,
            "expires_at": now + timedelta(hours=1),
            "model": "clf",
            "version": version,
            "release": info.custom["release"],
            "target": path,
            "length": info.length,
            "hashes": {"sha256": info.hashes["sha256"]},
            "probation": QUICK,
            **fields,
        }
        return DesiredState.build(**values, routing=routing).to_dict()

    def send(self, desired: dict[str, Any], *, raw: bool = False) -> int:
        """Sign ``desired`` with the director (``raw``: as it is, unvalidated) and publish it
        retained, as the server does; returns its seq."""
        if raw:
            envelope = sign_envelope(desired, self.live.ctx.director.key)
        else:
            envelope = self.live.ctx.director.sign(DesiredState.model_validate(desired))
        self.client.publish(
            f"fleet/v1/d/{DEVICE}/desired", json.dumps(envelope).encode(), qos=1, retain=True
        ).wait_for_publish(5)
        return desired["seq"]

    def report(self, match: Callable[[dict[str, Any]], bool], timeout: float = 30.0) -> dict[str, Any]:
        def find() -> dict[str, Any] | None:
            with self._lock:
                return next((r for r in self.reports if match(r)), None)

        return wait_for(find, timeout, interval=0.02, what="device report")

    def outcome(self, seq: int) -> dict[str, Any]:
        terminal = {"succeeded", "failed", "rolled_back", "cancelled"}
        return self.report(lambda r: r.get("desired_seq") == seq and r["phase"] in terminal)

    def phases(self, seq: int) -> list[str]:
        with self._lock:
            return [r["phase"] for r in self.reports if r.get("desired_seq") == seq]

    def windows(self, since: int = 0) -> list[dict[str, Any]]:
        """The serve windows received after the first ``since``."""
        with self._lock:
            return [w for w in self.health[since:] if w["mode"] == "serve"]

    def totals(self, since: int = 0) -> dict[str, float]:
        """Sums of the counters of the serve windows received after the first ``since``."""
        windows = self.windows(since)
        keys = ("requests", "errors", "answered_edge", "answered_cloud", "answered_cache", "escalations")
        keys += ("budget_limited", "breaker_open", "cloud_failed", "cloud_compared")
        return {k: sum(w.get(k) or 0 for w in windows) for k in keys}

    def wait_totals(self, since: int, done: Callable[[dict[str, float]], bool]) -> dict[str, float]:
        """:meth:`totals` once ``done`` holds for them."""

        def check() -> dict[str, float] | None:
            totals = self.totals(since)
            return totals if done(totals) else None

        return wait_for(check, what="health windows")

    def mark(self) -> int:
        with self._lock:
            return len(self.health)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def infer(api: str, x: np.ndarray) -> tuple[dict[str, str], dict[str, Any]]:
    r = httpx.post(api + "/v1/infer", json={"inputs": {"x": x.tolist()}}, timeout=10)
    assert r.status_code == 200, r.text
    return dict(r.headers), r.json()


@contextlib.contextmanager
def cloud_peer(path: Path, version: str) -> Iterator[tuple[OipPeer, str]]:
    """The cloud model ``big`` ``version`` (the edge model's twin) behind an OIP server."""
    peer = OipPeer([PeerModel("big", version, make_model(path / f"big-{version}.onnx", scale=4.0))])
    with serve_oip(peer) as url:
        yield peer, url


@pytest.fixture
def cloud(tmp_path: Path) -> Iterator[tuple[OipPeer, str, Callable[[], None]]]:
    """The fleet's cloud tier: (peer, url, stop) where ``stop()`` takes it down for good."""
    with contextlib.ExitStack() as stack:
        peer, url = stack.enter_context(cloud_peer(tmp_path, "1.0.0"))
        yield peer, url, stack.close


@pytest.fixture
def live_settings(mqtt_settings, cloud):
    """The server hands the cloud tier's URL out at enrollment."""
    port = free_port()
    return mqtt_settings.model_copy(
        update={"port": port, "public_url": f"http://127.0.0.1:{port}", "cloud_public_url": cloud[1]}
    )


@pytest.fixture
def device(live_server, tmp_path) -> Iterator[tuple[Path, Bus]]:
    """An enrolled data directory with clf 1.0.0 and 2.0.0 published, and the bus."""
    ident = enroll_device(live_server, tmp_path / "dev", DEVICE)
    assert ident.cloud_url == live_server.settings.cloud_public_url
    onnx = tmp_path / "onnx"
    push_model(live_server, "clf", "1.0.0", make_model(onnx / "v1.onnx", scale=4.0))
    push_model(live_server, "clf", "2.0.0", make_model(onnx / "v2.onnx", scale=4.0, nan_on_negative=True))
    bus = Bus(live_server)
    try:
        yield tmp_path / "dev", bus
    finally:
        bus.close()


def start(data: Path, **settings: Any) -> Daemon:
    daemon = Daemon(device_settings(data, **settings)).start()
    assert daemon.link is not None
    assert daemon.link.wait_connected(10)
    return daemon


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_policy_is_deployed_changed_kept_across_a_restart_and_removed(device, tmp_path):
    data, bus = device
    daemon = start(data)
    try:
        api = daemon.api.url
        # a first install carrying a policy: the unsure go to the cloud, the sure stay at the edge
        seq = bus.send(bus.desired("1.0.0", policy()))
        assert bus.outcome(seq)["phase"] == "succeeded"
        assert "downloading" in bus.phases(seq)
        mark = bus.mark()
        headers, doc = infer(api, UNSURE)
        assert headers["x-fleet-answered-by"] == "cloud"
        assert (doc["answered_by"], doc["reason"], doc["cloud_version"]) == ("cloud", "escalated", "1.0.0")
        assert doc["confidence"] == pytest.approx(1 / 3, rel=1e-3)
        headers, doc = infer(api, SURE)
        assert (headers["x-fleet-answered-by"], doc["answered_by"]) == ("edge", "edge")
        assert doc["confidence"] > 0.9

        # the health windows on the wire carry the routing counters
        totals = bus.wait_totals(mark, lambda t: t["answered_cloud"] >= 1 and t["answered_edge"] >= 1)
        assert (totals["requests"], totals["errors"], totals["escalations"]) == (2, 0, 1)
        assert (totals["answered_cloud"], totals["answered_edge"], totals["cloud_compared"]) == (1, 1, 1)
        windows = bus.windows(mark)  # (a request answered as a window closes may count in two)
        assert [w["cloud_agreement"] for w in windows if w["cloud_compared"]] == [1.0]
        assert any(w["cloud_p95_ms"] is not None for w in windows)

        # a new policy for the same version is a deployment of its own: applied, then reported
        seq = bus.send(bus.desired("1.0.0", policy("prefer_cloud")))
        out = bus.outcome(seq)
        assert (out["phase"], out["reason"]) == ("succeeded", "routing policy applied")
        assert bus.phases(seq) == ["succeeded"]  # nothing downloaded or swapped
        headers, doc = infer(api, SURE)
        assert (headers["x-fleet-answered-by"], doc["reason"]) == ("cloud", "cloud_first")
        assert daemon.state.routing["clf"]["mode"] == "prefer_cloud"
    finally:
        daemon.stop()

    # a restart keeps the policy; FLEET_DEVICE_CLOUD_URL overrides the enrollment's cloud URL
    with cloud_peer(tmp_path / "other", "2.0.0") as (other, other_url):
        daemon = start(data, cloud_url=other_url)
        try:
            headers, doc = infer(daemon.api.url, SURE)
            assert (headers["x-fleet-answered-by"], doc["cloud_version"]) == ("cloud", "2.0.0")
            assert other.infer_count == 1

            # a DesiredState without a policy removes it
            seq = bus.send(bus.desired("1.0.0", None))
            out = bus.outcome(seq)
            assert (out["phase"], out["reason"]) == ("succeeded", "routing policy removed")
            headers, doc = infer(daemon.api.url, UNSURE)
            assert (headers["x-fleet-answered-by"], doc["answered_by"], doc["confidence"]) == (
                "edge",
                "edge",
                None,
            )
            assert daemon.state.routing == {}
            assert other.infer_count == 1
        finally:
            daemon.stop()


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_offline_no_request_fails_and_bad_policies_change_nothing(device, cloud):
    data, bus = device
    peer, _, stop_cloud = cloud
    daemon = start(data)
    try:
        api = daemon.api.url
        first = policy()
        seq = bus.send(bus.desired("1.0.0", first))
        assert bus.outcome(seq)["phase"] == "succeeded"
        mark = bus.mark()
        assert infer(api, UNSURE)[1]["answered_by"] == "cloud"
        cache = data / "cloud-cache" / "clf"
        wait_for(lambda: any(cache.glob("*")), what="the cloud answer cached on disk")
        bus.wait_totals(mark, lambda t: t["answered_cloud"] == 1)  # its window is out

        # the cloud goes away: every request is still answered, from the cache or the edge
        stop_cloud()
        mark = bus.mark()
        unsure = np.full((1, 4), 0.01, np.float32)  # never asked before: nothing cached
        answered: list[str] = []
        for _ in range(10):
            for x in (UNSURE, unsure, SURE):
                headers, doc = infer(api, x)
                answered.append(doc["answered_by"])
                assert headers["x-fleet-answered-by"] == doc["answered_by"]
        assert answered[0::3] == ["cache"] * 10  # a cached cloud answer beats the edge's
        assert answered[1::3] == ["edge"] * 10
        assert answered[2::3] == ["edge"] * 10
        totals = bus.wait_totals(mark, lambda t: t["requests"] >= 30)
        assert (totals["requests"], totals["errors"]) == (30, 0)
        assert (totals["answered_cache"], totals["answered_edge"], totals["escalations"]) == (10, 20, 20)
        assert totals["cloud_failed"] >= 5  # until the breaker opened (after 5 failures) ...
        assert totals["breaker_open"] >= 1  # ... then escalations are skipped, counted
        assert totals["cloud_failed"] + totals["breaker_open"] == 20
        assert peer.completed == 1

        # a malformed policy makes the whole DesiredState malformed: refused, reported, no change
        for bad in (
            {"mode": "prefer_edge", "cloud": {"model": "big"}},  # no confidence section
            policy(confidence={"output": "y", "kind": "max_prob", "threshold": 1.5}),
            policy(cloud={"endpoint": "http://cloud.example", "model": "big"}),  # not https
        ):
            desired = bus.desired("1.0.0", None)
            desired["routing"] = bad
            seq = bus.send(desired, raw=True)
            out = bus.report(lambda r, s=seq: r["phase"] == "failed" and r["details"].get("claimed_seq") == s)
            assert out["details"]["code"] == "malformed", out
            assert "routing" in out["reason"]
            assert daemon.state.routing == {"clf": stored(first)}
        assert daemon.state.last_desired_seq == 1  # the refused seqs were never accepted

        # a new version with its own policy that breaches probation: reverted, policy included
        probation = {"seconds": 60, "min_requests": 5, "max_error_rate": 0.05}
        seq = bus.send(bus.desired("2.0.0", policy("prefer_cloud"), probation=probation))
        wait_for(lambda: daemon.state.routing["clf"]["mode"] == "prefer_cloud", what="v2 and its policy")
        negative = -np.ones((1, 4), np.float32)

        def reverted() -> bool:
            if daemon.state.update is None:
                return True
            infer(api, negative)  # NaN from 2.0.0: an error, though the request is answered
            return False

        wait_for(reverted, what="the probation revert")
        assert bus.outcome(seq)["phase"] == "rolled_back"
        assert daemon.state.current["clf"].version == "1.0.0"
        assert daemon.state.routing == {"clf": stored(first)}
        assert infer(api, UNSURE)[1]["answered_by"] == "cache"
    finally:
        daemon.stop()


def stored(doc: dict[str, Any]) -> dict[str, Any]:
    """``doc`` as the device stores it (every default filled in)."""
    return parse_routing_policy(doc).to_dict()
