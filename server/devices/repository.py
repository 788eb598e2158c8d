"""Queries of the device registry."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from server.devices.tables import (
    Device,
    DeviceEvent,
    DeviceStatus,
    DeviceTag,
    EnrollmentToken,
    RevokedCertificate,
)

_INGEST_COLUMNS = ("status", "last_seen_at", "serving", "hardware", "last_report_seq")


def _tagged(device_id: Any, key: str, value: str) -> sa.Exists:
    """The device of ``device_id`` carries the tag ``key`` = ``value``."""
    return sa.exists().where(DeviceTag.device_id == device_id, DeviceTag.key == key, DeviceTag.value == value)


@dataclass
class DeviceState:
    """The columns MQTT ingest reads and writes, without an ORM object (ingest is batched)."""

    id: str
    status: DeviceStatus
    last_seen_at: datetime | None
    serving: dict[str, str]
    hardware: dict[str, Any]
    last_report_seq: int
    loaded: tuple[Any, ...] = ()  # the columns' values as read (see :meth:`changes`)

    def __post_init__(self) -> None:
        if not self.loaded:
            values = (getattr(self, c) for c in _INGEST_COLUMNS)
            self.loaded = tuple(dict(v) if isinstance(v, dict) else v for v in values)

    def changes(self) -> dict[str, Any]:
        """``id`` plus the columns whose values differ from those read: what an UPDATE must set.
        A report batch mostly moves ``last_seen_at`` and ``last_report_seq``; rewriting the
        unchanged JSON columns and the indexed ``status`` too made the UPDATE about twice as dear
        on SQLite (2,000 devices: ~80 ms against 31-48 ms)."""
        row: dict[str, Any] = {"id": self.id}
        for name, old in zip(_INGEST_COLUMNS, self.loaded, strict=True):
            value = getattr(self, name)
            if value != old:
                row[name] = value
        return row


class DeviceRepository:
    def __init__(self, session: Session) -> None:
        self.session = session

    def get(self, device_id: str) -> Device | None:
        return self.session.get(Device, device_id)

    def ingest_state(
        self, device_ids: Iterable[str], chunk: int = 5000, *, lock: bool = False
    ) -> dict[str, DeviceState]:
        """:class:`DeviceState` of each existing device among ``device_ids`` (one SELECT per chunk).

        ``lock``: on PostgreSQL, lock the rows (``FOR UPDATE``, in id order so two lockers cannot
        deadlock) until the transaction ends. Replicas sharing a subscription each get some of a
        device's reports; without the lock two of them could read the same ``last_report_seq`` and
        deployment phase and the later commit would overwrite the other's (a lost update)."""
        ids = sorted(set(device_ids))
        locking = lock and self.session.get_bind().dialect.name == "postgresql"
        out: dict[str, DeviceState] = {}
        for i in range(0, len(ids), chunk):
            q = sa.select(
                Device.id, Device.status, Device.last_seen_at, Device.serving, Device.hardware,
                Device.last_report_seq,
            ).where(Device.id.in_(ids[i : i + chunk]))  # fmt: skip
            if locking:
                q = q.order_by(Device.id).with_for_update()
            # the connection, not the session: plain rows, none of the ORM result machinery
            for row in self.session.connection().execute(q):
                out[row.id] = DeviceState(
                    row.id, row.status, row.last_seen_at, row.serving or {}, row.hardware or {},
                    row.last_report_seq or 0,
                )  # fmt: skip
        return out

    def existing(self, device_ids: Sequence[str]) -> set[str]:
        """Which of ``device_ids`` are taken (enrolled, or decommissioned: ids are never reused)."""
        out: set[str] = set()
        for i in range(0, len(device_ids), 1000):
            chunk = list(device_ids[i : i + 1000])
            out.update(self.session.scalars(sa.select(Device.id).where(Device.id.in_(chunk))))
        return out

    def add_all(self, devices: Sequence[Device]) -> None:
        self.session.add_all(devices)
        self.session.flush()

    def exists(self, device_id: str) -> bool:
        return self.session.scalar(sa.select(sa.literal(1)).where(Device.id == device_id)) is not None

    def add(self, device: Device) -> Device:
        self.session.add(device)
        self.session.flush()
        return device

    #: the columns a device listing shows (DeviceOut, less its tags)
    _LISTED = ("id", "status", "arch", "hardware", "serving", "created_at", "last_seen_at",
               "decommissioned_at", "cert_serial", "cert_not_after")  # fmt: skip

    def page(
        self,
        *,
        after_id: str | None,
        limit: int,
        tags: Sequence[tuple[str, str]] = (),
        status: DeviceStatus | None = None,
        arch: str | None = None,
    ) -> list[dict[str, Any]]:
        """Devices ordered by id, keyset-paginated (``id > after_id``), all filters ANDed: the
        listed columns plus ``tags`` ({key: value}) of each, as plain rows (two index-bound
        queries, no ORM objects: a page holds up to 1,000 devices)."""
        t = Device.__table__
        q = sa.select(*(t.c[c] for c in self._LISTED)).order_by(t.c.id).limit(limit)
        if after_id is not None:
            q = q.where(t.c.id > after_id)
        if status is not None:
            q = q.where(t.c.status == status)
        if arch is not None:
            q = q.where(t.c.arch == arch)
        for key, value in tags:
            q = q.where(_tagged(t.c.id, key, value))
        rows = [dict(r._mapping) for r in self.session.execute(q)]
        by_device: dict[str, dict[str, str]] = {r["id"]: {} for r in rows}
        if rows:
            tq = (
                sa.select(DeviceTag.device_id, DeviceTag.key, DeviceTag.value)
                .where(DeviceTag.device_id.in_(list(by_device)))
                .order_by(DeviceTag.device_id, DeviceTag.key)
            )
            for device_id, key, value in self.session.execute(tq):
                by_device[device_id][key] = value
        for r in rows:
            r["tags"] = by_device[r["id"]]
            r["serving"] = dict(r["serving"] or {})
        return rows

    def candidates(self, tags: dict[str, str], device_ids: Sequence[str], arch: str | None) -> list[Any]:
        """Rows (id, arch, hardware, serving) of the devices (not decommissioned) matching, by id (no ORM
        objects: a rollout may select 100,000 devices)."""
        q = (
            sa.select(Device.id, Device.arch, Device.hardware, Device.serving)
            .where(Device.status != DeviceStatus.decommissioned)
            .order_by(Device.id)
        )
        if device_ids:
            q = q.where(Device.id.in_(list(device_ids)))
        if arch:
            q = q.where(Device.arch == arch)
        for key, value in tags.items():
            q = q.where(_tagged(Device.id, key, value))
        return list(self.session.execute(q))

    def events(self, device_id: str, limit: int) -> Sequence[DeviceEvent]:
        q = (
            sa.select(DeviceEvent)
            .where(DeviceEvent.device_id == device_id)
            .order_by(DeviceEvent.seq.desc())
            .limit(limit)
        )
        return self.session.scalars(q).all()


