"""A device row as enrollment would store it, for tests that seed the devices table directly."""

from __future__ import annotations

import hashlib
from datetime import datetime, timedelta
from typing import Any


def device_row(device_id: str, now: datetime, **over: Any) -> dict[str, Any]:
    """Columns of ``devices`` for ``device_id`` (enrolled, x86_64, nothing served); ``over``
    replaces any of them."""
    row: dict[str, Any] = {
        "id": device_id, "status": "enrolled", "hardware": {}, "arch": "x86_64", "cert_serial": device_id,
        "cert_not_after": now + timedelta(days=1),
        "token_hash": hashlib.sha256(device_id.encode()).hexdigest(), "created_at": now, "serving": {},
        "last_report_seq": 0, "desired_seq": 0,
    }  # fmt: skip
    row.update(over)
    return row
