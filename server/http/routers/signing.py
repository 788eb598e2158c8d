"""Offline targets signing (``fleet model sign``): the staged targets metadata, and its signature.

* ``GET /api/v1/repository/targets/staged`` (operator): what waits for the targets key: the
  metadata to sign and the targets it lists anew or no longer; 404 when nothing is staged.
* ``POST /api/v1/repository/targets/staged`` (admin): stage a renewal of the current targets (a new
  expiry, same targets) unless something is staged already.
* ``PUT /api/v1/repository/targets`` (admin): the staged metadata signed with the targets key, as
  JSON; published if it is exactly what is staged (``expires`` aside) and verifies under the
  current root (409 when the stage changed since it was fetched, 422 when it does not verify).

See :mod:`server.catalog.signing` and docs/keys.md.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from sqlalchemy.orm import Session

from server.admin.schemas import Principal
from server.catalog.signing import SignedTargetsOut, SigningService, StagedTargetsOut
from server.errors import PayloadTooLarge
from server.http.deps import Admin, Operator, SessionDep, get_ctx

router = APIRouter(prefix="/api/v1/repository", tags=["repository"])


async def _signed_metadata(request: Request) -> bytes:
    """Dependency: the request body, refused past ``Settings.max_signed_metadata_bytes`` (16 MiB by
    default: a listing of many thousands of bundles fits)."""
    limit = get_ctx(request).settings.max_signed_metadata_bytes
    too_large = PayloadTooLarge(f"signed metadata larger than {limit} bytes")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_large
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_large
    return bytes(body)


@router.get("/targets/staged")
def staged_targets(
    request: Request, session: Session = SessionDep, _: Principal = Operator
) -> StagedTargetsOut:
    """The targets metadata waiting for the offline targets key, with what it changes."""
    return SigningService(session, get_ctx(request)).staged()


@router.post("/targets/staged")
def stage_renewal(
    request: Request, session: Session = SessionDep, who: Principal = Admin
) -> StagedTargetsOut:
    """Stage the current targets for re-signing with a new expiry (unless something is staged)."""
    return SigningService(session, get_ctx(request)).stage_renewal(who)


@router.put("/targets")
def publish_signed_targets(
    request: Request,
    session: Session = SessionDep,
    who: Principal = Admin,
    body: bytes = Depends(_signed_metadata),
) -> SignedTargetsOut:
    """Publish the staged targets metadata signed with the (offline) targets key."""
    return SigningService(session, get_ctx(request)).publish_signed(body, who)
