"""MQTT ingest writes a batch with a fixed number of SQL statements, however many devices it holds.

Each kind of message (presence, reports, health windows) and a mix of all three is ingested once
for 3 devices and once for 1,000 devices, on SQLite and on PostgreSQL, counting the statements
sent to the database driver (every ``cursor.execute``/``executemany``). The counts must be equal:
any work done per device, per message or per chunk of devices adds statements as the batch grows.
Then the 1,000-device batch is checked to have been written completely.
"""

from __future__ import annotations

import json
from collections import Counter
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa
from sqlalchemy import event

from device_client.protocol import DesiredState, HealthWindow, Presence, Report, validate_payload
from device_client.protocol.signing import verify_envelope
from server.devices.tables import Device, DeviceEvent
from server.health.tables import HealthSample
from server.mqtt.handlers import IngestWorker
from server.rollouts.tables import Deployment, DesiredRecord, OutboxMessage
from tests.helpers.device_rows import notified_devices

SMALL, LARGE = 3, 1000
KINDS = ("presence", "reports", "health", "mixed")


def _messages(ids: list[str], kind: str) -> list[tuple[str, bytes, datetime]]:
    """Several messages per device, duplicates included (what a real batch holds)."""
    now = datetime.now(UTC)
    out = []
    for d in ids:
        if kind in ("presence", "mixed"):
            # coalesced per device: the last presence of the batch wins
            for status in ("offline", "online"):
                p = Presence.build(device_id=d, status=status, at=now, serving={"det": "1.0.0"})
                out.append((f"fleet/v1/d/{d}/presence", p.to_json(), now))
        if kind in ("reports", "mixed"):
            for seq, phase in ((1, "downloading"), (2, "installing"), (2, "installing")):  # one duplicate
                report = Report.build(
                    device_id=d, seq=seq, at=now, phase=phase, desired_seq=1, model="det", version="2.0.0",
                    serving={"det": "1.0.0"},
                )  # fmt: skip
                out.append((f"fleet/v1/d/{d}/report", report.to_json(), now))
        if kind in ("health", "mixed"):
            for seq in (1, 2, 2):  # one duplicate window; two consecutive 10 s periods
                at = now - timedelta(seconds=10 * (2 - seq))
                health = HealthWindow.build(
                    device_id=d, seq=seq, at=at, window_s=10, model="det", version="1.0.0", requests=10,
                    errors=seq - 1, p50_ms=1.0, p95_ms=2.0, p99_ms=3.0,
                )  # fmt: skip
                out.append((f"fleet/v1/d/{d}/health", health.to_json(), now))
    return out


def _statements(ctx, messages: list[tuple[str, bytes, datetime]]) -> list[str]:
    """The SQL statements the driver executes while one batch is ingested."""
    worker = IngestWorker(ctx, ctx.metrics)
    seen: list[str] = []

    def on_execute(_conn, _cursor, statement, _params, _context, _executemany) -> None:
        seen.append(" ".join(statement.split()[:4]))

    event.listen(ctx.db.engine, "before_cursor_execute", on_execute)
    try:
        worker.process(messages)
    finally:
        event.remove(ctx.db.engine, "before_cursor_execute", on_execute)
    return seen


def _rows(ctx, model, *where) -> int:
    with ctx.db.session_scope() as s:
        return int(s.scalar(sa.select(sa.func.count()).select_from(model).where(*where)))


