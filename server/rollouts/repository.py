"""Queries of rollouts and deployments (desired states: :mod:`server.rollouts.desired_repository`)."""

from __future__ import annotations

import builtins
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from device_client.protocol.messages import DeploymentPhase
from server.bulk import bulk_update, execute_many
from server.devices.tables import Device, DeviceStatus
from server.health.repository import DeviceFilter
from server.rollouts.tables import Deployment, Rollout, RolloutStatus

#: a deployment phase by the name the ``phase`` column stores
PHASES = {p.name: p for p in DeploymentPhase}
#: deployments inserted at once from which PostgreSQL's statistics of the table are refreshed
ANALYZE_AFTER = 1000


@dataclass
class DeploymentState:
    """The columns a device report changes, without an ORM object (MQTT ingest is batched)."""

    id: int
    device_id: str
    desired_seq: int | None
    phase: DeploymentPhase
    reason: str | None
    details: dict[str, Any]


class DeploymentRepository:
    def __init__(self, session: Session) -> None:
        self.session = session

    def follow_resigned(
        self,
        moves: Sequence[tuple[str, int, int]],
        states: dict[tuple[str, int], DeploymentState] | None = None,
    ) -> None:
        """Deployments carried by a re-signed DesiredState, ``(device id, old seq, new seq)``,
        now wait for the new seq, and remember the old one in ``details["resigned_from"]``: a
        device that never took the old state (it had expired) installs the new one and reports
        under its seq; one that was already working on the old one may still report under that,
        and the ingest finds those through :meth:`states_for_rollouts`. ``states``: what
        :meth:`states_for_desired` returned for these (device id, old seq), if the caller has it."""
        new = {(d, o): n for d, o, n in moves}
        if states is None:
            states = self.states_for_desired(list(new))
        states = {key: st for key, st in states.items() if key in new}
        bulk_update(self.session, Deployment.__table__, [
            {"id": st.id, "desired_seq": new[key],
             "details": {**st.details, "resigned_from": [*st.details.get("resigned_from", []), key[1]]}}
            for key, st in sorted(states.items(), key=lambda kv: kv[1].id)
        ])  # fmt: skip

    def restart_clocks(self, device_ids: Sequence[str], now: datetime) -> None:
        """Devices that came back online: their ``notified`` deployments' timeout starts now.

        A device told while offline (its retained DesiredState waits in the broker) has had no
        chance to make progress; without this it would time out at its first tick back online,
        and count as a failure, if it was away longer than ``device_timeout_s``."""
        if device_ids:
            self.session.execute(
                sa.update(Deployment)
                .where(Deployment.device_id.in_(list(device_ids)))
                .where(Deployment.phase == DeploymentPhase.notified)
                .values(updated_at=now)
                .execution_options(synchronize_session=False)
            )

    def states_for_desired(
        self, pairs: Sequence[tuple[str, int]], chunk: int = 2000
    ) -> dict[tuple[str, int], DeploymentState]:
        """:class:`DeploymentState` keyed by (device_id, desired_seq)."""
        return self._states_by(Deployment.desired_seq, pairs, chunk)

    def states_for_rollouts(self, pairs: Sequence[tuple[str, str]]) -> dict[tuple[str, str], DeploymentState]:
        """:class:`DeploymentState` keyed by (device_id, rollout_id): a device has one deployment
        per rollout. For reports that name a seq the deployment has left behind (its DesiredState
        was re-signed under a new seq while the device worked on the old one: the old seq is in
        its ``details["resigned_from"]``)."""
        return self._states_by(Deployment.rollout_id, pairs)

    def _states_by(
        self, column: Any, pairs: Sequence[tuple[str, Any]], chunk: int = 2000
    ) -> dict[tuple[str, Any], DeploymentState]:
        """:class:`DeploymentState` keyed by (device_id, ``column``) for these pairs.

        Matched as ``device_id IN (...) AND column IN (...)`` (the device index), the exact pairs
        picked out here: PostgreSQL plans a row-value ``(device_id, desired_seq) IN (...)`` of
        2,000 pairs as a filter over the table, ~200 ms a batch at 10,000 deployments."""
        out: dict[tuple[str, Any], DeploymentState] = {}
        unique = list(dict.fromkeys(pairs))
        for i in range(0, len(unique), chunk):
            wanted = set(unique[i : i + chunk])
            q = sa.select(
                Deployment.id, Deployment.device_id, column.label("other"), Deployment.desired_seq,
                Deployment.phase, Deployment.reason, Deployment.details,
            ).where(
                Deployment.device_id.in_(sorted({d for d, _ in wanted})),
                column.in_(sorted({v for _, v in wanted})),
            )  # fmt: skip
            # the connection, not the session: plain rows, none of the ORM result machinery
            for r in self.session.connection().execute(q):
                key = (r.device_id, r.other)
                if key in wanted:
                    out[key] = DeploymentState(
                        r.id, r.device_id, r.desired_seq, r.phase, r.reason, r.details or {}
                    )
        return out

    def update_many(self, rows: list[dict[str, Any]]) -> None:
        """Bulk UPDATE of deployments by id (every dict with the same columns)."""
        bulk_update(self.session, Deployment.__table__, rows)

    def update_states(self, states: Sequence[DeploymentState]) -> None:
        """Write the phase, reason and details of many deployments in one bulk UPDATE."""
        bulk_update(
            self.session,
            Deployment.__table__,
            [{"id": s.id, "phase": s.phase, "reason": s.reason, "details": s.details} for s in states],
        )

    def add(self, deployment: Deployment) -> Deployment:
        self.session.add(deployment)
        return deployment

    def insert_many(self, rows: list[dict[str, Any]]) -> None:
        """One multi-row INSERT of new deployments (a rollout creates one per selected device).
        From :data:`ANALYZE_AFTER` rows on PostgreSQL, the table's statistics are refreshed in the
        same transaction: until autovacuum gets to it, the planner takes the new rollout for a
        handful of rows and probes the devices once per deployment in the status view's joins."""
        execute_many(self.session, sa.insert(Deployment.__table__), rows)
        if len(rows) >= ANALYZE_AFTER and self.session.get_bind().dialect.name == "postgresql":
            self.session.execute(sa.text(f"ANALYZE {Deployment.__tablename__}"))

    def latest_for_device(self, device_id: str) -> Deployment | None:
        q = (
            sa.select(Deployment)
            .where(Deployment.device_id == device_id)
            .order_by(Deployment.id.desc())
            .limit(1)
        )
        return self.session.scalars(q).first()

    def of_device_locked(self, device_id: str, phases: Sequence[DeploymentPhase]) -> Sequence[Deployment]:
        """The device's deployments in ``phases``, by id, locked ``FOR UPDATE`` until the
        transaction ends."""
        q = (
            sa.select(Deployment)
            .where(Deployment.device_id == device_id, Deployment.phase.in_(list(phases)))
            .order_by(Deployment.id)
            .with_for_update()
        )
        return self.session.scalars(q).all()


