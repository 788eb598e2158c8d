"""The dashboard's pages, partials and actions under ``/ui``, on the services the REST API uses.
A page without a valid sign-in cookie redirects to the login page; a domain error renders an error
page with its status (404 for unknown ids); every POST checks a CSRF token (the login form's
against its pre-session cookie)."""

from __future__ import annotations

from datetime import timedelta
from typing import Any
from urllib.parse import quote, urlencode

from fastapi import Form, Query, Request, Response
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse
from sqlalchemy.orm import Session

from device_client.protocol.messages import DeploymentPhase
from server.admin.schemas import Principal
from server.db import utcnow
from server.devices.service import DeviceService, device_out
from server.devices.tables import DeviceStatus
from server.devices.tags import parse_tag_expr
from server.errors import FleetError, Forbidden, Invalid, NotFound
from server.health.series import fold_series, health_rows
from server.http.deps import SessionDep, get_ctx
from server.rollouts.device_deployments import DeviceDeploymentService
from server.rollouts.engine import APPROVAL_REASON
from server.rollouts.schemas import RolloutDetail
from server.rollouts.service import RolloutService
from server.rollouts.summary import fleet_summary
from server.rollouts.tables import RolloutStatus
from server.ui.auth import (
    CSRF_FIELD,
    check_csrf,
    check_login,
    check_login_csrf,
    clear_cookie,
    clear_login_cookie,
    login_csrf,
    set_cookie,
    set_login_cookie,
)
from server.ui.common import User, can_act, error_page, page, templates, ui_router
from server.ui.fleet import phase_totals, rollout_members

#: actions on a rollout page, in the order the buttons show, with the question each confirms
ACTIONS: dict[str, str] = {
    "pause": "Pause this rollout? No new devices will be told to update.",
    "resume": "Resume this rollout? The current stage soaks again.",
    "promote": "Promote: skip the rest of this stage's soak (the gates are still checked)?",
    "abort": "Abort this rollout for good? Devices keep what they run.",
    "rollback": "Roll back every touched device to its previous version?",
}
#: which actions make sense in which rollout status
ALLOWED: dict[str, tuple[str, ...]] = {
    "running": ("pause", "promote", "abort", "rollback"),
    "paused": ("resume", "abort", "rollback"),
    "draft": ("abort",),
}
#: a rollout paused by a stage's ``pause_after``: its resume button approves the next stage
APPROVE_QUESTION = "Approve stage {n}: tell its devices to update now?"
#: the rollout page's columns: deployment phases grouped as an operator reads them
PHASE_GROUPS: dict[str, tuple[str, ...]] = {
    "pending": ("pending", "notified"),
    "in progress": ("downloading", "verifying", "installing", "probation"),
    "succeeded": ("succeeded",),
    "failed": ("failed",),
    "timed out": ("timed_out",),
    "rolled back": ("rolled_back",),
    "cancelled": ("cancelled",),
}


def phase_groups(phases: dict[str, int]) -> dict[str, int]:
    return {group: sum(phases.get(p, 0) for p in members) for group, members in PHASE_GROUPS.items()}


templates.env.globals["phase_groups"] = phase_groups


router = ui_router()


# -- sign in and out ---------------------------------------------------------------------------
@router.get("/login")
def login_form(request: Request, message: str = "", next: str = "/ui/") -> HTMLResponse:
    return _login_page(request, message, next, 200)


def _login_page(request: Request, message: str, next: str, status: int) -> HTMLResponse:
    """The sign-in form with its double-submit token, which the pre-session cookie also holds."""
    value = login_csrf(request)
    ctx = {"message": message, "next": _local(next), "login_csrf": value, "csrf_field": CSRF_FIELD}
    response = templates.TemplateResponse(request, "login.html", ctx, status_code=status)
    set_login_cookie(request, response, value)
    return response


@router.post("/login")
def login(
    request: Request,
    token: str = Form(default=""),
    next: str = Form(default="/ui/"),
    csrf: str = Form(default=""),
    session: Session = SessionDep,
) -> Response:
    """Checks the form's token against the pre-session cookie (403 without: no sign-in), then the
    bearer token as the API would; on success sets the cookie and goes to ``next``."""
    try:
        check_login_csrf(request, csrf)
    except Forbidden as exc:
        return _login_page(request, exc.message, next, 403)
    try:
        check_login(session, token.strip())
    except FleetError as exc:
        return _login_page(request, exc.message, next, 401)
    response = RedirectResponse(_local(next), status_code=303)
    set_cookie(request, response, token.strip())
    clear_login_cookie(request, response)
    return response


