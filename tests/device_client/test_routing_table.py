"""The routing table between the local API and the routers: a real onnxruntime host as the edge, a
real Open Inference Protocol peer as the cloud, and the HTTP API in front."""

from __future__ import annotations

import http.client
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from device_client.api import InferenceServer
from device_client.daemon.health_publisher import routing_fields
from device_client.protocol import HealthWindow, ServeMode
from device_client.protocol.messages import utcnow
from device_client.protocol.routing import parse_routing_policy
from device_client.routing import RoutingEnvironment, RoutingTable
from device_client.runtime import BadInput, ModelHost
from tests.helpers.oip_server import OipPeer, PeerModel, serve_oip
from tests.helpers.onnx_models import make_model

#: the edge model (scale 4, seed 0): all scores equal (unsure) / one class far ahead (sure)
UNSURE = np.zeros((1, 4), np.float32)
SURE = np.array([[3, -3, 3, -3]], np.float32)
SLOW_S = 0.2


def policy(mode: str = "prefer_edge", **over: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "mode": mode,
        "confidence": {"output": "y", "softmax": True, "kind": "max_prob", "threshold": 0.9},
        "cloud": {"endpoint": "fleet", "model": "big", "timeout_ms": 3000},
        "budget": {"per_minute": 6000, "burst": 100},
    }
    doc.update(over)
    return parse_routing_policy(doc).to_dict()


@pytest.fixture
def host(make_slot) -> Iterator[ModelHost]:
    h = ModelHost("clf", warmup_runs=1)
    h.install(make_slot("1.0.0", scale=4.0))
    yield h
    h.close()


@pytest.fixture
def cloud(tmp_path: Path) -> Iterator[tuple[OipPeer, str]]:
    peer = OipPeer([PeerModel("big", "7.0.0", make_model(tmp_path / "big.onnx", scale=4.0))])
    with serve_oip(peer) as url:
        yield peer, url


def table_for(tmp_path: Path, host: ModelHost, url: str | None) -> RoutingTable:
    env = RoutingEnvironment(data_dir=tmp_path / "device", fleet_url=url, insecure_http=True)
    return RoutingTable(env, {"clf": host})


def test_unsure_goes_to_the_cloud_and_the_window_counts_what_the_caller_saw(tmp_path, host, cloud):
    peer, url = cloud
    table = table_for(tmp_path, host, url)
    table.sync({"clf": policy()})
    try:
        host.health.snapshot_and_reset()
        sure = table.answer(host, {"x": SURE})
        assert (sure.answered_by, sure.reason, sure.version) == ("edge", "confident", "1.0.0")
        assert sure.confidence is not None
        assert sure.confidence > 0.9
        peer.faults.slow_s = SLOW_S
        unsure = table.answer(host, {"x": UNSURE})
        assert (unsure.answered_by, unsure.reason) == ("cloud", "escalated")
        assert unsure.cloud_version == "7.0.0"
        assert unsure.confidence == pytest.approx(1 / 3, rel=1e-3)
        assert peer.infer_count == 1
        window = host.health.snapshot_and_reset()
        # both requests, recorded once each, the escalated one with the cloud's time in it
        assert (window.requests, window.errors) == (2, 0)
        assert window.p99_ms is not None
        assert window.p99_ms >= SLOW_S * 1000
        drained = table.drain("clf")
        assert drained is not None
        assert (drained["edge"], drained["cloud"], drained["escalations"]) == (1, 1, 1)
        assert drained["cloud_compared"] == 1
        assert drained["cloud_agreement"] == 1.0
    finally:
        table.close()


def test_sync_keeps_replaces_and_drops_routers(tmp_path, host, cloud):
    _, url = cloud
    table = table_for(tmp_path, host, url)
    first = policy()
    table.sync({"clf": first})
    router = table.router("clf")
    assert router is not None
    table.sync({"clf": dict(first)})  # the same policy: the same router, breaker and budget
    assert table.router("clf") is router
    table.answer(host, {"x": UNSURE})
    table.sync({"clf": policy("prefer_cloud")})
    replaced = table.router("clf")
    assert replaced is not None
    assert replaced is not router
    assert replaced.policy.mode.value == "prefer_cloud"
    assert table.answer(host, {"x": SURE}).answered_by == "cloud"
    counts = table.drain("clf")  # the window carries on across the replacement
    assert counts is not None
    assert (counts["requests"], counts["cloud"]) == (2, 2)
    table.answer(host, {"x": SURE})
    table.sync({})
    assert table.router("clf") is None
    answer = table.answer(host, {"x": UNSURE})
    assert (answer.answered_by, answer.reason, answer.confidence) == ("edge", None, None)
    last = table.drain("clf")  # the removed policy's requests still reach one more window
    assert last is not None
    assert last["requests"] == 1
    assert table.drain("clf") is None
    table.close()


def test_without_a_fleet_url_escalations_fall_back_as_offline(tmp_path, host):
    table = table_for(tmp_path, host, None)
    table.sync({"clf": policy()})
    try:
        answer = table.answer(host, {"x": UNSURE})
        assert (answer.answered_by, answer.reason) == ("edge", "cloud_failed:unconfigured")
        drained = table.drain("clf")
        assert drained is not None
        assert (drained["cloud_failed"], drained["cloud_failures"]) == (1, {"unconfigured": 1})
        assert table.status()["clf"]["cloud_configured"] is False
    finally:
        table.close()


