"""Device registry, enrollment tokens, enrollment and the fleet CA's public material."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from sqlalchemy.orm import Session

from device_client.protocol.enrollment import EnrollRequest, EnrollResponse
from server.admin.schemas import Principal
from server.devices.schemas import (
    BulkEnrollRequest,
    BulkEnrollResponse,
    DeviceEventOut,
    DeviceOut,
    DevicePage,
    EnrollTokenCreate,
    EnrollTokenCreated,
    EnrollTokenOut,
    TagUpdate,
)
from server.devices.service import DeviceService, device_out
from server.devices.tables import DeviceStatus
from server.devices.tags import parse_tag_expr
from server.http.deps import Admin, Operator, SessionDep, Viewer, get_ctx
from server.http.errors import ErrorOut
from server.rollouts.device_deployments import DeviceDeploymentService
from server.rollouts.schemas import DesiredAssign, DesiredOut

router = APIRouter(prefix="/api/v1", tags=["devices"])


def _service(request: Request, session: Session) -> DeviceService:
    return DeviceService(session, get_ctx(request))


def _deployments(request: Request, session: Session) -> DeviceDeploymentService:
    return DeviceDeploymentService(session, get_ctx(request))


@router.post("/enroll-tokens", status_code=201)
def create_enroll_token(
    body: EnrollTokenCreate, request: Request, session: Session = SessionDep, who: Principal = Operator
) -> EnrollTokenCreated:
    return _service(request, session).create_enroll_token(body, who)


@router.get("/enroll-tokens")
def list_enroll_tokens(
    request: Request, session: Session = SessionDep, _: Principal = Operator
) -> list[EnrollTokenOut]:
    return _service(request, session).list_enroll_tokens()


@router.delete("/enroll-tokens/{token_id}")
def revoke_enroll_token(
    token_id: str, request: Request, session: Session = SessionDep, who: Principal = Operator
) -> EnrollTokenOut:
    return _service(request, session).revoke_enroll_token(token_id, who)


@router.post("/enroll/bulk", status_code=201)
def enroll_bulk(
    body: BulkEnrollRequest, request: Request, session: Session = SessionDep, who: Principal = Operator
) -> BulkEnrollResponse:
    """Enroll up to 1,000 devices at once (each its own CSR; all or none). For provisioning lines
    and the fleet simulator: an operator token AND an enrollment token with enough uses."""
    return _service(request, session).enroll_many(body, who)


#: the anonymous endpoints answer 429 with Retry-After past their per-address rate (ratelimit.py)
RATE_LIMITED: dict[int | str, dict[str, Any]] = {
    429: {"model": ErrorOut, "description": "too many requests from this address (Retry-After)"}
}


@router.post("/enroll", status_code=201, responses=RATE_LIMITED)
def enroll(body: EnrollRequest, request: Request, session: Session = SessionDep) -> EnrollResponse:
    """Enroll a device: one enrollment token, a CSR (CN = device id) and its hardware facts."""
    return _service(request, session).enroll(body)


@router.get("/devices")
def list_devices(
    request: Request,
    tag: list[str] = Query(default=[], description="key:value (or key=value); repeat to AND"),
    status: DeviceStatus | None = None,
    arch: str | None = None,
    cursor: str | None = None,
    limit: int = Query(default=100, ge=1, le=1000),
    session: Session = SessionDep,
    _: Principal = Viewer,
) -> DevicePage:
    tags = [parse_tag_expr(t) for t in tag]
    return _service(request, session).list(cursor=cursor, limit=limit, tags=tags, status=status, arch=arch)


@router.get("/devices/{device_id}")
def get_device(
    device_id: str, request: Request, session: Session = SessionDep, _: Principal = Viewer
) -> DeviceOut:
    return device_out(_service(request, session).get(device_id))


@router.patch("/devices/{device_id}/tags")
def update_tags(
    device_id: str,
    body: TagUpdate,
    request: Request,
    session: Session = SessionDep,
    who: Principal = Operator,
) -> DeviceOut:
    return _service(request, session).update_tags(device_id, body, who)


@router.post("/devices/{device_id}/decommission")
def decommission(
    device_id: str, request: Request, session: Session = SessionDep, who: Principal = Admin
) -> DeviceOut:
    return _deployments(request, session).decommission(device_id, who)


@router.put("/devices/{device_id}/desired")
def assign_desired(
    device_id: str,
    body: DesiredAssign,
    request: Request,
    session: Session = SessionDep,
    who: Principal = Operator,
) -> DesiredOut:
    """Pin a device to a model version: signs a DesiredState and publishes it (retained, QoS 1)."""
    return _deployments(request, session).assign_desired(device_id, body, who)


@router.get("/devices/{device_id}/desired")
def get_desired(
    device_id: str, request: Request, session: Session = SessionDep, _: Principal = Viewer
) -> DesiredOut:
    return _deployments(request, session).get_desired(device_id)


@router.get("/devices/{device_id}/events")
def device_events(
    device_id: str,
    request: Request,
    limit: int = Query(default=100, ge=1, le=1000),
    session: Session = SessionDep,
    _: Principal = Viewer,
) -> list[DeviceEventOut]:
    """The device's reports (deployment phase changes), newest first."""
    return _service(request, session).events(device_id, limit)


@router.get("/pki/ca.pem", response_class=PlainTextResponse)
def ca_certificate(request: Request) -> str:
    return get_ctx(request).ca.cert_pem


@router.get(
    "/pki/crl.pem",
    response_class=PlainTextResponse,
    responses={304: {"description": "not modified (If-None-Match / If-Modified-Since)"}, **RATE_LIMITED},
)
def crl(request: Request) -> Response:
    """The fleet CA's CRL as last issued (server/devices/crl.py), with ETag and Last-Modified."""
    doc = request.app.state.crl.current()
    if doc is None:
        detail = "no valid CRL could be issued; see the server log"
        return JSONResponse({"detail": detail, "code": "unavailable"}, status_code=503)
    if doc.not_modified(request.headers.get("if-none-match"), request.headers.get("if-modified-since")):
        return Response(status_code=304, headers=doc.headers())
    return Response(doc.pem, media_type="text/plain; charset=utf-8", headers=doc.headers())
