"""Domain errors. Services raise these; the HTTP layer maps them to 4xx responses."""

from __future__ import annotations


class FleetError(Exception):
    """Base of every expected, client-caused error."""

    status_code: int = 400
    code: str = "bad_request"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class Invalid(FleetError):
    status_code = 422
    code = "invalid"


class NotFound(FleetError):
    status_code = 404
    code = "not_found"


class Conflict(FleetError):
    status_code = 409
    code = "conflict"


class SeqRace(Conflict):
    """Another DesiredState was issued for a device between this transaction's read of its seq
    and its write: nothing of this transaction may stand (two states would share one seq, and the
    device would keep whichever arrived first). Retry with a fresh read."""


class Unauthorized(FleetError):
    status_code = 401
    code = "unauthorized"


class Forbidden(FleetError):
    status_code = 403
    code = "forbidden"


class PayloadTooLarge(FleetError):
    status_code = 413
    code = "too_large"
