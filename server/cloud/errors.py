"""Errors of the cloud tier, each with the HTTP status of its Open Inference Protocol answer
(``{"error": "<message>"}``); the app turns them into responses (:mod:`server.cloud.app`)."""

from __future__ import annotations


class OipError(Exception):
    """A request the cloud tier refuses; ``status`` is the HTTP status of the answer."""

    status = 400
    #: the reason label of the ``fleet_cloud_errors_total`` counter
    reason = "bad_request"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def headers(self) -> dict[str, str]:
        return {}


class BadRequest(OipError):
    """Malformed JSON or tensors, a wrong datatype or shape, an unknown output (400)."""


class Unauthorized(OipError):
    status = 401
    reason = "unauthorized"

    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": 'Bearer realm="fleet-cloud"'}


class Forbidden(OipError):
    """A known caller that may not infer: a decommissioned device (403)."""

    status = 403
    reason = "forbidden"


class ModelNotFound(OipError):
    status = 404
    reason = "not_found"


class TooLarge(OipError):
    status = 413
    reason = "too_large"


class RateLimited(OipError):
    """The device's token bucket is empty (429 with ``Retry-After``)."""

    status = 429
    reason = "rate_limited"

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after_s)}


class Unavailable(OipError):
    """The queue is full, or what authenticates callers cannot be reached (503)."""

    status = 503
    reason = "unavailable"

    def __init__(self, message: str, reason: str = "unavailable", retry_after_s: int = 1) -> None:
        super().__init__(message)
        self.reason = reason
        self.retry_after_s = retry_after_s

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after_s)}


class InferenceFailed(OipError):
    """onnxruntime raised while running the request (500)."""

    status = 500
    reason = "inference_failed"
