"""What the dashboard's route modules share: the templates, the route class that turns domain
errors into HTML pages and signed-out visitors into a redirect to the login page, the signed-in
user dependency and the page renderer."""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import HTMLResponse, RedirectResponse
from fastapi.routing import APIRoute
from fastapi.templating import Jinja2Templates
from sqlalchemy.orm import Session

from server.admin.schemas import Principal
from server.admin.tables import Role
from server.errors import FleetError
from server.http.deps import SessionDep
from server.ui.auth import CSRF_FIELD, LoginRequired, csrf_token, signed_in

HERE = Path(__file__).parent
templates = Jinja2Templates(directory=HERE / "templates")
STATIC_DIR = HERE / "static"
POLL_HEADER = "x-fleet-poll"
#: on every dashboard response: scripts and styles from /ui/static only, never framed (a page of
#: another site cannot overlay the action buttons), no caching of pages that carry a CSRF token
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'; base-uri 'none'; "
        "form-action 'self'"
    ),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}


class UIRoute(APIRoute):
    """Renders domain errors as HTML pages and sends signed-out visitors to the login page."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def guarded(request: Request) -> Response:
            response = await _answer(request)
            for name, value in SECURITY_HEADERS.items():
                response.headers.setdefault(name, value)
            return response

        async def _answer(request: Request) -> Response:
            try:
                return await handler(request)
            except LoginRequired as exc:
                if request.method != "GET" or request.headers.get(POLL_HEADER):
                    return error_page(request, 401, exc.message, None)
                query = urlencode({"next": request.url.path, "message": exc.message})
                return RedirectResponse(f"/ui/login?{query}", status_code=303)
            except FleetError as exc:
                return error_page(request, exc.status_code, exc.message, None)

        return guarded


def error_page(request: Request, status: int, message: str, who: Principal | None) -> Response:
    titles = {401: "Signed out", 403: "Forbidden", 404: "Not found", 409: "Conflict", 422: "Invalid"}
    ctx = {"title": titles.get(status, "Error"), "message": message, "status": status, "who": who}
    return templates.TemplateResponse(request, "error.html", ctx, status_code=status)


def _user(request: Request, session: Session = SessionDep) -> tuple[Principal, str]:
    """The signed-in principal and token, before the route touches anything."""
    return signed_in(request, session)


User = Depends(_user)


def page(request: Request, user: tuple[Principal, str], name: str, **ctx: Any) -> HTMLResponse:
    who, bearer = user
    base = {"who": who, "csrf": csrf_token(bearer), "csrf_field": CSRF_FIELD, "can_act": can_act(who)}
    return templates.TemplateResponse(request, name, {**base, **ctx})


def can_act(who: Principal) -> bool:
    return who.role.allows(Role.operator)


def ui_router() -> APIRouter:
    """A router for dashboard routes under ``/ui``, outside the OpenAPI schema."""
    return APIRouter(prefix="/ui", route_class=UIRoute, include_in_schema=False)
