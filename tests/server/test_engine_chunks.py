"""The rollout engine signs a large stage in chunks of NOTIFY_CHUNK (2,000) DesiredStates per tick.

4,500 devices (1,000 online, 3,500 offline; some already holding an older DesiredState) are
inserted in bulk, a one-stage rollout of all of them is created through the API, and the real
engine ticks (with its real chunk size) until the stage is notified. Each tick signs at most a
chunk and asks for another tick at once while work remains; at the end every device holds exactly
one DesiredState, signed by the director, with the next seq after the one it had, and exactly one
outbox message carrying it: no device signed twice, none skipped.
"""

from __future__ import annotations

import json
from collections import Counter
from datetime import UTC, datetime, timedelta

import sqlalchemy as sa

from device_client.protocol import DesiredState, validate_payload
from device_client.protocol.signing import public_key_from_pem, verify_envelope
from device_client.protocol.topics import TopicKind, device_topic
from server.devices.tables import Device, DeviceTag
from server.rollouts.engine import NOTIFY_CHUNK, RolloutEngine
from server.rollouts.tables import Deployment, DesiredRecord, OutboxMessage
from tests.helpers.device_rows import device_row
from tests.helpers.rollout_lab import push

N = 4500
ONLINE = 1000  # the first ONLINE devices are online, the rest offline or never seen


def _fleet(ctx) -> dict[str, int]:
    """Insert N devices tagged fleet=big in bulk; return each one's current desired seq."""
    now = datetime.now(UTC)
    ids = [f"big-{i:05d}" for i in range(N)]
    # a third never had a DesiredState, the others had one (seq 1 or 2) from an earlier assignment
    seqs = {d: i % 3 for i, d in enumerate(ids)}
    old = DesiredState.build(
        device_id="big-00000", seq=1, issued_at=now, expires_at=now + timedelta(days=7), model="det",
        version="1.0.0", release=1, target="det/1.0.0/default/bundle.tar", length=1,
        hashes={"sha256": "0" * 64},
    ).to_dict()  # fmt: skip
    with ctx.db.session_scope() as s:
        s.execute(sa.insert(Device.__table__), [
            device_row(
                d, now, status="online" if i < ONLINE else ("offline" if i % 2 else "enrolled"),
                hardware={"ram_mb": 2048}, arch=("x86_64", "aarch64")[i % 2],
                cert_not_after=now + timedelta(days=365), serving={"det": "1.0.0"}, desired_seq=seqs[d],
            )
            for i, d in enumerate(ids)
        ])  # fmt: skip
        s.execute(
            sa.insert(DeviceTag.__table__), [{"device_id": d, "key": "fleet", "value": "big"} for d in ids]
        )
        s.execute(sa.insert(DesiredRecord.__table__), [
            {"device_id": d, "seq": seq, "rollout_id": None, "model": "det", "version": "1.0.0", "release": 1,
             "variant": "default", "mode": "serve", "probation": {}, "issued_at": now,
             "expires_at": now + timedelta(days=7),
             "envelope": {"signed": {**old, "device_id": d, "seq": seq}, "signatures": []}}
            for d, seq in seqs.items() if seq
        ])  # fmt: skip
    return seqs


def _outbox(ctx) -> list[tuple[str, bytes]]:
    with ctx.db.session_scope() as s:
        return [tuple(r) for r in s.execute(sa.select(OutboxMessage.topic, OutboxMessage.payload))]