def test_a_policy_that_cannot_be_followed_leaves_the_edge_alone(tmp_path, host, cloud):
    _, url = cloud
    table = table_for(tmp_path, host, url)
    table.sync({"clf": {"mode": "prefer_edge", "cloud": {"model": "big"}}})  # no confidence section
    assert table.router("clf") is None
    assert "confidence" in table.problems["clf"]
    assert table.answer(host, {"x": UNSURE}).answered_by == "edge"
    table.sync({"clf": policy()})
    assert table.problems == {}
    assert table.answer(host, {"x": UNSURE}).answered_by == "cloud"
    table.close()


def test_bad_input_is_refused_and_not_counted(tmp_path, host, cloud):
    _, url = cloud
    table = table_for(tmp_path, host, url)
    table.sync({"clf": policy()})
    try:
        host.health.snapshot_and_reset()
        with pytest.raises(BadInput):
            table.answer(host, {"x": np.zeros((1, 5), np.float32)})
        assert host.health.snapshot_and_reset().requests == 0
    finally:
        table.close()


class Client:
    def __init__(self, port: int) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)

    def post(self, body: bytes, ctype: str) -> tuple[int, dict[str, str], bytes]:
        self.conn.request("POST", "/v1/infer", body=body, headers={"Content-Type": ctype})
        resp = self.conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read()

    def json(self, x: np.ndarray) -> tuple[dict[str, str], dict[str, Any]]:
        status, headers, data = self.post(
            json.dumps({"inputs": {"x": x.tolist()}}).encode(), "application/json"
        )
        assert status == 200, data
        return headers, json.loads(data)


def test_the_api_says_who_answered(tmp_path, host, cloud):
    _, url = cloud
    table = table_for(tmp_path, host, url)
    server = InferenceServer({"clf": host}, port=0)
    server.routing = table
    server.start()
    c = Client(server.port)
    try:
        headers, doc = c.json(SURE)  # no policy yet: the edge, as always
        assert headers["X-Fleet-Answered-By"] == "edge"
        assert "X-Fleet-Confidence" not in headers
        assert (doc["answered_by"], doc["confidence"]) == ("edge", None)
        assert "reason" not in doc
        table.sync({"clf": policy()})
        headers, doc = c.json(UNSURE)
        assert headers["X-Fleet-Answered-By"] == "cloud"
        assert headers["X-Fleet-Model-Version"] == "1.0.0"
        assert float(headers["X-Fleet-Confidence"]) == pytest.approx(1 / 3, rel=1e-3)
        assert (doc["answered_by"], doc["reason"], doc["cloud_version"]) == ("cloud", "escalated", "7.0.0")
        headers, doc = c.json(SURE)
        assert (headers["X-Fleet-Answered-By"], doc["answered_by"], doc["reason"]) == (
            "edge",
            "edge",
            "confident",
        )
        assert doc["confidence"] > 0.9
        buf = io.BytesIO()
        np.save(buf, UNSURE)
        status, headers, data = c.post(buf.getvalue(), "application/x-npy")
        assert status == 200
        assert headers["X-Fleet-Answered-By"] == "cloud"
        assert np.load(io.BytesIO(data)).shape == (1, 3)
    finally:
        server.stop()
        table.close()


def test_routing_counters_fit_the_health_window(tmp_path, host, cloud):
    _, url = cloud
    table = table_for(tmp_path, host, url)
    table.sync({"clf": policy()})
    table.answer(host, {"x": UNSURE})
    table.answer(host, {"x": SURE})
    drained = table.drain("clf")
    table.close()
    assert drained is not None
    window = HealthWindow.build(
        device_id="dev-1",
        seq=1,
        at=utcnow(),
        window_s=1.0,
        model="clf",
        version="1.0.0",
        mode=ServeMode.serve,
        requests=2,
        errors=0,
        **routing_fields(drained),
    )
    assert (window.answered_edge, window.answered_cloud, window.answered_cache) == (1, 1, 0)
    assert (window.escalations, window.escalation_rate, window.cloud_compared) == (1, 0.5, 1)
    assert window.cloud_agreement == 1.0
    assert window.cloud_p95_ms is not None
    # a request escalated while the window was drained counts there before it is answered
    assert routing_fields({**drained, "escalation_rate": 2.0})["escalation_rate"] == 1.0


@pytest.mark.parametrize(
    ("fault", "kind"),
    [
        ({"slow_s": 1.0}, "timeout"),
        ({"nan": True}, "nan"),
        ({"wrong_shape": "flat"}, "wrong_shape"),
        ({"lie_name": "other"}, "lying"),
        ({"status": 500}, "http_error"),
        ({"down": True}, "unreachable"),
        ({"rate_limit_next": 1, "retry_after": "60"}, "rate_limited"),
    ],
)
def test_a_failing_cloud_never_fails_the_caller(tmp_path, host, cloud, fault: dict[str, Any], kind: str):
    peer, url = cloud
    for name, value in fault.items():
        setattr(peer.faults, name, value)
    table = table_for(tmp_path, host, url)
    table.sync({"clf": policy(cloud={"endpoint": "fleet", "model": "big", "timeout_ms": 300})})
    server = InferenceServer({"clf": host}, port=0)
    server.routing = table
    server.start()
    c = Client(server.port)
    try:
        headers, doc = c.json(UNSURE)
        assert (headers["X-Fleet-Answered-By"], doc["reason"]) == ("edge", f"cloud_failed:{kind}")
        assert doc["outputs"]["y"] == host.infer({"x": UNSURE}).outputs["y"].tolist()
        if kind == "rate_limited":  # the 429's Retry-After holds the next escalation back
            headers, doc = c.json(UNSURE)
            assert (headers["X-Fleet-Answered-By"], doc["reason"]) == ("edge", "budget_limited")
    finally:
        server.stop()
        table.close()
