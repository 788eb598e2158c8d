"""Staged rollouts: create, inspect, and steer (pause, resume, abort, rollback, promote)."""

from __future__ import annotations

from fastapi import APIRouter, Query, Request
from sqlalchemy.orm import Session

from server.admin.schemas import Principal
from server.http.deps import Operator, SessionDep, Viewer, get_ctx
from server.rollouts.preview import VariantPreview, parse_selector, preview
from server.rollouts.schemas import RolloutCreate, RolloutDetail, RolloutHealth, RolloutOut
from server.rollouts.service import RolloutService
from server.rollouts.tables import RolloutStatus

router = APIRouter(prefix="/api/v1/rollouts", tags=["rollouts"])


def _service(request: Request, session: Session) -> RolloutService:
    return RolloutService(session, get_ctx(request))


@router.post("", status_code=201)
def create_rollout(
    body: RolloutCreate, request: Request, session: Session = SessionDep, who: Principal = Operator
) -> RolloutDetail:
    """Create (and by default start) a staged rollout of one model version."""
    return _service(request, session).create(body, who)


@router.get("")
def list_rollouts(
    request: Request,
    status: list[RolloutStatus] = Query(default=[]),
    limit: int = Query(default=100, ge=1, le=1000),
    model: str | None = Query(default=None, max_length=64, description="only rollouts of this model"),
    version: str | None = Query(default=None, max_length=64, description="only of this version"),
    session: Session = SessionDep,
    _: Principal = Viewer,
) -> list[RolloutOut]:
    """Rollouts, newest first."""
    return _service(request, session).list(status, limit, model, version)


@router.get("/preview")
def preview_rollout(
    model: str = Query(),
    version: str = Query(),
    selector: str | None = Query(default=None, description="a rollout selector as JSON"),
    session: Session = SessionDep,
    _: Principal = Viewer,
) -> VariantPreview:
    """How many selected devices would get each variant of the version, and how many fit none."""
    return preview(session, model, version, parse_selector(selector))


@router.get("/{rollout_id}")
def get_rollout(
    rollout_id: str, request: Request, session: Session = SessionDep, _: Principal = Viewer
) -> RolloutDetail:
    """Status, per-stage counts by phase, and health aggregates against the pre-rollout baseline."""
    return _service(request, session).detail(rollout_id)


@router.get("/{rollout_id}/health")
def get_rollout_health(
    rollout_id: str, request: Request, session: Session = SessionDep, _: Principal = Viewer
) -> RolloutHealth:
    """Health of the rollout's devices over time, per version and mode (serve/shadow), from 15
    minutes before the rollout was created, with the baseline the gates compare against."""
    return _service(request, session).health_series(rollout_id)


def _action(name: str, doc: str) -> None:
    def endpoint(
        rollout_id: str, request: Request, session: Session = SessionDep, who: Principal = Operator
    ) -> RolloutDetail:
        return getattr(_service(request, session), name)(rollout_id, who)

    endpoint.__doc__ = doc
    router.add_api_route(
        f"/{{rollout_id}}/{name}",
        endpoint,
        methods=["POST"],
        name=f"{name}_rollout",
        response_model=RolloutDetail,
    )


_action("start", "Start a draft rollout.")
_action("pause", "Pause a running rollout: no new devices are notified.")
_action("resume", "Resume a paused rollout (the current stage soaks again, judged on health from now).")
_action("abort", "Stop for good: pending devices are cancelled, devices keep what they run.")
_action("rollback", "Return every touched device to its previous version.")
_action("promote", "Skip the rest of the current stage's soak (the gates are still checked).")