class RolloutRepository:
    def __init__(self, session: Session) -> None:
        self.session = session

    def add(self, rollout: Rollout) -> Rollout:
        self.session.add(rollout)
        self.session.flush()
        return rollout

    def get(self, rollout_id: str, *, for_update: bool = False) -> Rollout | None:
        q = sa.select(Rollout).where(Rollout.id == rollout_id)
        if for_update:
            q = q.with_for_update()
        return self.session.scalars(q).first()

    def already_on_version(self, rollout: Rollout) -> set[str]:
        """Devices of ``rollout`` that ran its version before it (a rollout of a routing policy
        alone): their baseline is their own windows of that version."""
        q = sa.select(Deployment.device_id).where(
            Deployment.rollout_id == rollout.id, Deployment.previous_version == rollout.version
        )
        return set(self.session.scalars(q))

    def list(
        self,
        status: Sequence[RolloutStatus] | None = None,
        limit: int = 100,
        model: str | None = None,
        version: str | None = None,
    ) -> Sequence[Rollout]:
        """The newest rollouts first, of these statuses and this model (and version) when given."""
        q = sa.select(Rollout).order_by(Rollout.created_at.desc()).limit(limit)
        if status:
            q = q.where(Rollout.status.in_(list(status)))
        if model is not None:
            q = q.where(Rollout.model == model)
        if version is not None:
            q = q.where(Rollout.version == version)
        return self.session.scalars(q).all()

    def active_ids(self) -> builtins.list[str]:
        q = sa.select(Rollout.id).where(
            Rollout.status.in_([RolloutStatus.running, RolloutStatus.rolling_back])
        )
        return list(self.session.scalars(q))

    def lock_for_tick(self, rollout_id: str, skip_locked: bool) -> Rollout | None:
        """The rollout row locked for this transaction; None if another server holds it
        (PostgreSQL ``SKIP LOCKED``; SQLite serialises writers anyway)."""
        q = sa.select(Rollout).where(
            Rollout.id == rollout_id,
            Rollout.status.in_([RolloutStatus.running, RolloutStatus.rolling_back]),
        )
        if skip_locked:
            q = q.with_for_update(skip_locked=True)
        return self.session.scalars(q).first()

    def serialize_creation(self, model: str) -> None:
        """Hold, until this transaction ends, the right to create a rollout of ``model``: a
        transaction-scoped advisory lock on PostgreSQL; on SQLite the database's write lock, taken
        now by a write that changes nothing (SQLite has one writer at a time)."""
        if self.session.get_bind().dialect.name == "postgresql":
            digest = hashlib.sha256(f"fleet.rollout.create/{model}".encode()).digest()
            key = int.from_bytes(digest[:8], "big", signed=True)
            self.session.execute(sa.select(sa.func.pg_advisory_xact_lock(key)))
        else:
            self.session.execute(sa.text("UPDATE rollouts SET status = status WHERE 1 = 0"))

    def conflicting(self, model: str, device_ids: Sequence[str]) -> builtins.list[tuple[str, str]]:
        """(rollout id, device id) pairs of running/paused/draft/rolling-back rollouts of ``model``
        on these devices, whose deployment was not cancelled."""
        if not device_ids:
            return []
        q = (
            sa.select(Rollout.id, Deployment.device_id)
            .join(Rollout, Rollout.id == Deployment.rollout_id)
            .where(
                Rollout.model == model,
                Rollout.status.in_(
                    [
                        RolloutStatus.draft,
                        RolloutStatus.running,
                        RolloutStatus.paused,
                        RolloutStatus.rolling_back,
                    ]
                ),
                Deployment.device_id.in_(list(device_ids)),
                Deployment.phase != DeploymentPhase.cancelled,  # (a decommission, a rollback) left it
            )
            .limit(5)
        )
        return [(r, d) for r, d in self.session.execute(q)]

    def deployments(self, rollout_id: str) -> builtins.list[tuple[Deployment, DeviceStatus, dict[str, str]]]:
        """Every deployment of a rollout with its device's status and what it serves."""
        q = (
            sa.select(Deployment, Device.status, Device.serving)
            .join(Device, Device.id == Deployment.device_id)
            .where(Deployment.rollout_id == rollout_id)
            .order_by(Deployment.id)
        )
        return [(d, s, serving or {}) for d, s, serving in self.session.execute(q)]

    def devices(self, device_ids: Sequence[str]) -> Sequence[Device]:
        if not device_ids:
            return []
        return self.session.scalars(sa.select(Device).where(Device.id.in_(list(device_ids)))).all()

    # -- the engine's tick: counts in SQL, rows only for devices that need action -------------------
    @staticmethod
    def _shadow_flag() -> sa.ColumnElement[bool]:
        return sa.func.coalesce(Deployment.details["mode"].as_string(), "") == "shadow"

    def tick_counts(
        self, rollout_id: str, stage: int
    ) -> builtins.list[tuple[bool, DeploymentPhase, DeviceStatus, bool, int]]:
        """(member of stages <= ``stage``, phase, device status, last notified in shadow mode, count)
        of a rollout's deployments: one GROUP BY, whatever the fleet size."""
        member = (Deployment.stage <= stage).label("member")
        shadow = self._shadow_flag().label("shadow")
        q = (
            sa.select(member, Deployment.phase, Device.status, shadow, sa.func.count())
            .join(Device, Device.id == Deployment.device_id)
            .where(Deployment.rollout_id == rollout_id)
            .group_by(member, Deployment.phase, Device.status, shadow)
        )
        return [(bool(m), p, st, bool(sh), n) for m, p, st, sh, n in self.session.execute(q)]

    def overdue(
        self,
        rollout_id: str,
        phases: Sequence[DeploymentPhase],
        quiet_since: datetime,
        started: Sequence[DeploymentPhase] = (),
    ) -> Sequence[Deployment]:
        """In-flight deployments that made no progress since ``quiet_since`` (their phase last
        changed before it, or for ``notified`` ones their device came back online before it; see
        :meth:`DeploymentRepository.restart_clocks`): of online devices in ``phases``, and of any
        device in ``started`` (it began the update, then went quiet)."""
        q = (
            sa.select(Deployment)
            .join(Device, Device.id == Deployment.device_id)
            .where(
                Deployment.rollout_id == rollout_id,
                sa.or_(
                    sa.and_(Deployment.phase.in_(list(phases)), Device.status == DeviceStatus.online),
                    Deployment.phase.in_(list(started)),
                ),
                Deployment.updated_at < quiet_since,
            )
            .order_by(Deployment.id)
        )
        return self.session.scalars(q).all()

    def to_notify(
        self, rollout_id: str, stage: int, *, serve: bool, online: bool, limit: int | None = None
    ) -> builtins.list[Any]:
        """Deployments of stages <= ``stage`` waiting for a DesiredState (pending, or in a serve
        stage a succeeded shadow deployment to re-arm), of online (or not online) devices, by id:
        rows of the deployment's id, device_id and details with the device's status, arch,
        hardware and desired_seq (what signing needs; no ORM objects)."""
        wanted = Deployment.phase == DeploymentPhase.pending
        if serve:
            rearm = sa.and_(Deployment.phase == DeploymentPhase.succeeded, self._shadow_flag())
            wanted = sa.or_(wanted, rearm)
        status = Device.status == DeviceStatus.online if online else Device.status != DeviceStatus.online
        q = (
            sa.select(
                Deployment.id, Deployment.device_id, Deployment.details, Device.status, Device.arch,
                Device.hardware, Device.desired_seq,
            )
            .join(Device, Device.id == Deployment.device_id)
            .where(Deployment.rollout_id == rollout_id, Deployment.stage <= stage, wanted, status)
            .order_by(Deployment.id)
        )  # fmt: skip
        if limit is not None:
            q = q.limit(limit)
        return list(self.session.connection().execute(q))

    def member_rows(
        self, rollout_id: str, stage: int, phases: Sequence[DeploymentPhase] | None = None
    ) -> builtins.list[tuple[str, DeploymentPhase, str | None]]:
        """(device id, phase, reason) of the deployments of stages <= ``stage``."""
        q = (
            sa.select(Deployment.device_id, Deployment.phase, Deployment.reason)
            .where(Deployment.rollout_id == rollout_id, Deployment.stage <= stage)
            .order_by(Deployment.id)
        )
        if phases is not None:
            q = q.where(Deployment.phase.in_(list(phases)))
        return [(d, p, r) for d, p, r in self.session.execute(q)]

    def offline_unfinished(self, rollout_id: str) -> int:
        """Deployments of a rollout whose device is offline and has not begun the update (pending,
        or told and waiting for the device's return)."""
        q = (
            sa.select(sa.func.count())
            .select_from(Deployment)
            .join(Device, Device.id == Deployment.device_id)
            .where(
                Deployment.rollout_id == rollout_id,
                Deployment.phase.in_([DeploymentPhase.pending, DeploymentPhase.notified]),
                Device.status != DeviceStatus.online,
            )
        )
        return int(self.session.scalar(q) or 0)

    @staticmethod
    def members_filter(
        rollout_id: str,
        *,
        max_stage: int | None = None,
        previous_version: str | None = None,
        not_previous_version: str | None = None,
    ) -> DeviceFilter:
        """A filter of a device id column (:class:`server.health.repository.WindowMatch`) to the
        devices of a rollout's deployments (of stages up to ``max_stage``; that ran
        ``previous_version`` before it, or did not run ``not_previous_version``): a subquery on the
        ``(rollout_id, device_id)`` index, so no id is read or sent."""
        d = Deployment
        q = sa.select(d.device_id).where(d.rollout_id == rollout_id)
        if max_stage is not None:
            q = q.where(d.stage <= max_stage)
        if previous_version is not None:
            q = q.where(d.previous_version == previous_version)
        if not_previous_version is not None:
            q = q.where(sa.or_(d.previous_version.is_(None), d.previous_version != not_previous_version))
        return lambda column: column.in_(q)

    def stage_phase_counts(self, rollout_id: str) -> builtins.list[tuple[int, DeploymentPhase, int]]:
        """(stage, phase, deployments) of a rollout: one GROUP BY on the ``(rollout_id, phase)``
        index, whatever the fleet size."""
        phase = sa.type_coerce(Deployment.phase, sa.String)
        q = (
            sa.select(Deployment.stage, phase, sa.func.count())
            .where(Deployment.rollout_id == rollout_id)
            .group_by(Deployment.stage, phase)
        )
        return [(st, PHASES[p], int(n)) for st, p, n in self.session.connection().execute(q)]
