"""The numbers of the fleet overview: devices by status, arch and model version served, and the
most recent failed deployments with their reasons (grouped in SQL where the database can)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.orm import Session

from device_client.protocol.messages import DeploymentPhase
from server.devices.tables import Device, DeviceStatus
from server.rollouts.tables import Deployment

FAILED_PHASES = (DeploymentPhase.failed, DeploymentPhase.rolled_back, DeploymentPhase.timed_out)


@dataclass
class Failure:
    device_id: str
    rollout_id: str | None
    model: str
    version: str
    phase: str
    reason: str | None
    at: datetime


@dataclass
class FleetSummary:
    total: int = 0
    by_status: dict[str, int] = field(default_factory=dict)
    by_arch: dict[str, int] = field(default_factory=dict)
    #: "model version" -> devices serving it (decommissioned devices left out)
    by_version: dict[str, int] = field(default_factory=dict)
    failures: list[Failure] = field(default_factory=list)


def fleet_summary(session: Session, failures: int = 10) -> FleetSummary:
    out = FleetSummary()
    for status, n in session.execute(sa.select(Device.status, sa.func.count()).group_by(Device.status)):
        out.by_status[DeviceStatus(status).value] = int(n)
    out.total = sum(out.by_status.values())
    live = Device.status != DeviceStatus.decommissioned
    q = sa.select(Device.arch, sa.func.count()).where(live).group_by(Device.arch).order_by(Device.arch)
    out.by_arch = {arch: int(n) for arch, n in session.execute(q)}
    versions: Counter[str] = Counter()
    for (serving,) in session.execute(sa.select(Device.serving).where(live)):
        for model, version in sorted((serving or {}).items()):
            versions[f"{model} {version}"] += 1
    out.by_version = dict(sorted(versions.items()))
    q2 = (
        sa.select(Deployment)
        .where(Deployment.phase.in_(FAILED_PHASES))
        .order_by(Deployment.updated_at.desc(), Deployment.id.desc())
        .limit(failures)
    )
    for d in session.scalars(q2):
        out.failures.append(Failure(
            device_id=d.device_id, rollout_id=d.rollout_id, model=d.model, version=d.version,
            phase=d.phase.value, reason=d.reason, at=d.updated_at,
        ))  # fmt: skip
    return out


@dataclass
class Member:
    device_id: str
    stage: int
    phase: str
    version: str
    previous_version: str | None
    reason: str | None
    at: datetime


def rollout_members(session: Session, rollout_id: str, phase: str | None, limit: int = 200) -> list[Member]:
    """The rollout's deployments (of one phase, or all), failures first, then by device id."""
    q = sa.select(Deployment).where(Deployment.rollout_id == rollout_id)
    if phase:
        q = q.where(Deployment.phase == DeploymentPhase(phase))
    failed_first = sa.case((Deployment.phase.in_(FAILED_PHASES), 0), else_=1)
    q = q.order_by(failed_first, Deployment.device_id).limit(limit)
    return [
        Member(d.device_id, d.stage, d.phase.value, d.version, d.previous_version, d.reason, d.updated_at)
        for d in session.scalars(q)
    ]


def phase_totals(session: Session, rollout_id: str) -> dict[str, int]:
    """Deployments of a rollout per phase, in the phases' order."""
    q = (
        sa.select(Deployment.phase, sa.func.count())
        .where(Deployment.rollout_id == rollout_id)
        .group_by(Deployment.phase)
    )
    counts = {DeploymentPhase(p).value: int(n) for p, n in session.execute(q)}
    return {p.value: counts[p.value] for p in DeploymentPhase if p.value in counts}