def test_a_4500_device_stage_is_signed_in_chunks_of_2000(app_client, admin_headers, ctx, onnx_model):
    assert NOTIFY_CHUNK == 2000
    push(app_client, admin_headers, onnx_model, "2.0.0")
    before = _fleet(ctx)
    body = {
        "model": "det", "version": "2.0.0", "selector": {"tags": {"fleet": "big"}},
        "stages": [{"percent": 100, "soak_s": 0}], "max_concurrent_downloads": 10_000,
    }  # fmt: skip
    r = app_client.post("/api/v1/rollouts", json=body, headers=admin_headers)
    assert r.status_code == 201, r.text
    rid = r.json()["id"]
    assert _outbox(ctx) == []

    engine = RolloutEngine(ctx)
    signed_per_tick: list[int] = []
    more: list[bool] = []
    total = 0
    while total < N and len(signed_per_tick) < 10:
        engine._more = False  # as the engine's loop does before each tick
        engine.tick()
        now = len(_outbox(ctx))
        signed_per_tick.append(now - total)
        more.append(engine._more)
        total = now
    # the real chunk: 2,000 (1,000 online + 1,000 offline), 2,000, then the last 500
    assert signed_per_tick == [NOTIFY_CHUNK, NOTIFY_CHUNK, N - 2 * NOTIFY_CHUNK]
    assert more == [True, True, False]  # a full chunk asks for the next tick at once
    engine.tick()
    assert len(_outbox(ctx)) == N  # nothing left: nothing signed again

    # every device: one DesiredState, the next seq after the one it had, signed by the director
    director = public_key_from_pem(ctx.director.public_key_pem)
    with ctx.db.session_scope() as s:
        records = {r.device_id: r for r in s.scalars(sa.select(DesiredRecord))}
        device_seq = {r.id: r.desired_seq for r in s.execute(sa.select(Device.id, Device.desired_seq))}
        deployments = s.execute(
            sa.select(Deployment.device_id, Deployment.phase, Deployment.desired_seq).where(
                Deployment.rollout_id == rid
            )
        ).all()
    assert len(records) == N
    assert len(deployments) == N
    for device_id, phase, seq in deployments:
        want = before[device_id] + 1
        assert (phase, seq, device_seq[device_id], records[device_id].seq) == ("notified", want, want, want)
        desired = validate_payload(verify_envelope(records[device_id].envelope, [director]), DesiredState)
        assert (desired.device_id, desired.seq, desired.rollout_id) == (device_id, want, rid)
        assert (desired.model, desired.version) == ("det", "2.0.0")

    # exactly one outbox message per device, carrying the stored signed envelope
    outbox = _outbox(ctx)
    topics = Counter(topic for topic, _ in outbox)
    assert set(topics) == {device_topic(d, TopicKind.desired) for d in before}
    assert set(topics.values()) == {1}
    for topic, payload in outbox:
        device_id = topic.split("/")[3]
        envelope = json.loads(payload)
        assert envelope == records[device_id].envelope
        assert verify_envelope(envelope, [director])["seq"] == before[device_id] + 1


def test_a_failing_first_chunk_stops_the_stage_before_the_next_chunk(
    app_client, admin_headers, ctx, onnx_model
):
    """The early-trip gate is judged before each chunk is signed: once the devices of the first
    chunk fail beyond ``max_failure_ratio``, no further device of the stage is told."""
    push(app_client, admin_headers, onnx_model, "2.0.0")
    _fleet(ctx)
    body = {
        "model": "det", "version": "2.0.0", "selector": {"tags": {"fleet": "big"}},
        "stages": [{"percent": 100, "soak_s": 0}], "max_concurrent_downloads": 10_000,
        "gates": {"max_failure_ratio": 0.05}, "on_failure": "pause",
    }  # fmt: skip
    r = app_client.post("/api/v1/rollouts", json=body, headers=admin_headers)
    assert r.status_code == 201, r.text
    rid = r.json()["id"]
    engine = RolloutEngine(ctx)
    engine.tick()
    assert len(_outbox(ctx)) == NOTIFY_CHUNK
    assert engine._more  # a next chunk is due at once...
    with ctx.db.session_scope() as s:  # ...but 10% of the stage fails meanwhile
        told = sa.select(Deployment.id).where(Deployment.rollout_id == rid, Deployment.phase == "notified")
        failing = s.scalars(told.limit(450)).all()
        s.execute(
            sa.update(Deployment).where(Deployment.id.in_(failing)).values(phase="failed", reason="boom")
        )
    engine._more = False
    engine.tick()
    assert len(_outbox(ctx)) == NOTIFY_CHUNK  # nobody else was told
    state = app_client.get(f"/api/v1/rollouts/{rid}", headers=admin_headers).json()
    assert state["status"] == "paused", state["reason"]
    assert "450 of 4500 devices failed" in state["reason"]
