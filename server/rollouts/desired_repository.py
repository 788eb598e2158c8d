"""Queries of the signed DesiredStates the server holds per device (``desired_states``)."""

from __future__ import annotations

import builtins
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from server.bulk import execute_many
from server.devices.tables import Device, DeviceStatus
from server.errors import SeqRace
from server.rollouts.tables import DesiredRecord


class DesiredRepository:
    def __init__(self, session: Session) -> None:
        self.session = session

    def get(self, device_id: str) -> DesiredRecord | None:
        return self.session.get(DesiredRecord, device_id)

    def routing_of(
        self, device_ids: Sequence[str], model: str, chunk: int = 5000
    ) -> dict[str, dict[str, Any]]:
        """The routing policy each of ``device_ids`` holds for ``model``: its DesiredState's, for the
        devices whose DesiredState names ``model`` and carries one (only that field is read)."""
        policy = DesiredRecord.envelope[("signed", "routing")]
        out: dict[str, dict[str, Any]] = {}
        for i in range(0, len(device_ids), chunk):
            q = sa.select(DesiredRecord.device_id, policy).where(
                DesiredRecord.device_id.in_(list(device_ids[i : i + chunk])), DesiredRecord.model == model
            )
            out.update((d, routing) for d, routing in self.session.execute(q) if isinstance(routing, dict))
        return out

    def upsert(self, record: DesiredRecord) -> DesiredRecord:
        return self.session.merge(record)

    def insert_many(self, rows: list[dict[str, Any]]) -> None:
        """One multi-row INSERT of new records (no ORM objects: the engine signs thousands)."""
        if rows:
            self.session.execute(sa.insert(DesiredRecord.__table__), rows)

    def upsert_many(self, rows: list[dict[str, Any]]) -> None:
        """Insert or replace many devices' records (one prepared upsert, executemany)."""
        if not rows:
            return
        table = DesiredRecord.__table__
        dialect = self.session.get_bind().dialect.name
        ins = postgresql.insert(table) if dialect == "postgresql" else sqlite.insert(table)
        columns = [c for c in rows[0] if c != "device_id"]
        stmt = ins.on_conflict_do_update(
            index_elements=["device_id"],
            set_={c: getattr(ins.excluded, c) for c in columns},
        )
        execute_many(self.session, stmt, rows)

    def set_device_seqs(self, seqs: dict[str, int]) -> None:
        """``devices.desired_seq`` of many devices: the seq of the state just signed for each,
        which must be the seq read plus one. A device whose seq moved meanwhile (another state
        issued for it by a concurrent transaction) raises :class:`SeqRace`: the caller's
        transaction rolls back instead of publishing a second state under the same seq."""
        if not seqs:
            return
        t = Device.__table__
        stmt = (
            sa.update(t)
            .where(t.c.id == sa.bindparam("d__"))
            .where(sa.func.coalesce(t.c.desired_seq, 0) == sa.bindparam("old__"))
            .values(desired_seq=sa.bindparam("new__"))
        )
        rows = [{"d__": d, "old__": s - 1, "new__": s} for d, s in sorted(seqs.items())]
        changed = execute_many(self.session, stmt, rows)
        if changed != len(rows):
            raise SeqRace(
                f"{len(rows) - changed} of {len(rows)} devices were issued another desired state meanwhile"
            )

    def for_devices(self, device_ids: Sequence[str], chunk: int = 500) -> builtins.list[DesiredRecord]:
        out: list[DesiredRecord] = []
        for i in range(0, len(device_ids), chunk):
            q = sa.select(DesiredRecord).where(DesiredRecord.device_id.in_(list(device_ids[i : i + chunk])))
            out.extend(self.session.scalars(q))
        return out

    def assigned_variants(
        self, rollout_id: str, version: str, device_ids: Iterable[str], chunk: int = 500
    ) -> dict[str, str]:
        """{device id: the variant the server signed for it} in this rollout of ``version``, for
        those of ``device_ids`` it holds (two columns: no envelopes read)."""
        ids = sorted(set(device_ids))
        out: dict[str, str] = {}
        for i in range(0, len(ids), chunk):
            q = sa.select(DesiredRecord.device_id, DesiredRecord.variant).where(
                DesiredRecord.device_id.in_(ids[i : i + chunk]),
                DesiredRecord.rollout_id == rollout_id,
                DesiredRecord.version == version,
            )
            out.update((d, v) for d, v in self.session.execute(q))
        return out

    def current_envelopes(
        self, device_ids: Sequence[str], valid_after: datetime
    ) -> builtins.list[tuple[str, Any]]:
        """(device id, envelope) of the DesiredStates of ``device_ids`` (not decommissioned) still
        valid after ``valid_after``: one SELECT, no ORM objects."""
        if not device_ids:
            return []
        q = (
            sa.select(DesiredRecord.device_id, DesiredRecord.envelope)
            .join(Device, Device.id == DesiredRecord.device_id)
            .where(
                DesiredRecord.device_id.in_(list(device_ids)),
                DesiredRecord.expires_at > valid_after,
                Device.status != DeviceStatus.decommissioned,
            )
            .order_by(DesiredRecord.device_id)
        )
        return [(r.device_id, r.envelope) for r in self.session.execute(q)]

    def expiring_with_seq(
        self, device_ids: Sequence[str], before: datetime
    ) -> builtins.list[tuple[str, dict[str, Any], int]]:
        """(device id, envelope, ``devices.desired_seq``) of the records of ``device_ids`` (not
        decommissioned) that expire by ``before``: one SELECT, no ORM objects."""
        if not device_ids:
            return []
        q = (
            sa.select(DesiredRecord.device_id, DesiredRecord.envelope, Device.desired_seq)
            .join(Device, Device.id == DesiredRecord.device_id)
            .where(
                DesiredRecord.device_id.in_(list(device_ids)),
                DesiredRecord.expires_at <= before,
                Device.status != DeviceStatus.decommissioned,
            )
            .order_by(DesiredRecord.device_id)
        )
        return [(r.device_id, r.envelope, r.desired_seq or 0) for r in self.session.execute(q)]
