"""Dashboard sign-in: the admin bearer token in an HttpOnly, SameSite=Strict cookie (Secure over
HTTPS), checked on every request exactly as the API checks it (so revocation and expiry take effect
at once), and a CSRF token derived from it (HMAC-SHA256 keyed by the token) that every
state-changing form carries. The login form itself is guarded by a double-submit token: a random
value in a short-lived pre-session cookie and in the form's hidden field, compared in constant time."""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets

from fastapi import Request, Response
from sqlalchemy.orm import Session

from server.admin.schemas import Principal
from server.admin.service import AdminService
from server.admin.tables import Role
from server.errors import Forbidden, Unauthorized

COOKIE = "fleet_ui"
COOKIE_PATH = "/ui"
CSRF_FIELD = "csrf"
#: the login form's pre-session cookie: only sent back to the login page, for ten minutes
LOGIN_COOKIE = "fleet_login"
LOGIN_COOKIE_PATH = "/ui/login"
LOGIN_COOKIE_MAX_AGE_S = 600
_LOGIN_TOKEN = re.compile(r"^[0-9a-f]{64}$")
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


def login_csrf(request: Request) -> str:
    """The login form's double-submit token: the one the browser's pre-session cookie already holds
    (several open login tabs stay valid), else a new random one."""
    held = request.cookies.get(LOGIN_COOKIE, "")
    return held if _LOGIN_TOKEN.match(held) else secrets.token_hex(32)


def check_login_csrf(request: Request, submitted: str | None) -> None:
    """:class:`Forbidden` unless the form's field equals the pre-session cookie (constant time):
    another site can neither read the cookie nor make the browser send it (SameSite=Strict), so it
    cannot sign a browser into a token of its choosing."""
    held = request.cookies.get(LOGIN_COOKIE, "")
    if not held or not submitted or not hmac.compare_digest(held.encode(), submitted.encode()):
        raise Forbidden("missing or expired sign-in form token: load the sign-in page and try again")


def set_login_cookie(request: Request, response: Response, value: str) -> None:
    response.set_cookie(
        LOGIN_COOKIE, value, max_age=LOGIN_COOKIE_MAX_AGE_S, path=LOGIN_COOKIE_PATH, httponly=True,
        samesite="strict", secure=request.url.scheme == "https",
    )  # fmt: skip


def clear_login_cookie(request: Request, response: Response) -> None:
    response.delete_cookie(
        LOGIN_COOKIE, path=LOGIN_COOKIE_PATH, httponly=True, samesite="strict",
        secure=request.url.scheme == "https",
    )  # fmt: skip


def set_cookie(request: Request, response: Response, bearer: str) -> None:
    response.set_cookie(
        COOKIE, bearer, path=COOKIE_PATH, httponly=True, samesite="strict",
        secure=request.url.scheme == "https",
    )  # fmt: skip


def clear_cookie(request: Request, response: Response) -> None:
    response.delete_cookie(
        COOKIE, path=COOKIE_PATH, httponly=True, samesite="strict", secure=request.url.scheme == "https"
    )
