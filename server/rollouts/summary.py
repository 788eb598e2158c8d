"""The fleet at a glance (``GET /api/v1/fleet/summary`` and the dashboard's overview): devices by
status, by model version served, by arch and execution providers, running and paused rollouts with
their progress, and the most recent failed deployments. One grouped query per breakdown, whatever
the fleet size."""

from __future__ import annotations

import json
from collections import Counter
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from pydantic import BaseModel
from sqlalchemy.orm import Session

from device_client.protocol.messages import DeploymentPhase
from server.devices.tables import Device, DeviceStatus
from server.rollouts.engine import FAILED, IN_FLIGHT
from server.rollouts.tables import Deployment, Rollout, RolloutStatus

#: failed, rolled back and timed out: the engine's FAILED, as a sequence for ``in_``
FAILED_PHASES = tuple(sorted(FAILED))


class VersionCount(BaseModel):
    model: str
    version: str
    devices: int


class ProvidersCount(BaseModel):
    #: as the devices reported them at enrollment, in their order of preference
    execution_providers: list[str]
    devices: int


class RolloutProgress(BaseModel):
    id: str
    model: str
    version: str
    status: str
    #: 0-based, of ``stages``
    current_stage: int
    stages: int
    devices: int
    succeeded: int
    failed: int
    in_progress: int
    reason: str | None
    created_at: datetime


class FailureOut(BaseModel):
    device_id: str
    rollout_id: str | None
    model: str
    version: str
    phase: str
    reason: str | None
    at: datetime


class FleetSummary(BaseModel):
    """What the overview shows. Decommissioned devices count in ``devices`` and ``by_status`` only."""

    devices: int
    by_status: dict[str, int]
    #: devices serving each model version, by model then version
    by_version: list[VersionCount]
    by_arch: dict[str, int]
    by_execution_providers: list[ProvidersCount]
    #: running and paused rollouts, newest first
    rollouts: list[RolloutProgress]
    #: the most recent failed, timed-out or rolled-back deployments, newest first
    failures: list[FailureOut]


def fleet_summary(session: Session, rollouts: int = 20, failures: int = 10) -> FleetSummary:
    live = Device.status != DeviceStatus.decommissioned
    by_status = {
        DeviceStatus(s).value: int(n)
        for s, n in session.execute(sa.select(Device.status, sa.func.count()).group_by(Device.status))
    }
    providers = sa.cast(Device.hardware["execution_providers"], sa.Text)
    q = sa.select(Device.arch, providers, sa.func.count()).where(live).group_by(Device.arch, providers)
    arch: Counter[str] = Counter()
    eps: Counter[tuple[str, ...]] = Counter()
    for a, p, n in session.execute(q):
        arch[a] += n
        eps[tuple(_json_list(p))] += n
    serving = sa.cast(Device.serving, sa.Text)
    versions: Counter[tuple[str, str]] = Counter()
    for text, n in session.execute(sa.select(serving, sa.func.count()).where(live).group_by(serving)):
        for model, version in (_json_dict(text)).items():
            versions[(model, version)] += n
    return FleetSummary(
        devices=sum(by_status.values()),
        by_status={s.value: by_status[s.value] for s in DeviceStatus if s.value in by_status},
        by_version=[VersionCount(model=m, version=v, devices=n) for (m, v), n in sorted(versions.items())],
        by_arch=dict(sorted(arch.items())),
        by_execution_providers=[
            ProvidersCount(execution_providers=list(p), devices=n) for p, n in sorted(eps.items())
        ],
        rollouts=_rollouts(session, rollouts),
        failures=_failures(session, failures),
    )


def _rollouts(session: Session, limit: int) -> list[RolloutProgress]:
    """Running and paused rollouts with their deployments per phase: one GROUP BY over them all."""
    active = [RolloutStatus.running, RolloutStatus.paused]
    q = sa.select(Rollout).where(Rollout.status.in_(active)).order_by(Rollout.created_at.desc()).limit(limit)
    items = list(session.scalars(q))
    phases: dict[str, Counter[DeploymentPhase]] = {r.id: Counter() for r in items}
    if items:
        q2 = (
            sa.select(Deployment.rollout_id, Deployment.phase, sa.func.count())
            .where(Deployment.rollout_id.in_(list(phases)))
            .group_by(Deployment.rollout_id, Deployment.phase)
        )
        for rid, phase, n in session.execute(q2):
            phases[str(rid)][DeploymentPhase(phase)] += n
    return [_progress(r, phases[r.id]) for r in items]


def _progress(r: Rollout, phases: Counter[DeploymentPhase]) -> RolloutProgress:
    return RolloutProgress(
        id=r.id, model=r.model, version=r.version, status=r.status.value, current_stage=r.current_stage,
        stages=len(r.stages), devices=sum(phases.values()), succeeded=phases[DeploymentPhase.succeeded],
        failed=sum(phases[p] for p in FAILED_PHASES), in_progress=sum(phases[p] for p in IN_FLIGHT),
        reason=r.reason, created_at=r.created_at,
    )  # fmt: skip


def _failures(session: Session, limit: int) -> list[FailureOut]:
    d = Deployment
    q = (
        sa.select(d.device_id, d.rollout_id, d.model, d.version, d.phase, d.reason, d.updated_at)
        .where(d.phase.in_(FAILED_PHASES))
        .order_by(d.updated_at.desc(), d.id.desc())
        .limit(limit)
    )
    out = []
    for r in session.execute(q):
        out.append(FailureOut(
            device_id=r.device_id, rollout_id=r.rollout_id, model=r.model, version=r.version,
            phase=DeploymentPhase(r.phase).value, reason=r.reason, at=r.updated_at,
        ))  # fmt: skip
    return out


def _json_list(text: str | None) -> list[str]:
    value: Any = json.loads(text) if text else None
    return [str(v) for v in value] if isinstance(value, list) else []


def _json_dict(text: str | None) -> dict[str, str]:
    value: Any = json.loads(text) if text else None
    return {str(k): str(v) for k, v in value.items()} if isinstance(value, dict) else {}
