"""What device messages change in rollouts (MQTT ingest): a report moves the deployment it answers
through the pure deployment state machine, and a device that (re)connects gets its DesiredState
again.

A report names the DesiredState it answers (``desired_seq``); a deployment whose state was
re-signed under a new seq while the device worked on the old one is found through its rollout and
``details["resigned_from"]``. What a report says in ``details`` is kept under the deployment's
``details["device"]``, apart from the server's own bookkeeping.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import datetime
from typing import TYPE_CHECKING

from sqlalchemy.orm import Session

from device_client.protocol import Report
from server.devices.ingest import Returning
from server.rollouts.desired import DesiredStateService
from server.rollouts.machine import IllegalTransition, deployment_transition
from server.rollouts.repository import DeploymentRepository, DeploymentState

if TYPE_CHECKING:
    from server.context import ServerContext

log = logging.getLogger(__name__)


def apply_reports(session: Session, reports: Sequence[Report]) -> list[tuple[int, IllegalTransition]]:
    """Apply fresh reports (in seq order per device) to the deployments they answer, with one
    SELECT and one bulk UPDATE. Returns the reports refused as stale: (deployment id, why)."""
    pairs = [(r.device_id, r.desired_seq) for r in reports if r.desired_seq is not None]
    repo = DeploymentRepository(session)
    deployments = repo.states_for_desired(pairs)
    # a seq its deployment left behind (re-signed while the device worked on it), by rollout
    behind = [r for r in reports if r.desired_seq is not None and r.rollout_id
              and (r.device_id, r.desired_seq) not in deployments]  # fmt: skip
    if behind:
        by_rollout = repo.states_for_rollouts([(r.device_id, r.rollout_id) for r in behind])  # type: ignore[misc]
        for r in behind:
            dep = by_rollout.get((r.device_id, r.rollout_id))  # type: ignore[arg-type]
            if dep is not None and r.desired_seq in dep.details.get("resigned_from", ()):
                deployments[(r.device_id, r.desired_seq or 0)] = dep
    changed: dict[int, DeploymentState] = {}
    stale: list[tuple[int, IllegalTransition]] = []
    for r in reports:
        dep = deployments.get((r.device_id, r.desired_seq or 0))
        if dep is None or dep.phase == r.phase:
            continue
        try:
            dep.phase = deployment_transition(dep.phase, r.phase)
        except IllegalTransition as exc:
            stale.append((dep.id, exc))
            continue
        if r.reason:
            dep.reason = r.reason
        if r.details:  # the device's say, apart from the server's own keys (mode, resigned_from...)
            dep.details = {**dep.details, "device": {**dep.details.get("device", {}), **r.details}}
        changed[dep.id] = dep
    repo.update_states([changed[k] for k in sorted(changed)])
    return stale


def welcome_back(session: Session, ctx: ServerContext, returning: Returning, now: datetime) -> None:
    """Devices that (re)connected: the timeout of the ``notified`` deployments of those that were
    offline starts now (:meth:`DeploymentRepository.restart_clocks`), and each one's DesiredState
    is published again, or re-signed if it expires soon."""
    if returning.came_online:
        DeploymentRepository(session).restart_clocks(sorted(returning.came_online), now)
    ids = returning.all
    if ids:
        desired = DesiredStateService(session, ctx)
        desired.republish_current(ids)
        resigned = desired.resign_expiring_ids(ids)
        if resigned:
            log.info("re-signed %d expiring desired states for returning devices", resigned)
