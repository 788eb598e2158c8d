"""FastAPI dependencies: server context, the committing session, admin and device principals."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from fastapi import Depends, Request
from sqlalchemy.orm import Session

from server.admin.schemas import Principal
from server.admin.service import AdminService
from server.admin.tables import Role
from server.context import ServerContext
from server.devices.service import DeviceService
from server.devices.tables import Device
from server.errors import Forbidden, Unauthorized


def get_ctx(request: Request) -> ServerContext:
    return request.app.state.ctx


def _session(request: Request) -> Iterator[Session]:
    """The request's unit of work. ``scope="function"`` (below) makes it commit before the
    response is sent, so a failed commit becomes a 5xx rather than a lie."""
    with get_ctx(request).db.session_scope() as session:
        yield session


SessionDep = Depends(_session, scope="function")


def _bearer(request: Request) -> str:
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        raise Unauthorized("missing bearer token")
    return value.strip()


def require_role(role: Role) -> Callable[..., Principal]:
    """A dependency admitting admin tokens whose role is at least ``role``."""

    def dependency(request: Request, session: Session = SessionDep) -> Principal:
        principal = AdminService(session).authenticate(_bearer(request))
        if not principal.role.allows(role):
            raise Forbidden(f"role {principal.role.value!r} may not do this (needs {role.value!r})")
        return principal

    return dependency


def require_device(request: Request, session: Session = SessionDep) -> Device:
    """A dependency admitting an enrolled, not decommissioned device by its device token."""
    return DeviceService(session, get_ctx(request)).authenticate_device(_bearer(request))


Viewer = Depends(require_role(Role.viewer))
Operator = Depends(require_role(Role.operator))
Admin = Depends(require_role(Role.admin))
DeviceAuth = Depends(require_device)
