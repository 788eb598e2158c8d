"""The rollout page's device list: a rollout's deployments, failures first, and their totals per
phase."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.orm import Session

from device_client.protocol.messages import DeploymentPhase
from server.rollouts.summary import FAILED_PHASES
from server.rollouts.tables import Deployment


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
