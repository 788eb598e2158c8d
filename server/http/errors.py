"""Error handlers: domain errors become 4xx JSON ``{"detail": ..., "code": ...}``."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from sqlalchemy.orm.exc import StaleDataError

from server.errors import FleetError, Unauthorized
from server.http.bodylimit import BodyTooLarge
from server.trust.repository import SigningKeyUnavailable

log = logging.getLogger(__name__)


class ErrorOut(BaseModel):
    """An error body: a domain error's message and code, or FastAPI's list of validation errors."""

    detail: str | list[dict[str, Any]]
    code: str | None = None


#: documented on every route, so that a domain 422 (``Invalid``) matches the OpenAPI schema too
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    422: {"model": ErrorOut, "description": "invalid request (validation or domain error)"}
}


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(FleetError)
    async def _fleet_error(request: Request, exc: FleetError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if isinstance(exc, Unauthorized) else None
        return JSONResponse(
            {"detail": exc.message, "code": exc.code}, status_code=exc.status_code, headers=headers
        )

    @app.exception_handler(BodyTooLarge)
    async def _body_too_large(request: Request, exc: BodyTooLarge) -> JSONResponse:
        # a streamed body passed its route's cap (server/http/bodylimit.py); the rest stays unread
        return JSONResponse(
            {"detail": exc.detail, "code": "too_large"}, status_code=413, headers={"Connection": "close"}
        )

    @app.exception_handler(StaleDataError)
    async def _changed_meanwhile(request: Request, exc: StaleDataError) -> JSONResponse:
        # optimistic concurrency (Rollout.row_version): the engine or another operator changed the
        # row between this request's read and its write; nothing of this request was written
        return JSONResponse(
            {"detail": "what this request changes was changed meanwhile (by the rollout engine or another "
             "operator); read it again and retry", "code": "conflict"},
            status_code=409,
        )  # fmt: skip

    @app.exception_handler(SigningKeyUnavailable)
    async def _signing_key_offline(request: Request, exc: SigningKeyUnavailable) -> JSONResponse:
        # the targets (or root) key is kept offline: publishing waits for its publish window
        return JSONResponse(
            {"detail": f"{exc}; see docs/keys.md (offline keys)", "code": "signing_key_offline"},
            status_code=503,
        )
