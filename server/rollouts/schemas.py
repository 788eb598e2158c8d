"""API schemas of rollouts."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from device_client.protocol.messages import Probation
from server.rollouts.policy import Gates, Stage
from server.rollouts.tables import RolloutStatus


class HardwareSelector(BaseModel):
    model_config = ConfigDict(extra="forbid")

    arch: str | None = None
    min_ram_mb: int | None = Field(default=None, ge=0)
    providers: list[str] = Field(default_factory=list)


class Selector(BaseModel):
    """Which devices a rollout targets; every given criterion must hold (AND)."""

    model_config = ConfigDict(extra="forbid")

    tags: dict[str, str] = Field(default_factory=dict)
    device_ids: list[str] = Field(default_factory=list, max_length=100_000)
    hardware: HardwareSelector = Field(default_factory=HardwareSelector)


class RolloutCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str
    version: str
    selector: Selector = Field(default_factory=Selector)
    stages: list[Stage] = Field(min_length=1, max_length=20)
    gates: Gates = Field(default_factory=Gates)
    probation: Probation = Field(default_factory=Probation)
    on_failure: Literal["pause", "rollback"] = "pause"
    max_concurrent_downloads: int = Field(default=50, ge=1, le=100_000)
    device_timeout_s: int = Field(default=900, ge=10, le=7 * 86400)
    #: the routing policy (``fleet.routing/1``, device_client/protocol/routing.py) the rollout's
    #: DesiredStates carry, checked at creation against the catalog; None: they carry none, and
    #: the devices answer at the edge alone
    routing: dict[str, Any] | None = None
    #: start immediately (default) or stay a draft until ``POST .../start``
    start: bool = True
    #: leave out the selected devices no variant of the version fits (else creation is refused)
    skip_unfit: bool = False

    @field_validator("stages")
    @classmethod
    def _shadow_first(cls, stages: list[Stage]) -> list[Stage]:
        seen_serve = False
        for s in stages:
            if s.shadow and seen_serve:
                raise ValueError("shadow stages must come before serving stages")
            seen_serve = seen_serve or not s.shadow
        return stages


class StageView(BaseModel):
    index: int
    devices: int
    shadow: bool
    soak_s: float
    phases: dict[str, int]
    health: dict[str, Any]


class RolloutOut(BaseModel):
    id: str
    model: str
    version: str
    status: RolloutStatus
    selector: dict[str, Any]
    stages: list[dict[str, Any]]
    gates: dict[str, Any]
    probation: dict[str, Any]
    on_failure: str
    max_concurrent_downloads: int
    device_timeout_s: int
    current_stage: int
    stage_started_at: datetime | None
    rollback_started_at: datetime | None = None
    soak_until: datetime | None
    reason: str | None
    verdict: dict[str, Any]
    created_at: datetime
    updated_at: datetime
    finished_at: datetime | None
    created_by: str | None
    #: the routing policy its DesiredStates carry (None: none)
    routing: dict[str, Any] | None = None
    #: selected devices no variant fitted, left out of the rollout (``skip_unfit``), and some ids
    unfit_skipped: int = 0
    unfit_skipped_examples: list[str] = Field(default_factory=list)


class RolloutDetail(RolloutOut):
    devices: int
    phases: dict[str, int]
    #: devices of the rollout that are offline and have not begun the update: they take it when
    #: they return (a completed rollout may still have some)
    offline_pending: int = 0
    stage_views: list[StageView]
    baseline: dict[str, Any]
    #: advice on the rollout as created (e.g. a soak shorter than the devices' health window)
    warnings: list[str] = Field(default_factory=list)


class DesiredAssign(BaseModel):
    """Pin one device to a model version (a direct deployment, outside any rollout)."""

    model_config = ConfigDict(extra="forbid")

    model: str
    version: str
    variant: str | None = None
    mode: str = Field(default="serve", pattern="^(serve|shadow)$")
    probation: dict[str, Any] = Field(default_factory=dict)


class DesiredOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    device_id: str
    seq: int
    rollout_id: str | None
    model: str
    version: str
    release: int
    variant: str
    mode: str
    probation: dict[str, Any]
    issued_at: datetime
    expires_at: datetime


class HealthSeries(BaseModel):
    version: str
    mode: str
    #: per bucket: at (bucket start), requests, errors, error_rate, p95_ms, agreement (weighted by
    #: shadow requests), cpu_ms_per_request, rss_bytes (the largest reported), escalation_rate
    #: (escalations over the requests of the windows that reported escalations), cloud_agreement
    #: (weighted by cloud_compared, the edge answers compared with the cloud's), routed_requests,
    #: cloud_compared, devices; the hybrid rates are None without a routing policy
    points: list[dict[str, Any]]


class RolloutHealth(BaseModel):
    """A rollout's devices' health over time, per version and mode, from the baseline window
    before it was created; ``baseline`` holds the numbers the gates compare against (error rate,
    p95, CPU time per request, and under a routing policy escalation rate and cloud agreement)."""

    rollout_id: str
    model: str
    version: str
    since: datetime
    bucket_s: int
    baseline: dict[str, Any]
    series: list[HealthSeries]
