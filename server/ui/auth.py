"""Dashboard sign-in: the admin bearer token in an HttpOnly, SameSite=Strict cookie (Secure over
HTTPS), checked on every request exactly as the API checks it (so revocation and expiry take effect
at once), and a CSRF token derived from it (HMAC-SHA256 keyed by the token) that every
state-changing form carries."""

from __future__ import annotations

import hashlib
import hmac

from fastapi import Request, Response
from sqlalchemy.orm import Session

from server.admin.schemas import Principal
from server.admin.service import AdminService
from server.admin.tables import Role
from server.errors import Forbidden, Unauthorized

COOKIE = "fleet_ui"
COOKIE_PATH = "/ui"
CSRF_FIELD = "csrf"
#: dashboard roles: a cloud tier's token may not sign in
UI_ROLES = (Role.viewer, Role.operator, Role.admin)


class LoginRequired(Exception):
    """No valid sign-in cookie: pages redirect to the login page, partials answer 401."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def csrf_token(bearer: str) -> str:
    """The signed-in token's CSRF token: unguessable without the token, and reveals nothing of it."""
    return hmac.new(bearer.encode(), b"fleet-ui-csrf", hashlib.sha256).hexdigest()


def check_login(session: Session, bearer: str) -> Principal:
    """The principal of a token typed at the login page; :class:`Unauthorized` if the API would
    refuse it (unknown, revoked, expired) or its role has no dashboard."""
    principal = AdminService(session).authenticate(bearer)
    if principal.role not in UI_ROLES:
        raise Unauthorized(f"a {principal.role.value!r} token cannot sign in to the dashboard")
    return principal


def signed_in(request: Request, session: Session) -> tuple[Principal, str]:
    """The principal and token of the request's cookie; :class:`LoginRequired` without one."""
    bearer = request.cookies.get(COOKIE, "")
    if not bearer:
        raise LoginRequired("sign in with an admin, operator or viewer token")
    try:
        return check_login(session, bearer), bearer
    except Unauthorized as exc:
        raise LoginRequired(exc.message) from None


def check_csrf(bearer: str, submitted: str | None) -> None:
    """:class:`Forbidden` unless ``submitted`` is the CSRF token of the signed-in token."""
    if not submitted or not hmac.compare_digest(submitted, csrf_token(bearer)):
        raise Forbidden("missing or wrong CSRF token: reload the page and try again")


def set_cookie(request: Request, response: Response, bearer: str) -> None:
    response.set_cookie(
        COOKIE, bearer, path=COOKIE_PATH, httponly=True, samesite="strict",
        secure=request.url.scheme == "https",
    )  # fmt: skip


def clear_cookie(request: Request, response: Response) -> None:
    response.delete_cookie(
        COOKIE, path=COOKIE_PATH, httponly=True, samesite="strict", secure=request.url.scheme == "https"
    )