@pytest.mark.parametrize("kind", KINDS)
def test_statements_per_batch_stay_constant_from_3_to_1000_devices(ctx, kind):
    small_ids = notified_devices(ctx, f"s{kind}", SMALL)
    large_ids = notified_devices(ctx, f"l{kind}", LARGE)
    small = _statements(ctx, _messages(small_ids, kind))
    duplicates = ctx.metrics.get("fleet_mqtt_duplicates_total", kind="report")
    outbox_before = _rows(ctx, OutboxMessage)
    large = _statements(ctx, _messages(large_ids, kind))
    grown = {k: (Counter(small)[k], n) for k, n in Counter(large).items() if n != Counter(small)[k]}
    assert len(large) == len(small), (
        f"{kind}: {len(small)} statements for {SMALL} devices, {len(large)} for {LARGE}; grown: {grown}"
    )
    assert small, "the batch wrote nothing"

    # and the large batch was written completely
    with ctx.db.session_scope() as s:
        devices = {r.id: r for r in s.execute(sa.select(Device).where(Device.id.in_(large_ids))).scalars()}
        phases = Counter(s.scalars(sa.select(Deployment.phase).where(Deployment.device_id.in_(large_ids))))
        records = {
            r.device_id: r
            for r in s.scalars(sa.select(DesiredRecord).where(DesiredRecord.device_id.in_(large_ids)))
        }
    assert len(devices) == LARGE
    if kind in ("presence", "reports", "mixed"):
        assert {d.status for d in devices.values()} == {"online"}
        assert {tuple(d.serving.items()) for d in devices.values()} == {(("det", "1.0.0"),)}
    if kind in ("presence", "mixed"):
        # every other device's state was about to expire: re-signed (seq 2), signed by the director
        resigned = large_ids[0::2]
        assert [d for d in large_ids if records[d].seq == 2] == resigned
        assert all(devices[d].desired_seq == (2 if i % 2 == 0 else 1) for i, d in enumerate(large_ids))
        public = ctx.director.key.public_key()
        for d in resigned:
            desired = validate_payload(verify_envelope(records[d].envelope, [public]), DesiredState)
            assert (desired.device_id, desired.seq, desired.target) == (d, 2, "det/2.0.0/default/bundle.tar")
            assert desired.expires_at > datetime.now(UTC) + timedelta(days=6)
        # every device that connected gets its state published again, retained: re-signed when
        # about to expire, else as stored (a broker that lost its retained messages gets them back)
        assert _rows(ctx, OutboxMessage) - outbox_before == LARGE
        with ctx.db.session_scope() as s:
            queued = s.execute(
                sa.select(OutboxMessage.topic, OutboxMessage.payload, OutboxMessage.retain)
                .where(OutboxMessage.id > outbox_before)
            ).all()
        seqs = {}
        for topic, payload, retain in queued:
            assert retain
            desired = validate_payload(verify_envelope(json.loads(payload), [public]), DesiredState)
            assert topic == f"fleet/v1/d/{desired.device_id}/desired"
            seqs[desired.device_id] = desired.seq
        assert seqs == {d: records[d].seq for d in large_ids}
    else:
        assert all(r.seq == 1 for r in records.values())
        assert _rows(ctx, OutboxMessage) == outbox_before == 0
    if kind in ("reports", "mixed"):
        assert phases == {"installing": LARGE}
        assert {d.last_report_seq for d in devices.values()} == {2}
        assert _rows(ctx, DeviceEvent, DeviceEvent.device_id.in_(large_ids)) == 2 * LARGE
        assert ctx.metrics.get("fleet_mqtt_duplicates_total", kind="report") - duplicates == LARGE
    else:
        assert phases == {"notified": LARGE}
    if kind in ("health", "mixed"):
        windows = _rows(ctx, HealthSample, HealthSample.device_id.in_(large_ids))
        errors = _rows(ctx, HealthSample, HealthSample.device_id.in_(large_ids), HealthSample.errors == 1)
        assert (windows, errors) == (2 * LARGE, LARGE)
    else:
        assert _rows(ctx, HealthSample, HealthSample.device_id.in_(large_ids)) == 0


def test_a_report_batch_sets_only_the_device_columns_that_changed(ctx):
    ids = notified_devices(ctx, "chg", 4)
    # online, serving 1.0.0 and known hardware already: what a report moves is seen-at and seq
    _statements(ctx, _messages(ids, "presence"))
    updates: list[str] = []

    def on_execute(_conn, _cursor, statement, _params, _context, _executemany) -> None:
        if statement.lstrip().upper().startswith("UPDATE DEVICES"):
            updates.append(statement)

    worker = IngestWorker(ctx, ctx.metrics)
    event.listen(ctx.db.engine, "before_cursor_execute", on_execute)
    try:
        worker.process(_messages(ids, "reports"))
    finally:
        event.remove(ctx.db.engine, "before_cursor_execute", on_execute)
    assert len(updates) == 1, updates
    set_clause = updates[0].split("WHERE")[0]
    assert "last_report_seq" in set_clause
    assert "last_seen_at" in set_clause
    for unchanged in ("status", "serving", "hardware"):
        assert unchanged not in set_clause, set_clause
    with ctx.db.session_scope() as s:
        q = sa.select(Device.status, Device.serving, Device.last_report_seq).where(Device.id.in_(ids))
        rows = s.execute(q)
        assert {(r.status, tuple(r.serving.items()), r.last_report_seq) for r in rows} == {
            ("online", (("det", "1.0.0"),), 2)
        }


