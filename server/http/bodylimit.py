"""Request body caps by route, enforced before the application reads a byte of the body.

FastAPI reads and parses a JSON body before it runs any dependency, authentication included, so
this middleware is what bounds the memory an anonymous request can take. A declared
``Content-Length`` above the route's cap is answered 413 at once (the body is never read); a body
without one (chunked) is counted as it streams and cut off with 413 once past the cap.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.config import Settings


@dataclass(frozen=True)
class BodyRule:
    """Bodies of ``method`` requests whose path matches ``path`` may carry up to ``limit`` bytes."""

    method: str
    path: re.Pattern[str]
    limit: int
    #: the setting that raises the limit, named in the 413's message
    setting: str


@dataclass(frozen=True)
class BodyLimits:
    """Per-route caps; ``default`` applies to every request no rule names."""

    rules: tuple[BodyRule, ...]
    default: int
    default_setting: str

    def for_request(self, method: str, path: str) -> tuple[int, str]:
        for rule in self.rules:
            if rule.method == method and rule.path.fullmatch(path):
                return rule.limit, rule.setting
        return self.default, self.default_setting


def body_limits(settings: Settings) -> BodyLimits:
    """The server's caps: model pushes, bulk enrollment and signed targets are the large bodies."""
    return BodyLimits(
        rules=(
            BodyRule("POST", re.compile(r"/api/v1/models/[^/]+/versions"), settings.max_upload_bytes,
                     "FLEET_MAX_UPLOAD_BYTES"),
            BodyRule("POST", re.compile(r"/api/v1/enroll/bulk"), settings.max_bulk_enroll_bytes,
                     "FLEET_MAX_BULK_ENROLL_BYTES"),
            BodyRule("PUT", re.compile(r"/api/v1/repository/targets"), settings.max_signed_metadata_bytes,
                     "FLEET_MAX_SIGNED_METADATA_BYTES"),
        ),
        default=settings.max_body_bytes,
        default_setting="FLEET_MAX_BODY_BYTES",
    )  # fmt: skip


def too_large_message(limit: int, setting: str) -> str:
    return f"request body exceeds the limit of {limit} bytes for this route ({setting})"


class BodyTooLarge(HTTPException):
    """Raised from ``receive`` once a streamed body passes its cap (an HTTPException, so FastAPI's
    body reading lets it through rather than turning it into a 400)."""

    def __init__(self, limit: int, setting: str) -> None:
        super().__init__(status_code=413, detail=too_large_message(limit, setting))


async def _send_413(send: Send, message: str) -> None:
    body = json.dumps({"detail": message, "code": "too_large"}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 413,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),  # the unread body makes the connection unusable
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


class BodyLimitMiddleware:
    """Pure ASGI middleware applying :class:`BodyLimits` to every HTTP request."""

    def __init__(self, app: ASGIApp, limits: BodyLimits) -> None:
        self.app = app
        self.limits = limits

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit, setting = self.limits.for_request(scope["method"], scope["path"])
        for name, value in scope["headers"]:
            if name == b"content-length" and value.isdigit() and int(value) > limit:
                await _send_413(send, too_large_message(limit, setting))
                return
        received = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(limit, setting)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except BodyTooLarge as exc:  # not answered inside the app (no handler on its way out)
            if started:
                raise
            await _send_413(send, str(exc.detail))
