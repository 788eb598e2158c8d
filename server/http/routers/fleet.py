"""The fleet at a glance: what the dashboard's overview shows, as JSON."""

from __future__ import annotations

from fastapi import APIRouter
from sqlalchemy.orm import Session

from server.admin.schemas import Principal
from server.http.deps import SessionDep, Viewer
from server.rollouts.summary import FleetSummary, fleet_summary

router = APIRouter(prefix="/api/v1/fleet", tags=["fleet"])


@router.get("/summary")
def summary(session: Session = SessionDep, _: Principal = Viewer) -> FleetSummary:
    """Devices by status, model version served, arch and execution providers; running and paused
    rollouts with their progress; the ten most recent failed deployments."""
    return fleet_summary(session)