@router.post("/logout")
def logout(request: Request, csrf: str = Form(default=""), user: tuple[Principal, str] = User) -> Response:
    check_csrf(user[1], csrf)
    response = RedirectResponse("/ui/login?message=signed+out", status_code=303)
    clear_cookie(request, response)
    return response


def _local(target: str) -> str:
    """Only paths of the dashboard itself: never an open redirect."""
    return target if target.startswith("/ui/") and not target.startswith("/ui//") else "/ui/"


# -- pages -------------------------------------------------------------------------------------
@router.get("/")
def overview(
    request: Request, session: Session = SessionDep, user: tuple[Principal, str] = User
) -> HTMLResponse:
    """What ``GET /api/v1/fleet/summary`` answers, as a page."""
    return page(request, user, "overview.html", fleet=fleet_summary(session))


@router.get("/rollouts")
def rollouts(
    request: Request,
    status: list[RolloutStatus] = Query(default=[]),
    session: Session = SessionDep,
    user: tuple[Principal, str] = User,
) -> HTMLResponse:
    items = RolloutService(session, get_ctx(request)).list(status, 200)
    return page(request, user, "rollouts.html", items=items, statuses=list(RolloutStatus), status=status)


@router.get("/rollouts/{rollout_id}")
def rollout(
    rollout_id: str,
    request: Request,
    phase: str = "",
    session: Session = SessionDep,
    user: tuple[Principal, str] = User,
) -> HTMLResponse:
    """The rollout page; ``phase`` filters its device list (failures first, up to 200)."""
    members = _members(request, session, rollout_id, phase)
    detail = RolloutService(session, get_ctx(request)).detail(rollout_id)
    return page(request, user, "rollout.html", r=detail, actions=_actions(detail), **members)


@router.get("/rollouts/{rollout_id}/live")
def rollout_live(
    rollout_id: str, request: Request, session: Session = SessionDep, user: tuple[Principal, str] = User
) -> HTMLResponse:
    """The part of the rollout page that changes while it runs (polled by static/app.js)."""
    detail = RolloutService(session, get_ctx(request)).detail(rollout_id)
    return page(request, user, "rollout_live.html", r=detail, actions=_actions(detail))


@router.get("/rollouts/{rollout_id}/members")
def rollout_devices(
    rollout_id: str,
    request: Request,
    phase: str = "",
    session: Session = SessionDep,
    user: tuple[Principal, str] = User,
) -> HTMLResponse:
    """The rollout page's device list, polled on its own (it is cheap: no health)."""
    return page(request, user, "rollout_members.html", **_members(request, session, rollout_id, phase))


def _members(request: Request, session: Session, rollout_id: str, phase: str) -> dict[str, Any]:
    if phase and phase not in DeploymentPhase.__members__:
        raise Invalid(f"unknown deployment phase {phase!r}")
    rollout = RolloutService(session, get_ctx(request)).get(rollout_id)
    return {
        "rid": rollout.id,
        "phase": phase,
        "members": rollout_members(session, rollout.id, phase or None),
        "counts": phase_totals(session, rollout.id),
    }


@router.get("/rollouts/{rollout_id}/health.json")
def rollout_health(
    rollout_id: str, request: Request, session: Session = SessionDep, user: tuple[Principal, str] = User
) -> JSONResponse:
    """The chart's data: what ``GET /api/v1/rollouts/{id}/health`` returns, for the cookie."""
    health = RolloutService(session, get_ctx(request)).health_series(rollout_id)
    return JSONResponse(health.model_dump(mode="json"))


