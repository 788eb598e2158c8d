"""A device's own deployments: pinning it to a version (a DesiredState outside any rollout),
reading its DesiredState, and decommissioning it, which cancels what it will never finish.

Above the device registry (:mod:`server.devices.service`), which retires the device itself.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import ValidationError
from sqlalchemy.orm import Session

from device_client.protocol.messages import DeploymentPhase, Probation, ServeMode
from server.admin.schemas import Principal
from server.admin.service import audit
from server.db import utcnow
from server.devices.schemas import DeviceOut
from server.devices.service import DeviceService, device_out
from server.devices.tables import DeviceStatus
from server.errors import Conflict, Invalid, NotFound
from server.rollouts.desired import DesiredStateService
from server.rollouts.desired_repository import DesiredRepository
from server.rollouts.machine import deployment_transition
from server.rollouts.repository import DeploymentRepository, RolloutRepository
from server.rollouts.schemas import DesiredAssign, DesiredOut
from server.rollouts.tables import Deployment

if TYPE_CHECKING:
    from server.context import ServerContext

#: deployment phases a decommission cancels: the device will never finish them. (A deployment
#: that already succeeded, failed, timed out or rolled back keeps its outcome.)
OPEN_PHASES = (
    DeploymentPhase.pending,
    DeploymentPhase.notified,
    DeploymentPhase.downloading,
    DeploymentPhase.verifying,
    DeploymentPhase.installing,
    DeploymentPhase.probation,
)
DECOMMISSION_REASON = "device decommissioned"


class DeviceDeploymentService:
    def __init__(self, session: Session, ctx: ServerContext) -> None:
        self.session = session
        self.ctx = ctx
        self.devices = DeviceService(session, ctx)
        self.deployments = DeploymentRepository(session)

    def decommission(self, device_id: str, by: Principal) -> DeviceOut:
        """Retire a device (:meth:`DeviceService.retire`: its certificate and its download token
        revoked) and cancel its unfinished deployments (it will never finish them; a cancelled
        deployment is no failure of its rollout)."""
        device = self.devices.get(device_id)
        if device.status != DeviceStatus.decommissioned:
            self.devices.retire(device)
            cancelled = self._cancel_deployments(device_id)
            self.session.flush()
            details: dict[str, object] = {"cert_serial": device.cert_serial}
            if cancelled:
                details["cancelled_deployments"] = cancelled
            audit(self.session, by, "device.decommission", "device", device_id, details)
        return device_out(device)

    def _cancel_deployments(self, device_id: str) -> list[dict[str, object]]:
        """Cancel the device's pending and in-flight deployments (rollouts and direct
        assignments); return what was cancelled (for the audit entry)."""
        out: list[dict[str, object]] = []
        for dep in self.deployments.of_device_locked(device_id, OPEN_PHASES):
            out.append({"id": dep.id, "rollout_id": dep.rollout_id, "phase": dep.phase.value})
            dep.phase = deployment_transition(dep.phase, DeploymentPhase.cancelled)
            dep.reason = DECOMMISSION_REASON
        return out

    def assign_desired(self, device_id: str, body: DesiredAssign, by: Principal) -> DesiredOut:
        """Sign and publish a DesiredState pinning one device to a version (direct deployment)."""
        device = self.devices.get(device_id)
        try:
            probation = Probation.model_validate(body.probation)
        except ValidationError as exc:
            raise Invalid(f"invalid probation: {exc.errors()[0]['msg']}") from None
        # a pin would take the device's DesiredState away from a rollout that still counts on it
        # (its deployment would time out as a failure, or the rollout would override the pin)
        conflicts = RolloutRepository(self.session).conflicting(body.model, [device.id])
        if conflicts:
            raise Conflict(
                f"device {device.id!r} is in rollout {conflicts[0][0]} of model {body.model!r}; "
                "finish, abort or roll back that rollout first"
            )
        previous = (device.serving or {}).get(body.model)
        record = DesiredStateService(self.session, self.ctx).assign(
            device,
            body.model,
            body.version,
            variant=body.variant,
            mode=ServeMode(body.mode),
            probation=probation,
        )
        self.deployments.add(
            Deployment(
                device_id=device.id,
                model=body.model,
                version=body.version,
                previous_version=previous,
                phase=DeploymentPhase.notified,
                desired_seq=record.seq,
                notified_at=utcnow(),
            )
        )
        audit(
            self.session,
            by,
            "device.assign",
            "device",
            device_id,
            {"model": body.model, "version": body.version, "seq": record.seq},
        )
        return DesiredOut.model_validate(record)

    def get_desired(self, device_id: str) -> DesiredOut:
        self.devices.get(device_id)
        record = DesiredRepository(self.session).get(device_id)
        if record is None:
            raise NotFound(f"device {device_id!r} has no desired state")
        return DesiredOut.model_validate(record)
