"""API schemas of the fleet's field accuracy (``GET /api/v1/models/{name}/field-accuracy``)."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel


class AccuracyFigures(BaseModel):
    """Sums of ``serve`` health windows: requests, who answered them, escalations to the cloud and
    how often the edge answer matched the cloud's where both were known."""

    requests: int = 0
    #: requests of the windows that reported escalations (the rate's denominator)
    routed_requests: int = 0
    escalations: int = 0
    #: escalations / routed_requests (None: no window under a routing policy)
    escalation_rate: float | None = None
    #: edge answers compared with the cloud's, and the share that matched (weighted by comparisons)
    cloud_compared: int = 0
    cloud_agreement: float | None = None
    answered_edge: int = 0
    answered_cloud: int = 0
    answered_cache: int = 0
    budget_limited: int = 0
    breaker_open: int = 0
    cloud_failed: int = 0


class AccuracyBucket(AccuracyFigures):
    #: the bucket covers [start, start + bucket_s)
    start: datetime


class VersionAccuracy(AccuracyFigures):
    """One version's figures over the whole span, and per bucket (oldest first)."""

    version: str
    buckets: list[AccuracyBucket]


class FieldAccuracyOut(BaseModel):
    model: str
    since: datetime
    until: datetime
    bucket_s: int
    #: newest release first
    versions: list[VersionAccuracy]