def test_a_message_that_cannot_be_stored_is_rejected_alone(ctx):
    """A message that parses but that the database refuses (PostgreSQL refuses a NUL character
    in text, say; here a write that raises for one report, on both databases) must not drop the
    rest of its batch: the batch is split until that one message stands alone; it is rejected and
    counted, every other message is written."""

    class Refusing(IngestWorker):
        def write(self, session, batch) -> None:
            if any(r.seq == 7 for r in batch.reports):
                raise ValueError("the database refuses this value")
            super().write(session, batch)

    ids = notified_devices(ctx, "bis", 9)
    worker = Refusing(ctx, ctx.metrics)
    items = _messages(ids, "reports") + _messages(ids, "health")
    now = datetime.now(UTC)
    bad = Report.build(
        device_id=ids[4], seq=7, at=now, phase="downloading", desired_seq=1, model="det", version="2.0.0"
    )
    items.insert(len(items) // 2, (f"fleet/v1/d/{ids[4]}/report", bad.to_json(), now))

    assert worker.process(items) is True
    with ctx.db.session_scope() as s:
        events = s.execute(sa.select(DeviceEvent.device_id, DeviceEvent.seq)).all()
        windows = s.scalar(sa.select(sa.func.count()).select_from(HealthSample))
        phases = dict(s.execute(sa.select(Deployment.device_id, Deployment.phase)).all())
    assert sorted(events) == sorted((d, seq) for d in ids for seq in (1, 2))  # not seq 7
    assert windows == 2 * len(ids)
    assert {p.value for p in phases.values()} == {"installing"}, phases
    assert 'fleet_mqtt_rejected_total{kind="report",reason="unwritable"} 1' in ctx.metrics.render()


@pytest.mark.parametrize(
    ("change", "why"),
    [
        ({"at": "2026-11-28T10:00:00"}, "timezone"),
        ({"seq": 2**63}, "less than or equal"),
        ({"desired_seq": 2**31}, "less than or equal"),
        ({"model": "m" * 65}, "at most 64"),
        ({"details": {"note": "\ud800"}}, "lone UTF-16 surrogate"),
        ({"serving": {"det": "\udfff"}}, "lone UTF-16 surrogate"),
        ({"details": {"x": float("inf")}}, "not a JSON number"),
    ],
)
def test_reports_the_database_could_not_store_or_read_back_are_malformed(change, why):
    """Refused at parse time (counted as malformed): values past the columns' bounds, a naive
    time, and in free-form fields what JSON escapes allow but strict JSON readers refuse (the
    server reads JSON columns with orjson, which would fail on every later read of the row)."""
    from device_client.protocol import InvalidPayload, parse_payload

    now = datetime.now(UTC)
    good = Report.build(device_id="dev-1", seq=1, at=now, phase="downloading", desired_seq=1)
    body = {**json.loads(good.to_json()), **change}
    with pytest.raises(InvalidPayload, match=why):
        parse_payload(json.dumps(body).encode(), Report)


def test_a_resigned_state_carries_its_deployment_along(ctx):
    """A device back after its DesiredState expired gets it re-signed under a new seq; it installs
    that one and reports under the new seq, which must still move its deployment."""
    ids = notified_devices(ctx, "rs", 2)  # rs-0000's state expires within the re-sign window
    with ctx.db.session_scope() as s:
        s.execute(sa.update(Device).values(status="offline"))
    worker = IngestWorker(ctx, ctx.metrics)
    now = datetime.now(UTC)
    online = [
        (f"fleet/v1/d/{d}/presence", Presence.build(device_id=d, status="online", at=now).to_json(), now)
        for d in ids
    ]
    assert worker.process(online)
    with ctx.db.session_scope() as s:
        seqs = dict(s.execute(sa.select(Deployment.device_id, Deployment.desired_seq)).all())
        records = dict(s.execute(sa.select(DesiredRecord.device_id, DesiredRecord.seq)).all())
    assert records == {ids[0]: 2, ids[1]: 1}  # only the expiring one was re-signed
    assert seqs == records
    report = Report.build(device_id=ids[0], seq=1, at=now, phase="downloading", desired_seq=2)
    assert worker.process([(f"fleet/v1/d/{ids[0]}/report", report.to_json(), now)])
    with ctx.db.session_scope() as s:
        phase = s.scalar(sa.select(Deployment.phase).where(Deployment.device_id == ids[0]))
    assert phase.value == "downloading"


def test_a_will_after_reports_in_one_batch_leaves_the_device_offline(ctx):
    """Reports the device sent just before its connection died, and the will the broker then
    published, land in one batch: the device is offline (before, the reports, written after the
    batch's presence, set it back online)."""
    d = notified_devices(ctx, "will", 2)[1]  # (its state is not about to expire: no re-sign moves its seq)
    worker = IngestWorker(ctx, ctx.metrics)
    now = datetime.now(UTC)
    online = Presence.build(device_id=d, status="online", at=now)
    assert worker.process([(f"fleet/v1/d/{d}/presence", online.to_json(), now)])
    report = Report.build(device_id=d, seq=1, at=now, phase="downloading", desired_seq=1)
    will = Presence.build(device_id=d, status="offline")
    assert worker.process([
        (f"fleet/v1/d/{d}/report", report.to_json(), now), (f"fleet/v1/d/{d}/presence", will.to_json(), now),
    ])  # fmt: skip
    with ctx.db.session_scope() as s:
        device = s.get(Device, d)
        phase = s.scalar(sa.select(Deployment.phase).where(Deployment.device_id == d))
    assert (device.status, device.last_report_seq, phase.value) == ("offline", 1, "downloading")


def test_last_seen_only_moves_forward(ctx):
    """A will carries the time its connection began, and reports queued while offline arrive after
    the fresh presence: neither moves ``last_seen_at`` back."""
    d = notified_devices(ctx, "seen", 2)[1]
    worker = IngestWorker(ctx, ctx.metrics)
    now = datetime.now(UTC).replace(microsecond=0)
    connected = now - timedelta(minutes=10)
    online = Presence.build(device_id=d, status="online", at=connected)
    report = Report.build(device_id=d, seq=1, at=now, phase="downloading", desired_seq=1)
    assert worker.process([(f"fleet/v1/d/{d}/presence", online.to_json(), now)])
    assert worker.process([(f"fleet/v1/d/{d}/report", report.to_json(), now)])
    will = Presence.build(device_id=d, status="offline", at=connected)  # the will, set at connect
    assert worker.process([(f"fleet/v1/d/{d}/presence", will.to_json(), now)])
    with ctx.db.session_scope() as s:
        device = s.get(Device, d)
    assert device.status == "offline"
    assert device.last_seen_at == now
    back = Presence.build(device_id=d, status="online", at=now + timedelta(minutes=5))
    queued = Report.build(device_id=d, seq=2, at=now + timedelta(minutes=1), phase="verifying", desired_seq=1)
    assert worker.process([
        (f"fleet/v1/d/{d}/presence", back.to_json(), now), (f"fleet/v1/d/{d}/report", queued.to_json(), now),
    ])  # fmt: skip
    with ctx.db.session_scope() as s:
        device = s.get(Device, d)
    assert (device.status, device.last_report_seq) == ("online", 2)
    assert device.last_seen_at == now + timedelta(minutes=5)


def test_only_a_fresh_connect_republishes_and_re_signs(ctx):
    """A retained presence replayed to the server (it re-subscribed) is no reconnect: nothing is
    published. A fresh connect of a device the server still holds online (its broker died without
    firing wills) gets its state again, re-signed when it is about to expire."""
    d_old, d_keep = notified_devices(ctx, "fresh", 2)  # d_old's state expires within the hour
    now = datetime.now(UTC)
    with ctx.db.session_scope() as s:
        s.execute(sa.update(Device).values(status="online", last_seen_at=now))
    worker = IngestWorker(ctx, ctx.metrics)
    before = _rows(ctx, OutboxMessage)

    def presence(d: str, at: datetime) -> tuple[str, bytes, datetime]:
        msg = Presence.build(device_id=d, status="online", at=at)
        return (f"fleet/v1/d/{d}/presence", msg.to_json(), now)

    replayed = now - timedelta(minutes=5)
    assert worker.process([presence(d_old, replayed), presence(d_keep, replayed)])
    assert _rows(ctx, OutboxMessage) == before
    later = now + timedelta(seconds=1)
    assert worker.process([presence(d_old, later), presence(d_keep, later)])
    with ctx.db.session_scope() as s:
        records = dict(s.execute(sa.select(DesiredRecord.device_id, DesiredRecord.seq)).all())
    assert (records[d_old], records[d_keep]) == (2, 1)  # re-signed though it never looked offline
    assert _rows(ctx, OutboxMessage) - before == 2