def _actions(r: RolloutDetail) -> list[tuple[str, str, str]]:
    """The page's buttons as (action, confirmation, label); a rollout waiting for approval (paused
    by ``pause_after``) gets "Approve stage N", which posts resume."""
    waits = r.status == RolloutStatus.paused and (r.reason or "").startswith(APPROVAL_REASON)
    buttons = []
    for a in ALLOWED.get(r.status.value, ()):
        if a == "resume" and waits:
            n = r.current_stage + 1
            buttons.append((a, APPROVE_QUESTION.format(n=n), f"Approve stage {n}"))
        else:
            buttons.append((a, ACTIONS[a], a.capitalize()))
    return buttons


@router.post("/rollouts/{rollout_id}/{action}")
def rollout_action(
    rollout_id: str,
    action: str,
    request: Request,
    csrf: str = Form(default=""),
    session: Session = SessionDep,
    user: tuple[Principal, str] = User,
) -> Response:
    """Pause, resume, promote, abort or roll back: operator and up, with the form's CSRF token."""
    who, bearer = user
    check_csrf(bearer, csrf)
    if not can_act(who):
        raise Forbidden(f"role {who.role.value!r} may not do this (needs 'operator')")
    if action not in ACTIONS:
        raise NotFound(f"no rollout action {action!r}")
    getattr(RolloutService(session, get_ctx(request)), action)(rollout_id, who)
    return RedirectResponse(f"/ui/rollouts/{rollout_id}", status_code=303)


@router.get("/devices")
def devices(
    request: Request,
    q: str = "",
    tag: str = "",
    status: str = "",
    arch: str = "",
    cursor: str | None = None,
    limit: int = Query(default=50, ge=1, le=1000),
    session: Session = SessionDep,
    user: tuple[Principal, str] = User,
) -> Response:
    """The device list with the API's filters and cursor paging; ``q`` opens a device by its id."""
    service = DeviceService(session, get_ctx(request))
    if q.strip():
        return RedirectResponse(f"/ui/devices/{quote(q.strip(), safe='')}", status_code=303)
    tags = [parse_tag_expr(t) for t in tag.split() if t]
    if status and status not in DeviceStatus.__members__:
        raise Invalid(f"unknown device status {status!r}")
    state = DeviceStatus(status) if status else None
    listing = service.list(cursor=cursor, limit=limit, tags=tags, status=state, arch=arch or None)
    filters = {"tag": tag, "status": status, "arch": arch, "limit": str(limit)}
    next_url = None
    if listing.next_cursor:
        query = {**{k: v for k, v in filters.items() if v}, "cursor": listing.next_cursor}
        next_url = "/ui/devices?" + urlencode(query)
    return page(
        request, user, "devices.html", page=listing, filters=filters, next_url=next_url,
        statuses=[s.value for s in DeviceStatus],
    )  # fmt: skip


@router.get("/devices/{device_id}")
def device(
    device_id: str, request: Request, session: Session = SessionDep, user: tuple[Principal, str] = User
) -> HTMLResponse:
    service = DeviceService(session, get_ctx(request))
    d = device_out(service.get(device_id))
    try:
        desired = DeviceDeploymentService(session, get_ctx(request)).get_desired(device_id)
    except NotFound:
        desired = None
    events = service.events(device_id, 50)
    return page(request, user, "device.html", d=d, desired=desired, events=events)


@router.get("/devices/{device_id}/health.json")
def device_health(
    device_id: str,
    request: Request,
    hours: float = Query(default=6.0, gt=0, le=24 * 30),
    session: Session = SessionDep,
    user: tuple[Principal, str] = User,
) -> JSONResponse:
    """The device's health per model version over the last ``hours``, for its page's charts."""
    d = device_out(DeviceService(session, get_ctx(request)).get(device_id))
    model, version = next(iter(sorted(d.serving.items())), (None, None))
    until = utcnow()
    since = until - timedelta(hours=hours)
    bucket_s = max(10, int((until - since).total_seconds() // 120) + 1)
    rows = health_rows(session, [device_id], model, since) if model else []
    body = {"device_id": device_id, "model": model, "version": version, "since": since.isoformat(),
            "bucket_s": bucket_s, "series": fold_series(rows, since, bucket_s)}  # fmt: skip
    return JSONResponse(body)


@router.get("/{rest:path}")
def unknown(rest: str, request: Request, user: tuple[Principal, str] = User) -> Response:
    """Any other path under /ui: the 404 page."""
    return error_page(request, 404, f"no page /ui/{rest}", user[0])
