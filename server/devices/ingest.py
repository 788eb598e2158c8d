"""What device messages change in the registry, one ingest batch at a time (:class:`BatchDevices`):
presence (online/offline, last seen, what the device serves, its hardware) and the bookkeeping of
reports (deduplicated by the device-monotonic ``seq``, kept as device events).

The batch's devices are read once and locked (PostgreSQL, in id order) until the commit, so
replicas that each received some of one device's messages apply them one batch after the other;
their changes are written back in one bulk UPDATE (:meth:`BatchDevices.flush`).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime

from sqlalchemy.orm import Session

from device_client.protocol import Presence, Report
from server.bulk import bulk_update, insert_ignore
from server.devices.repository import DeviceRepository, DeviceState
from server.devices.tables import Device, DeviceEvent, DeviceStatus

#: called with (message kind, device id) for a message of a device that is unknown or decommissioned
Unknown = Callable[[str, str], None]


def _saw(device: DeviceState, at: datetime) -> None:
    """``last_seen_at`` only moves forward: a will carries the time its connection began, and
    reports queued on the device while it was offline arrive after its fresh presence."""
    if device.last_seen_at is None or at > device.last_seen_at:
        device.last_seen_at = at


@dataclass
class Returning:
    """Devices of a batch that (re)connected."""

    #: devices the server did not hold online before
    came_online: list[str] = field(default_factory=list)
    #: devices that said so with a fresh presence "online" (every connect, also when the server
    #: still held them online: a broker that died fires no wills)
    connected: list[str] = field(default_factory=list)

    @property
    def all(self) -> list[str]:
        return sorted(set(self.connected) | set(self.came_online))


class BatchDevices:
    """The devices named by one batch, read and locked once, and what its messages change."""

    def __init__(self, session: Session, device_ids: Iterable[str], now: datetime, unknown: Unknown) -> None:
        self.session = session
        self.now = now
        self.unknown = unknown
        # locked (PostgreSQL) until commit: replicas sharing the subscription serialize per device
        self.devices = DeviceRepository(session).ingest_state(set(device_ids), lock=True)
        self.touched: dict[str, DeviceState] = {}
        #: devices whose last presence in the batch is their will: they went offline after the
        #: batch's reports were sent (a reconnecting device says "online" before it reports again)
        self.gone: set[str] = set()

    def known(self, kind: str, device_id: str) -> DeviceState | None:
        """The device, or None (reported to ``unknown``) if it is unknown or decommissioned."""
        device = self.devices.get(device_id)
        if device is None or device.status == DeviceStatus.decommissioned:
            self.unknown(kind, device_id)
            return None
        return device

    def presence(self, messages: list[Presence]) -> Returning:
        """Apply the last presence of each device in the batch."""
        latest: dict[str, Presence] = {}
        for p in messages:
            latest[p.device_id] = p  # coalesce: the last one in the batch wins
        returning = Returning()
        for p in latest.values():
            device = self.known("presence", p.device_id)
            if device is None:
                continue
            was_online = device.status == DeviceStatus.online
            # a retained presence replayed to the server (it re-subscribed after a restart or a
            # reconnect) is no newer than what the server has seen of the device since
            fresh = p.at is None or device.last_seen_at is None or p.at > device.last_seen_at
            device.status = DeviceStatus.online if p.status == "online" else DeviceStatus.offline
            _saw(device, p.at or self.now)
            if p.serving:
                device.serving = dict(p.serving)
            if p.hardware is not None:
                device.hardware = p.hardware.model_dump(mode="json")
            if p.status == "online":
                if fresh:
                    returning.connected.append(device.id)
                if not was_online:
                    returning.came_online.append(device.id)
            self.touched[device.id] = device
        self.gone = {d for d, p in latest.items() if p.status == "offline"}
        return returning

    def reports(self, reports: list[Report]) -> tuple[list[Report], int]:
        """Keep the reports each device has not sent before (a ``seq`` above its last), in seq
        order, and store them as device events; they update what it serves and when it was last
        seen, and bring it online (unless its will followed them in the batch). Returns the fresh
        reports and how many were duplicates."""
        per_device: dict[str, list[Report]] = defaultdict(list)
        for r in reports:
            per_device[r.device_id].append(r)
        fresh: list[Report] = []
        duplicates = 0
        for device_id, items in per_device.items():
            device = self.known("report", device_id)
            if device is None:
                continue
            items.sort(key=lambda r: r.seq)
            for r in items:
                if r.seq <= device.last_report_seq:
                    duplicates += 1
                    continue
                device.last_report_seq = r.seq
                fresh.append(r)
                if r.serving:
                    device.serving = dict(r.serving)
                _saw(device, r.at)
                if device.status != DeviceStatus.online and device_id not in self.gone:
                    device.status = DeviceStatus.online
                self.touched[device.id] = device
        insert_ignore(
            self.session,
            DeviceEvent.__table__,
            [
                {
                    "device_id": r.device_id,
                    "seq": r.seq,
                    "at": r.at,
                    "received_at": self.now,
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
        return fresh, duplicates

    def flush(self) -> None:
        """Write the changed devices: one bulk UPDATE, one row per device, in id order (the order
        their locks were taken in)."""
        rows = [self.touched[k].changes() for k in sorted(self.touched)]
        bulk_update(self.session, Device.__table__, rows)
