"""Dashboard pages beyond watching rollouts: the model catalog (revoke: admin), the audit log
(operator and up) and the form that starts a rollout (operator and up), which shows the API's 422
message and creates nothing when the stages, gates or selector are wrong, or when selected devices
fit no variant and "leave them out" (``skip_unfit``) is off; "pause for approval" sets
``pause_after`` on every stage but the last that does not set it itself."""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import quote

from fastapi import Form, Query, Request, Response
from fastapi.responses import HTMLResponse, RedirectResponse
from pydantic import ValidationError
from sqlalchemy.orm import Session

from server.admin.schemas import Principal
from server.admin.service import AdminService
from server.admin.tables import Role
from server.catalog.service import CatalogService
from server.devices.tags import parse_tag_expr
from server.errors import FleetError, Forbidden, Invalid
from server.http.deps import SessionDep, get_ctx
from server.rollouts.schemas import RolloutCreate
from server.rollouts.service import RolloutService
from server.ui.auth import check_csrf
from server.ui.common import User, can_act, page, ui_router

router = ui_router()

DEFAULT_STAGES = (
    '[{"percent": 10, "soak_s": 300}, {"percent": 50, "soak_s": 600}, {"percent": 100, "soak_s": 0}]'
)
DEFAULT_GATES = '{"max_failure_ratio": 0.1, "max_error_rate": 0.05, "max_p95_ratio": 1.5}'


def _operator(user: tuple[Principal, str]) -> Principal:
    who = user[0]
    if not can_act(who):
        raise Forbidden(f"role {who.role.value!r} may not do this (needs 'operator')")
    return who


@router.get("/models")
def models(
    request: Request, session: Session = SessionDep, user: tuple[Principal, str] = User
) -> HTMLResponse:
    return page(request, user, "models.html", items=CatalogService(session, get_ctx(request)).list_models())


@router.get("/models/{name}")
def model(
    name: str, request: Request, session: Session = SessionDep, user: tuple[Principal, str] = User
) -> HTMLResponse:
    m = CatalogService(session, get_ctx(request)).get_model(name)
    return page(request, user, "model.html", m=m, can_revoke=user[0].role.allows(Role.admin))


@router.post("/models/{name}/versions/{version}/revoke")
def revoke_version(
    name: str,
    version: str,
    request: Request,
    csrf: str = Form(default=""),
    session: Session = SessionDep,
    user: tuple[Principal, str] = User,
) -> Response:
    """Revoke a version (admin): its bundles leave the signed repository."""
    check_csrf(user[1], csrf)
    who = user[0]
    if not who.role.allows(Role.admin):
        raise Forbidden(f"role {who.role.value!r} may not do this (needs 'admin')")
    CatalogService(session, get_ctx(request)).revoke(name, version, who)
    return RedirectResponse(f"/ui/models/{quote(name, safe='')}", status_code=303)


@router.get("/audit")
def audit(
    request: Request,
    action: str = "",
    target_id: str = "",
    cursor: str | None = None,
    limit: int = Query(default=100, ge=1, le=1000),
    session: Session = SessionDep,
    user: tuple[Principal, str] = User,
) -> HTMLResponse:
    """The audit log, newest first, filtered by action and target id (operator and up)."""
    _operator(user)
    log = AdminService(session).audit_page(cursor, limit, action or None, target_id or None)
    filters = {"action": action, "target_id": target_id}
    return page(request, user, "audit.html", log=log, filters=filters, limit=limit)


@router.get("/rollouts/new")
def new_rollout(
    request: Request, session: Session = SessionDep, user: tuple[Principal, str] = User
) -> Response:
    _operator(user)
    form = {"model": "", "version": "", "tags": "", "stages": DEFAULT_STAGES, "gates": DEFAULT_GATES,
            "on_failure": "pause", "skip_unfit": False, "pause_between": False}  # fmt: skip
    return page(request, user, "rollout_new.html", form=form, error=None)


@router.post("/rollouts/new")
def create_rollout(
    request: Request,
    csrf: str = Form(default=""),
    model: str = Form(default=""),
    version: str = Form(default=""),
    tags: str = Form(default=""),
    stages: str = Form(default=""),
    gates: str = Form(default=""),
    on_failure: str = Form(default="pause"),
    skip_unfit: bool = Form(default=False),
    pause_between: bool = Form(default=False),
    session: Session = SessionDep,
    user: tuple[Principal, str] = User,
) -> Response:
    """Create and start a rollout; a bad field re-renders the form with the message (422)."""
    check_csrf(user[1], csrf)
    who = _operator(user)
    form: dict[str, Any] = {"model": model, "version": version, "tags": tags, "stages": stages,
            "gates": gates, "on_failure": on_failure, "skip_unfit": skip_unfit,
            "pause_between": pause_between}  # fmt: skip
    try:
        body = _rollout_body(form)
        created = RolloutService(session, get_ctx(request)).create(body, who)
    except (FleetError, ValidationError) as exc:
        session.rollback()  # nothing of a refused rollout is kept
        status = exc.status_code if isinstance(exc, FleetError) else 422
        message = exc.message if isinstance(exc, FleetError) else _validation_message(exc)
        ctx = {"form": form, "error": message}
        response = page(request, user, "rollout_new.html", **ctx)
        response.status_code = status
        return response
    return RedirectResponse(f"/ui/rollouts/{created.id}", status_code=303)


def _rollout_body(form: dict[str, Any]) -> RolloutCreate:
    """The API's body of the form; "pause for approval" fills in ``pause_after`` (stages JSON wins)."""
    selector = {"tags": dict(parse_tag_expr(t) for t in form["tags"].split())}
    stages = _json(form["stages"], "stages")
    if form["pause_between"]:
        stages = pause_between(stages)
    return RolloutCreate.model_validate({
        "model": form["model"].strip(), "version": form["version"].strip(), "selector": selector,
        "stages": stages, "gates": _json(form["gates"] or "{}", "gates"),
        "on_failure": form["on_failure"], "skip_unfit": form["skip_unfit"],
    })  # fmt: skip


def pause_between(stages: Any) -> Any:
    """``stages`` with ``pause_after: true`` on each stage but the last that does not give
    ``pause_after`` itself; anything but a list of objects is returned as is (validation says why)."""
    if not isinstance(stages, list):
        return stages
    last = len(stages) - 1
    return [
        {**s, "pause_after": True} if isinstance(s, dict) and i < last and "pause_after" not in s else s
        for i, s in enumerate(stages)
    ]


def _json(text: str, field: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise Invalid(f"{field}: not JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None
    except RecursionError:  # thousands of nested brackets: the decoder gives up
        raise Invalid(f"{field}: not JSON (nested too deeply)") from None


def _validation_message(exc: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in exc.errors(include_url=False)
    )
