"""Hard examples API (admin only: they are personal data). ``GET /api/v1/models/{name}/examples``
exports them as one ``.npz`` (``?since=``, ``?limit=``); ``DELETE`` purges them. Both audited."""

from __future__ import annotations

from datetime import datetime

from fastapi import APIRouter, Query, Response
from sqlalchemy.orm import Session

from server.admin.schemas import Principal
from server.catalog.schemas import check_model_name
from server.examples.service import MAX_EXPORT, ExamplesService
from server.http.deps import Admin, SessionDep

router = APIRouter(prefix="/api/v1", tags=["examples"])


@router.get("/models/{name}/examples", response_class=Response)
def export_examples(
    name: str,
    since: datetime | None = Query(default=None, description="only examples kept at or after (ISO 8601)"),
    limit: int | None = Query(default=None, ge=1, le=MAX_EXPORT, description="the newest N only"),
    session: Session = SessionDep,
    who: Principal = Admin,
) -> Response:
    """The model's hard examples as ``.npz``: ``inputs/<tensor>`` and ``outputs/<tensor>`` stacked
    along the batch axis, ``rows``, ``device_ids``, ``versions``, ``times`` per example."""
    check_model_name(name)
    data, count = ExamplesService(session).export(name, since, limit, who)
    return Response(
        data,
        media_type="application/octet-stream",
        headers={
            "Content-Disposition": f'attachment; filename="{name}-examples.npz"',
            "X-Fleet-Examples": str(count),
        },
    )


@router.delete("/models/{name}/examples")
def purge_examples(name: str, session: Session = SessionDep, who: Principal = Admin) -> dict[str, int]:
    """Delete every hard example kept for the model."""
    check_model_name(name)
    return {"deleted": ExamplesService(session).purge(name, who)}
