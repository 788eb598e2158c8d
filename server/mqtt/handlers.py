"""Ingest of device messages: parse, validate, deduplicate, and write in batches.

The paho thread only enqueues raw messages. :class:`IngestWorker` drains the queue in batches
(up to ``ingest_batch_max`` messages or ``ingest_batch_delay_s``) and writes each batch in ONE
transaction: presence coalesced per device, reports deduplicated by the device-monotonic ``seq``
and applied to deployments through the pure deployment state machine, health windows inserted with
``ON CONFLICT DO NOTHING``. On PostgreSQL the batch locks its devices' rows first (in id order),
so replicas that each received some of one device's reports apply them one batch after the other
instead of overwriting each other's phase and ``last_report_seq``. Health windows must be plausible
(:mod:`server.health.plausibility`). Every rejection (bad topic, bad JSON, wrong schema, device id
mismatch, unknown or decommissioned device, stale report, implausible window) is counted in
``fleet_mqtt_rejected_total`` and logged; nothing here can take the server down. What a report
says in ``details`` is kept under the deployment's ``details["device"]``, apart from the server's
own bookkeeping.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from device_client.protocol import (
    HealthWindow,
    InvalidPayload,
    InvalidTopic,
    Presence,
    Report,
    TopicKind,
    parse_payload,
    parse_topic,
)
from server.bulk import bulk_update, insert_ignore
from server.db import utcnow
from server.devices.repository import DeviceRepository, DeviceState
from server.devices.tables import Device, DeviceEvent, DeviceStatus
from server.errors import SeqRace
from server.health.plausibility import Limits, implausible, overlapping, span_queries
from server.health.repository import HealthWindowRepository
from server.health.tables import ROUTING_FIELDS, HealthSample
from server.metrics import Metrics
from server.rollouts.desired import DesiredStateService
from server.rollouts.machine import IllegalTransition, deployment_transition
from server.rollouts.repository import DeploymentRepository, DeploymentState

if TYPE_CHECKING:
    from server.context import ServerContext

log = logging.getLogger(__name__)

REJECTED = "fleet_mqtt_rejected_total"
RECEIVED = "fleet_mqtt_received_total"
_MODELS = {TopicKind.report: Report, TopicKind.health: HealthWindow, TopicKind.presence: Presence}


def _saw(device: DeviceState, at: datetime) -> None:
    """``last_seen_at`` only moves forward: a will carries the time its connection began, and
    reports queued on the device while it was offline arrive after its fresh presence."""
    if device.last_seen_at is None or at > device.last_seen_at:
        device.last_seen_at = at


@dataclass
class Batch:
    presence: list[Presence]
    reports: list[Report]
    health: list[HealthWindow]

    def __len__(self) -> int:
        return len(self.presence) + len(self.reports) + len(self.health)

    def halves(self) -> tuple[Batch, Batch]:
        """Two batches of about half the messages each, in write order (presence, reports, health),
        each list keeping its order: a device's earlier messages land in the first half."""
        tagged = [*((0, m) for m in self.presence), *((1, m) for m in self.reports),
                  *((2, m) for m in self.health)]  # fmt: skip
        out = []
        for part in (tagged[: len(tagged) // 2], tagged[len(tagged) // 2 :]):
            lists: tuple[list[Any], list[Any], list[Any]] = ([], [], [])
            for kind, m in part:
                lists[kind].append(m)
            out.append(Batch(*lists))
        return out[0], out[1]


class IngestWorker:
    def __init__(
        self, ctx: ServerContext, metrics: Metrics, on_batch: Callable[[Batch], None] | None = None
    ) -> None:
        self.ctx = ctx
        self.metrics = metrics
        self.queue: queue.Queue[tuple[str, bytes, datetime, Callable[[], object] | None]] = queue.Queue()
        self.batch_max = ctx.settings.ingest_batch_max
        self.batch_delay = ctx.settings.ingest_batch_delay_s
        s = ctx.settings
        self.limits = Limits(s.health_max_rps, s.health_max_window_s, s.health_max_clock_skew_s)
        self.on_batch = on_batch
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._idle = threading.Event()
        self._idle.set()

    # -- plumbing ------------------------------------------------------------------------------
    def submit(
        self, topic: str, payload: bytes, received_at: datetime, ack: Callable[[], object] | None = None
    ) -> None:
        """Queue one message; ``ack`` (the link's PUBACK for it) is called once its batch is
        settled: written, or rejected as bad input. Until then the broker holds the message, so
        a crash before the commit loses nothing: the broker delivers it again."""
        self._idle.clear()
        self.queue.put((topic, payload, received_at, ack))

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="mqtt-ingest", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def wait_idle(self, timeout: float) -> bool:
        """True once everything submitted so far has been written (for tests and shutdown)."""
        return self._idle.wait(timeout)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                first = self.queue.get(timeout=0.2)
            except queue.Empty:
                if self.queue.empty():
                    self._idle.set()
                continue
            items = [first]
            deadline = time.monotonic() + self.batch_delay
            while len(items) < self.batch_max:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    items.append(self.queue.get(timeout=remaining))
                except queue.Empty:
                    break
            try:
                settled = self.process([item[:3] for item in items])
            except Exception:  # never let one bad batch stop the ingest thread
                log.exception("ingest batch failed; dropped %d messages", len(items))
                self.metrics.inc(REJECTED, len(items), kind="batch", reason="internal_error")
                settled = True
            if settled:  # in arrival order, as MQTT wants PUBACKs
                for item in items:
                    if item[3] is not None:
                        item[3]()
            if self.queue.empty():
                self._idle.set()

    def reject(self, kind: str, reason: str, detail: str) -> None:
        self.metrics.inc(REJECTED, kind=kind, reason=reason, help="device messages rejected")
        log.warning("rejected %s message: %s: %s", kind, reason, detail)

    # -- parsing -------------------------------------------------------------------------------
    def parse(self, items: Sequence[tuple[str, bytes, datetime]]) -> Batch:
        batch = Batch([], [], [])
        for topic, payload, received_at in items:
            try:
                device_id, kind = parse_topic(topic)
            except InvalidTopic as exc:
                self.reject("unknown", exc.code, str(exc))
                continue
            self.metrics.inc(RECEIVED, kind=kind.value, help="device messages received")
            if kind not in _MODELS:
                self.reject(kind.value, "unexpected_topic", topic)
                continue
            try:
                msg = parse_payload(payload, _MODELS[kind])
            except InvalidPayload as exc:
                self.reject(kind.value, exc.code, str(exc))
                continue
            if msg.device_id != device_id:  # type: ignore[attr-defined]
                self.reject(kind.value, "device_mismatch", f"{msg.device_id} on {topic}")  # type: ignore[attr-defined]
                continue
            if isinstance(msg, HealthWindow):
                wrong = implausible(msg, received_at, self.limits)
                if wrong is not None:
                    self.reject(kind.value, wrong[0], f"{device_id}: {wrong[1]}")
                    continue
            getattr(
                batch, {"report": "reports", "health": "health", "presence": "presence"}[kind.value]
            ).append(msg)
        return batch

    def process(self, items: Sequence[tuple[str, bytes, datetime]]) -> bool:
        """Parse and write one batch. True once it is settled (written, or rejected as bad
        input); False only if the worker was stopped while the database stayed unreachable: the
        batch is not acknowledged and the broker delivers it again. A database error (connection
        dropped, database locked) is retried with a growing pause, however long it lasts, so an
        outage holds messages in the broker instead of dropping them. Any other error is the
        data's: the batch is split in halves and each written on its own, down to the one message
        that cannot be stored, which alone is rejected (counted, logged); the rest are written."""
        batch = self.parse(items)
        if not len(batch):
            return True
        return self._settle(batch)

    def _settle(self, batch: Batch) -> bool:
        try:
            if not self._write_retrying(batch):
                return False
        except Exception:
            if len(batch) == 1:
                kinds = (("presence", batch.presence), ("report", batch.reports), ("health", batch.health))
                kind, msg = next((k, m) for k, ms in kinds for m in ms)
                log.exception("rejected %s message of %s: it cannot be stored", kind, msg.device_id)
                self.metrics.inc(REJECTED, kind=kind, reason="unwritable", help="device messages rejected")
                return True
            first, second = batch.halves()
            return self._settle(first) and self._settle(second)
        if self.on_batch is not None:
            self.on_batch(batch)
        return True

    def _write_retrying(self, batch: Batch) -> bool:
        """Write ``batch`` in one transaction, retrying database errors until it is written (True)
        or the worker stops (False). Other exceptions propagate."""
        attempt = 0
        while True:
            try:
                with self.ctx.db.session_scope() as session:
                    self.write(session, batch)
                return True
            except (OperationalError, SeqRace) as exc:  # connection dropped, database locked, a
                # DesiredState issued concurrently for one of the batch's devices: retry the batch
                attempt += 1
                self.metrics.inc(
                    "fleet_ingest_retries_total", help="ingest batches retried after a database error"
                )
                log.warning("ingest write failed (%s); retry %d", str(exc).splitlines()[0], attempt)
                if self._stop.wait(min(0.2 * 2 ** min(attempt - 1, 5), 5.0)):
                    return False

    # -- writing -------------------------------------------------------------------------------
    def write(self, session: Session, batch: Batch) -> None:
        """Write one batch with a handful of statements whatever its size: one SELECT of the
        devices, one multi-row INSERT of events and of health windows, one SELECT and one bulk
        UPDATE of deployments, one bulk UPDATE of devices (coalesced: one row per device)."""
        ids = {m.device_id for m in (*batch.presence, *batch.reports, *batch.health)}
        # locked (PostgreSQL) until commit: replicas sharing the subscription serialize per device
        devices = DeviceRepository(session).ingest_state(ids, lock=True)
        now = utcnow()

        def known(kind: str, device_id: str) -> DeviceState | None:
            device = devices.get(device_id)
            if device is None or device.status == DeviceStatus.decommissioned:
                self.reject(kind, "unknown_device", device_id)
                return None
            return device

        touched: dict[str, DeviceState] = {}
        came_online: list[str] = []
        #: devices that (re)connected: each says so with a fresh presence "online" at every connect,
        #: also when the server still holds them online (a broker that died fires no wills)
        connected: list[str] = []
        latest_presence: dict[str, Presence] = {}
        for p in batch.presence:
            latest_presence[p.device_id] = p  # coalesce: the last one in the batch wins
        for p in latest_presence.values():
            device = known("presence", p.device_id)
            if device is None:
                continue
            was_online = device.status == DeviceStatus.online
            # a retained presence replayed to the server (it re-subscribed after a restart or a
            # reconnect) is no newer than what the server has seen of the device since
            fresh = p.at is None or device.last_seen_at is None or p.at > device.last_seen_at
            device.status = DeviceStatus.online if p.status == "online" else DeviceStatus.offline
            _saw(device, p.at or now)
            if p.serving:
                device.serving = dict(p.serving)
            if p.hardware is not None:
                device.hardware = p.hardware.model_dump(mode="json")
            if p.status == "online":
                if fresh:
                    connected.append(device.id)
                if not was_online:
                    came_online.append(device.id)
            touched[device.id] = device

        # a device whose last presence here is its will went offline after these reports were sent
        # (a reconnecting device says "online" before it reports again): reports do not undo it
        gone = {d for d, p in latest_presence.items() if p.status == "offline"}
        self._write_reports(session, batch.reports, known, touched, now, gone)

        health_rows = []
        for h in self._fresh_windows(session, [h for h in batch.health if known("health", h.device_id)]):
            health_rows.append(
                {
                    "device_id": h.device_id,
                    "seq": h.seq,
                    "at": h.at,
                    "window_s": h.window_s,
                    "model": h.model,
                    "version": h.version,
                    "mode": h.mode.value,
                    "requests": h.requests,
                    "errors": h.errors,
                    "p50_ms": h.p50_ms,
                    "p95_ms": h.p95_ms,
                    "p99_ms": h.p99_ms,
                    "shadow_requests": h.shadow_requests,
                    "agreement": h.agreement,
                    "shadow_p95_ms": h.shadow_p95_ms,
                    **{f: getattr(h, f) for f in ROUTING_FIELDS},
                }
            )
        insert_ignore(session, HealthSample.__table__, health_rows, ["device_id", "seq"])  # type: ignore[arg-type]

        rows = [touched[k].changes() for k in sorted(touched)]  # id order, as the locks were taken
        bulk_update(session, Device.__table__, rows)  # type: ignore[arg-type]

        if came_online:
            DeploymentRepository(session).restart_clocks(sorted(came_online), now)
        returning = sorted(set(connected) | set(came_online))
        if returning:
            DesiredStateService(session, self.ctx).republish_current(returning)
            resigned = DesiredStateService(session, self.ctx).resign_expiring_ids(returning)
            if resigned:
                log.info("re-signed %d expiring desired states for returning devices", resigned)

    def _fresh_windows(self, session: Session, windows: list[HealthWindow]) -> list[HealthWindow]:
        """``windows`` without those whose period overlaps a window already stored (or an earlier
        one of the batch) for the same device, model, version and mode: a device reports each
        period once (re-sent windows, under their own seq, are left to the store to ignore)."""
        if not windows:
            return windows
        repo = HealthWindowRepository(session)
        stored = [row for ids, after in span_queries(windows) for row in repo.spans(ids, after)]
        rejected = set(overlapping(windows, stored))
        for i in sorted(rejected):
            h = windows[i]
            what = f"{h.device_id}: {h.model} {h.version} {h.mode.value} window ending {h.at.isoformat()}"
            self.reject("health", "overlapping_window", what)
        return [h for i, h in enumerate(windows) if i not in rejected]

    def _write_reports(
        self,
        session: Session,
        reports: list[Report],
        known: Callable[[str, str], DeviceState | None],
        touched: dict[str, DeviceState],
        now: datetime,
        gone: set[str],
    ) -> None:
        per_device: dict[str, list[Report]] = defaultdict(list)
        for r in reports:
            per_device[r.device_id].append(r)
        fresh: list[Report] = []
        for device_id, items in per_device.items():
            device = known("report", device_id)
            if device is None:
                continue
            items.sort(key=lambda r: r.seq)
            for r in items:
                if r.seq <= device.last_report_seq:
                    self.metrics.inc(
                        "fleet_mqtt_duplicates_total", kind="report", help="duplicate device messages ignored"
                    )
                    continue
                device.last_report_seq = r.seq
                fresh.append(r)
                if r.serving:
                    device.serving = dict(r.serving)
                _saw(device, r.at)
                if device.status != DeviceStatus.online and device_id not in gone:
                    device.status = DeviceStatus.online
                touched[device.id] = device
        insert_ignore(
            session,
            DeviceEvent.__table__,
            [  # type: ignore[arg-type]
                {
                    "device_id": r.device_id,
                    "seq": r.seq,
                    "at": r.at,
                    "received_at": now,
                    "phase": r.phase.value,
                    "rollout_id": r.rollout_id,
                    "desired_seq": r.desired_seq,
                    "model": r.model,
                    "version": r.version,
                    "reason": r.reason,
                    "details": r.details,
                }
                for r in fresh
            ],
            ["device_id", "seq"],
        )
        pairs = [(r.device_id, r.desired_seq) for r in fresh if r.desired_seq is not None]
        repo = DeploymentRepository(session)
        deployments = repo.states_for_desired(pairs)  # type: ignore[arg-type]
        # a seq its deployment left behind (re-signed while the device worked on it), by rollout
        behind = [r for r in fresh if r.desired_seq is not None and r.rollout_id
                  and (r.device_id, r.desired_seq) not in deployments]  # fmt: skip
        if behind:
            by_rollout = repo.states_for_rollouts([(r.device_id, r.rollout_id) for r in behind])  # type: ignore[misc]
            for r in behind:
                dep = by_rollout.get((r.device_id, r.rollout_id))  # type: ignore[arg-type]
                if dep is not None and r.desired_seq in dep.details.get("resigned_from", ()):
                    deployments[(r.device_id, r.desired_seq or 0)] = dep
        changed: dict[int, DeploymentState] = {}
        for r in fresh:
            dep = deployments.get((r.device_id, r.desired_seq or 0))
            if dep is None or dep.phase == r.phase:
                continue
            try:
                dep.phase = deployment_transition(dep.phase, r.phase)
            except IllegalTransition as exc:
                self.metrics.inc(
                    REJECTED, kind="report", reason="stale_report", help="device messages rejected"
                )
                log.info("ignored report for deployment %s: %s", dep.id, exc)
                continue
            if r.reason:
                dep.reason = r.reason
            if r.details:  # the device's say, apart from the server's own keys (mode, resigned_from...)
                dep.details = {**dep.details, "device": {**dep.details.get("device", {}), **r.details}}
            changed[dep.id] = dep
        repo.update_states([changed[k] for k in sorted(changed)])
