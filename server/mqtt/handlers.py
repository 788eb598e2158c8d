"""Ingest of device messages: parse, validate, and write in batches.

The paho thread only enqueues raw messages. :class:`IngestWorker` drains the queue in batches
(up to ``ingest_batch_max`` messages or ``ingest_batch_delay_s``), rejects what does not parse or
is implausible (:mod:`server.health.plausibility`), and writes each batch in ONE transaction
through the domains: the registry locks the batch's devices and applies presence and the reports'
bookkeeping (:mod:`server.devices.ingest`), reports move deployments and returning devices get
their DesiredState again (:mod:`server.rollouts.ingest`), health windows are stored
(:mod:`server.health.ingest`). Every rejection (bad topic, bad JSON, wrong schema, device id
mismatch, unknown or decommissioned device, stale report, implausible or overlapping window) is
counted in ``fleet_mqtt_rejected_total`` and logged; nothing here can take the server down.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from device_client.loop import BackgroundLoop
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
from server.db import utcnow
from server.devices.ingest import BatchDevices
from server.errors import SeqRace
from server.health.ingest import store_windows
from server.health.plausibility import Limits, implausible
from server.metrics import Metrics
from server.rollouts.ingest import apply_reports, welcome_back

if TYPE_CHECKING:
    from server.context import ServerContext

log = logging.getLogger(__name__)

REJECTED = "fleet_mqtt_rejected_total"
RECEIVED = "fleet_mqtt_received_total"
_Message = Report | HealthWindow | Presence
_MODELS: dict[TopicKind, type[_Message]] = {
    TopicKind.report: Report,
    TopicKind.health: HealthWindow,
    TopicKind.presence: Presence,
}


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
        self._idle = threading.Event()
        self._idle.set()
        self._stop = threading.Event()
        self._loop = BackgroundLoop(
            "mqtt-ingest", self._step, self._stop, failure="ingest step failed; going on", logger=log
        )

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
        self._loop.start()

    def stop(self) -> None:
        self._stop.set()
        self._loop.join(10)

    def wait_idle(self, timeout: float) -> bool:
        """True once everything submitted so far has been written (for tests and shutdown)."""
        return self._idle.wait(timeout)

    def _step(self) -> None:
        """Take the next batch off the queue (waiting up to 0.2 s for its first message) and settle it."""
        try:
            first = self.queue.get(timeout=0.2)
        except queue.Empty:
            if self.queue.empty():
                self._idle.set()
            return
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
            if msg.device_id != device_id:
                self.reject(kind.value, "device_mismatch", f"{msg.device_id} on {topic}")
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
        now = utcnow()
        messages: list[Presence | Report | HealthWindow] = [*batch.presence, *batch.reports, *batch.health]
        devices = BatchDevices(
            session,
            (m.device_id for m in messages),
            now,
            unknown=lambda kind, device_id: self.reject(kind, "unknown_device", device_id),
        )
        returning = devices.presence(batch.presence)
        fresh, duplicates = devices.reports(batch.reports)
        if duplicates:
            self.metrics.inc("fleet_mqtt_duplicates_total", duplicates, kind="report",
                             help="duplicate device messages ignored")  # fmt: skip
        for deployment_id, exc in apply_reports(session, fresh):
            self.metrics.inc(REJECTED, kind="report", reason="stale_report", help="device messages rejected")
            log.info("ignored report for deployment %s: %s", deployment_id, exc)
        windows = [h for h in batch.health if devices.known("health", h.device_id)]
        for h in store_windows(session, windows):
            what = f"{h.device_id}: {h.model} {h.version} {h.mode.value} window ending {h.at.isoformat()}"
            self.reject("health", "overlapping_window", what)
        devices.flush()
        welcome_back(session, self.ctx, returning, now)
