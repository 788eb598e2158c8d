"""Malformed payloads on every MQTT topic the server consumes and on the device's desired topic.

Server: the real ``IngestWorker`` (its own thread, as the bridge feeds it) of a real app; every bad
message must be rejected exactly once in ``fleet_mqtt_rejected_total`` (also served at
``/metrics``), the worker thread must survive, and a valid report afterwards is still written.

Device: a real daemon (tests/helpers/testbed.py) gets the corpus on its desired topic, raw and
inside envelopes signed by the real director key; every message must be answered by one ``failed``
report (``malformed``) and counted once in ``rejected_messages`` of its ``GET /v1/health``, the
worker must survive, and the device keeps serving.

protection: ``parse_payload`` / ``verify_desired`` turn every decoding failure (including a
``RecursionError`` from deeply nested JSON) into a counted rejection.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from server.mqtt.handlers import REJECTED, IngestWorker
from tests.helpers.fuzz_payloads import corpus, valid
from tests.helpers.pki import HARDWARE, make_csr

KINDS = ("report", "health", "presence")
DEVICE = "fuzz-dev"


@pytest.fixture
def ingest(app_client, admin_headers):
    """(TestClient, ctx, a started IngestWorker) with DEVICE enrolled."""
    token = app_client.post("/api/v1/enroll-tokens", json={}, headers=admin_headers).json()["token"]
    csr, _ = make_csr(DEVICE)
    r = app_client.post("/api/v1/enroll", json={"token": token, "csr_pem": csr, "hardware": HARDWARE})
    assert r.status_code == 201, r.text
    ctx = app_client.app.state.ctx
    worker = IngestWorker(ctx, ctx.metrics)
    worker.start()
    yield app_client, ctx, worker
    worker.stop()


def _feed(worker: IngestWorker, items: list[tuple[str, bytes]]) -> None:
    now = datetime.now(UTC)
    for topic, payload in items:
        worker.submit(topic, payload, now)
    assert worker.wait_idle(30)
    assert worker._loop.is_alive(), "the ingest thread died"


def test_server_ingest_rejects_and_counts_every_malformed_payload(ingest, admin_headers):
    client, ctx, worker = ingest
    items = [(f"fleet/v1/d/{DEVICE}/{kind}", p) for kind in KINDS for p in corpus(kind, DEVICE)]
    # a valid message on another device's topic, and topics that are not the protocol's
    items += [(f"fleet/v1/d/other-dev/{kind}", json.dumps(valid(kind, DEVICE)).encode()) for kind in KINDS]
    items += [("fleet/v1/d/UPPER/report", b"{}"), ("fleet/v1/d/x/unknown", b"{}"), ("junk", b"")]
    before = ctx.metrics.total(REJECTED)
    _feed(worker, items)
    assert ctx.metrics.total(REJECTED) - before == len(items)
    assert ctx.metrics.get(REJECTED, kind="report", reason="device_mismatch") == 1
    metrics = client.get("/metrics").text
    assert 'fleet_mqtt_rejected_total{kind="report",reason="invalid_payload"}' in metrics

    # the worker still writes a valid report
    report = {**valid("report", DEVICE), "reason": "after the storm"}
    _feed(worker, [(f"fleet/v1/d/{DEVICE}/report", json.dumps(report).encode())])
    events = client.get(f"/api/v1/devices/{DEVICE}/events", headers=admin_headers).json()
    assert [e["reason"] for e in events] == ["after the storm"]


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=50),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner, max_size=5),
    max_leaves=30,
)


@given(
    payloads=st.lists(
        st.binary(max_size=500) | JSON.map(lambda v: json.dumps(v).encode()), min_size=1, max_size=20
    ),
    kind=st.sampled_from(KINDS),
)
@settings(
    max_examples=60, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck)
)
def test_server_ingest_survives_random_payloads(app_client, payloads, kind):
    ctx = app_client.app.state.ctx
    worker = IngestWorker(ctx, ctx.metrics)
    before = ctx.metrics.total(REJECTED)
    worker.process([(f"fleet/v1/d/{DEVICE}/{kind}", p, datetime.now(UTC)) for p in payloads])
    assert ctx.metrics.total(REJECTED) - before == len(payloads)


@pytest.mark.mqtt
def test_device_desired_topic_survives_malformed_payloads(tmp_path):
    from tests.helpers.testbed import DEVICE_ID, running_testbed

    with running_testbed(tmp_path / "bed") as device:
        raw = list(corpus("desired", DEVICE_ID, n=25))
        signed = [
            json.dumps(device.sign(json.loads(p))).encode()
            for p in corpus("desired", DEVICE_ID, n=25, seed=9)
            if p.startswith(b"{") and _loads(p) is not None
        ]
        assert len(signed) >= 10
        health = device.daemon.api.url + "/v1/health"
        assert httpx.get(health, timeout=5).json()["rejected_messages"] == {}
        for payload in raw + signed:
            report = device.rejection(device.send(payload), timeout=10)
            assert report["details"]["code"] == "malformed", (payload[:200], report)
            assert report["desired_seq"] is None
        # a well-formed state signed by a key the device does not trust is counted under its own reason
        forged = device.sign(device.desired("2.0.0"), key=Ed25519PrivateKey.generate())
        report = device.rejection(device.send(forged), timeout=10)
        assert report["details"]["code"] == "bad_signature", report
        # every refusal is counted once, per reason, on the device's health endpoint
        counts = httpx.get(health, timeout=5).json()["rejected_messages"]
        assert counts == {"malformed": len(raw) + len(signed), "bad_signature": 1}
        assert all(t.is_alive() for t in device.daemon._threads), "a daemon thread died"
        device.assert_serving("2.0.0")
        device.publish("3.0.0", 3, scale=3.0)
        device.install("3.0.0")  # and it still takes a genuine update
        device.assert_serving("3.0.0")


def _loads(p: bytes):
    try:
        value = json.loads(p)
    except (ValueError, RecursionError):
        return None
    return value if isinstance(value, dict) else None