class EnrollmentTokenRepository:
    def __init__(self, session: Session) -> None:
        self.session = session

    def get_for_update(self, token_id: str) -> EnrollmentToken | None:
        """The token row, locked (PostgreSQL) so that two enrollments cannot both use its last use."""
        q = sa.select(EnrollmentToken).where(EnrollmentToken.id == token_id).with_for_update()
        return self.session.scalars(q).first()

    def consume(self, token_id: str, uses: int) -> bool:
        """Take ``uses`` of the token's uses if it still has them, in one conditional UPDATE.

        Atomic on SQLite too, where ``FOR UPDATE`` does nothing: a read-then-write there lost the
        decrement of a concurrent enrollment (two bulk batches both read 50 uses left), so a token
        admitted more devices than it had uses."""
        q = (
            sa.update(EnrollmentToken)
            .where(EnrollmentToken.id == token_id, EnrollmentToken.uses_left >= uses)
            .values(uses_left=EnrollmentToken.uses_left - uses)
            .execution_options(synchronize_session=False)
        )
        return (self.session.execute(q).rowcount or 0) == 1  # type: ignore[attr-defined]  # DML: a CursorResult

    def get(self, token_id: str) -> EnrollmentToken | None:
        return self.session.get(EnrollmentToken, token_id)

    def add(self, token: EnrollmentToken) -> EnrollmentToken:
        self.session.add(token)
        self.session.flush()
        return token

    def list_active(self, now: datetime) -> Sequence[EnrollmentToken]:
        q = (
            sa.select(EnrollmentToken)
            .where(
                EnrollmentToken.revoked_at.is_(None),
                EnrollmentToken.expires_at > now,
                EnrollmentToken.uses_left > 0,
            )
            .order_by(EnrollmentToken.created_at)
        )
        return self.session.scalars(q).all()


class RevocationRepository:
    def __init__(self, session: Session) -> None:
        self.session = session

    def add(self, serial: str, device_id: str) -> None:
        if self.session.get(RevokedCertificate, serial) is None:
            self.session.add(RevokedCertificate(serial=serial, device_id=device_id))

    def all(self) -> list[tuple[str, datetime]]:
        rows = self.session.execute(sa.select(RevokedCertificate.serial, RevokedCertificate.revoked_at))
        return [(s, at) for s, at in rows]

    def is_revoked(self, serial: str) -> bool:
        """Whether the certificate ``serial`` (hex, as :func:`server.trust.pki.serial_hex`) is on the CRL."""
        return self.session.get(RevokedCertificate, serial) is not None
