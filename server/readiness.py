"""``GET /readyz``: whether this server can do its work, for load balancers and orchestrators.

Ready means the database answers, its schema is at the newest migration, and (with MQTT on)
every MQTT link of the server is connected, and the embedded cloud tier (when ``fleet server run``
starts one) runs and answers. ``GET /healthz`` only says the process answers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

import sqlalchemy as sa
from pydantic import BaseModel

from server.migrate import current_revisions

if TYPE_CHECKING:
    from server.db import Database
    from server.mqtt.runtime import MqttRuntime


class Readiness(BaseModel):
    status: Literal["ready", "not_ready"]
    #: the checks that failed (``database``, ``migrations``, ``mqtt``, ``cloud``)
    not_ready: list[str]
    #: per check: ``ok`` and what it found (an error, the revisions, each MQTT link's state)
    checks: dict[str, dict[str, Any]]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


def check_ready(
    db: Database, heads: set[str], mqtt: MqttRuntime | None, cloud: dict[str, Any] | None = None
) -> Readiness:
    """Run the checks; ``heads``: the newest migration revision(s)
    (:func:`server.migrate.head_revisions`, read once at start-up); ``cloud``: the embedded cloud
    tier's check (:meth:`server.cloud.embedded.CloudSupervisor.check`), whose ``ok`` is that it
    runs and answers, whatever its models: a tier still without them is listed as ``ready: false``
    but does not fail the admin API's readiness."""
    checks: dict[str, dict[str, Any]] = {}
    try:
        with db.engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
            current = current_revisions(conn)
    except Exception as exc:  # any driver error means "not ready", never a 500
        checks["database"] = {"ok": False, "error": _first_line(exc)}
        checks["migrations"] = {"ok": False, "error": "the database does not answer"}
    else:
        checks["database"] = {"ok": True}
        checks["migrations"] = {"ok": current == heads, "current": sorted(current), "head": sorted(heads)}
    if mqtt is not None:
        links = mqtt.status()
        ok = all(link.get("connected") for link in links.values())
        checks["mqtt"] = {"ok": ok, "links": links}
    if cloud is not None:
        checks["cloud"] = cloud
    failed = [name for name, check in checks.items() if not check["ok"]]
    return Readiness(status="not_ready" if failed else "ready", not_ready=failed, checks=checks)
