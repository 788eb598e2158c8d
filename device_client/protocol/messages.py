"""Pydantic payloads of the MQTT protocol (docs/architecture.md, "Wire protocol").

Every payload is a JSON object with a ``schema`` field naming its kind and version. Parsing goes
through :func:`parse_payload`, which turns every kind of bad input (not JSON, too large, wrong
schema, invalid fields) into :class:`~device_client.protocol.errors.InvalidPayload`.
"""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, ClassVar, Literal, Self, TypeVar

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, ValidationError, field_validator

from .errors import InvalidPayload
from .names import (  # noqa: F401 - re-exported: the patterns have always been importable from here
    MODEL_NAME_PATTERN,
    MODEL_NAME_RE,
    SEMVER_PATTERN,
    SEMVER_RE,
    VARIANT_PATTERN,
    VARIANT_RE,
)
from .routing import RoutingPolicy
from .topics import DEVICE_ID_PATTERN

#: no protocol message is anywhere near this; larger ones are rejected before parsing
MAX_PAYLOAD_BYTES = 64 * 1024
#: bounds of the server's columns (BIGINT, INTEGER), so that a message the parser accepts can be
#: stored: a device's message that cannot be is rejected as malformed, not discovered at write time
MAX_BIGINT = 2**63 - 1
MAX_INT = 2**31 - 1
#: model names and versions are at most 64 characters everywhere (MODEL_NAME_PATTERN, columns)
MAX_NAME = 64


def strict_json(value: Any) -> Any:
    """``value`` if it is plain JSON that any JSON reader takes back, else ValueError.

    For free-form fields (``details``, ``serving``): JSON escapes can carry a lone UTF-16
    surrogate and Python's JSON accepts ``NaN``/``Infinity``; both parse here, but the server's
    strict JSON reader could not read such a value back once stored."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError("text holds a lone UTF-16 surrogate") from None
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{value} is not a JSON number")
    elif isinstance(value, dict):
        for k, v in value.items():
            strict_json(k)
            strict_json(v)
    elif isinstance(value, list):
        for v in value:
            strict_json(v)
    return value


def utcnow() -> datetime:
    return datetime.now(UTC)


class DeploymentPhase(StrEnum):
    """Per-device deployment phases (docs/architecture.md, "State machines")."""

    pending = "pending"
    notified = "notified"
    downloading = "downloading"
    verifying = "verifying"
    installing = "installing"
    probation = "probation"
    succeeded = "succeeded"
    failed = "failed"
    rolled_back = "rolled_back"
    timed_out = "timed_out"
    cancelled = "cancelled"


TERMINAL_PHASES = frozenset(
    {
        DeploymentPhase.succeeded,
        DeploymentPhase.failed,
        DeploymentPhase.rolled_back,
        DeploymentPhase.timed_out,
        DeploymentPhase.cancelled,
    }
)


class ServeMode(StrEnum):
    serve = "serve"
    shadow = "shadow"


class Payload(BaseModel):
    """Base of every wire payload: a fixed ``schema`` tag, JSON helpers."""

    model_config = ConfigDict(populate_by_name=True, extra="ignore", frozen=True)
    SCHEMA: ClassVar[str]

    schema_: str = Field(alias="schema")

    @field_validator("schema_")
    @classmethod
    def _check_schema(cls, value: str) -> str:
        if value != cls.SCHEMA:
            raise ValueError(f"expected schema {cls.SCHEMA!r}, got {value!r}")
        return value

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True)

    def to_json(self) -> bytes:
        """Compact JSON, serialised by pydantic-core in one step (a device's reports and health
        windows, a simulator's tens of thousands); :meth:`to_dict` gives the same values."""
        return self.model_dump_json(by_alias=True).encode("utf-8")

    @classmethod
    def build(cls, **fields: Any) -> Self:
        return cls(schema=cls.SCHEMA, **fields)


class Probation(BaseModel):
    """Limits the device enforces on its own after a swap; a breach reverts it."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    seconds: float = Field(default=60.0, ge=0, le=7 * 86400)
    min_requests: int = Field(default=0, ge=0)
    max_error_rate: float = Field(default=0.05, ge=0, le=1)
    max_p95_ms: float | None = Field(default=None, gt=0)
    max_p95_ratio: float | None = Field(default=None, gt=0)


class DesiredState(Payload):
    """What the director wants one device to run; travels inside a signed envelope."""

    SCHEMA: ClassVar[str] = "fleet.desired/1"

    device_id: str = Field(pattern=f"^{DEVICE_ID_PATTERN}$")
    seq: int = Field(ge=1)
    issued_at: datetime
    expires_at: datetime
    rollout_id: str | None = None
    model: str = Field(pattern=MODEL_NAME_PATTERN)
    version: str = Field(pattern=SEMVER_PATTERN)
    release: int = Field(ge=1)
    target: str = Field(min_length=1, max_length=512)
    length: int = Field(ge=1)
    hashes: dict[str, str]
    variant: str = Field(default="default", pattern=VARIANT_PATTERN)
    mode: ServeMode = ServeMode.serve
    probation: Probation = Field(default_factory=Probation)
    #: who answers this model's requests: edge, cloud or cache (None: the edge alone)
    routing: RoutingPolicy | None = None


class Report(Payload):
    """A deployment phase change, with a device-monotonic ``seq`` for deduplication."""

    SCHEMA: ClassVar[str] = "fleet.report/1"

    device_id: str = Field(pattern=f"^{DEVICE_ID_PATTERN}$")
    seq: int = Field(ge=1, le=MAX_BIGINT)
    at: AwareDatetime
    phase: DeploymentPhase
    desired_seq: int | None = Field(default=None, ge=0, le=MAX_INT)
    rollout_id: str | None = Field(default=None, max_length=16)
    model: str | None = Field(default=None, max_length=MAX_NAME)
    version: str | None = Field(default=None, max_length=MAX_NAME)
    reason: str | None = Field(default=None, max_length=2000)
    details: dict[str, Any] = Field(default_factory=dict)
    #: what the device serves after this change: {model: version}
    serving: dict[str, str] = Field(default_factory=dict)

    _strict = field_validator("details", "serving")(classmethod(lambda cls, v: strict_json(v)))


class HealthWindow(Payload):
    """Inference health over one window of ``window_s`` seconds."""

    SCHEMA: ClassVar[str] = "fleet.health/1"

    device_id: str = Field(pattern=f"^{DEVICE_ID_PATTERN}$")
    seq: int = Field(ge=1, le=MAX_BIGINT)
    at: AwareDatetime
    window_s: float = Field(gt=0)
    model: str = Field(max_length=MAX_NAME)
    version: str = Field(max_length=MAX_NAME)
    mode: ServeMode = ServeMode.serve
    requests: int = Field(ge=0, le=MAX_INT)
    errors: int = Field(ge=0, le=MAX_INT)
    p50_ms: float | None = Field(default=None, ge=0)
    p95_ms: float | None = Field(default=None, ge=0)
    p99_ms: float | None = Field(default=None, ge=0)
    shadow_requests: int | None = Field(default=None, ge=0, le=MAX_INT)
    agreement: float | None = Field(default=None, ge=0, le=1)
    shadow_p95_ms: float | None = Field(default=None, ge=0)
    # hybrid edge/cloud routing (docs/architecture.md, "Hybrid routing"): set when the model's
    # DesiredState carries a routing policy; who answered each request, how many were escalated
    # or held back, and how often the edge answer matched the cloud's where both were known
    answered_edge: int | None = Field(default=None, ge=0, le=MAX_INT)
    answered_cloud: int | None = Field(default=None, ge=0, le=MAX_INT)
    answered_cache: int | None = Field(default=None, ge=0, le=MAX_INT)
    escalations: int | None = Field(default=None, ge=0, le=MAX_INT)
    budget_limited: int | None = Field(default=None, ge=0, le=MAX_INT)
    breaker_open: int | None = Field(default=None, ge=0, le=MAX_INT)
    cloud_failed: int | None = Field(default=None, ge=0, le=MAX_INT)
    escalation_rate: float | None = Field(default=None, ge=0, le=1)
    cloud_p95_ms: float | None = Field(default=None, ge=0)
    cloud_compared: int | None = Field(default=None, ge=0, le=MAX_INT)
    cloud_agreement: float | None = Field(default=None, ge=0, le=1)
    #: the variant of the version that served the window (absent from older devices)
    variant: str | None = Field(default=None, pattern=VARIANT_PATTERN)
    #: mean CPU time of the inference thread per request (None: no request measured), and the
    #: process's resident memory at the window's end (docs/architecture.md, "CPU and memory")
    cpu_ms_per_request: float | None = Field(default=None, ge=0)
    rss_bytes: int | None = Field(default=None, ge=0, le=MAX_BIGINT)


class HardwareFacts(BaseModel):
    """What a device tells the server about itself at enrollment and in presence."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    arch: str = Field(min_length=1, max_length=32)
    ram_mb: int = Field(ge=0, le=MAX_BIGINT)
    cpu_count: int = Field(ge=1, le=MAX_INT)
    onnxruntime_version: str = Field(min_length=1, max_length=32)
    execution_providers: list[str] = Field(default_factory=list, max_length=32)
    os: str | None = Field(default=None, max_length=64)
    #: the CPU features that decide int8 speed (``avx512_vnni``, ``avx_vnni``, ``avx2``,
    #: ``asimddp``, ``i8mm``) this device has; variant constraints can require them
    cpu_flags: list[str] = Field(default_factory=list, max_length=16)

    _strict = field_validator("execution_providers", "cpu_flags")(classmethod(lambda cls, v: strict_json(v)))


class Presence(Payload):
    """Online/offline state; retained, and the offline form is the device's MQTT will."""

    SCHEMA: ClassVar[str] = "fleet.presence/1"

    device_id: str = Field(pattern=f"^{DEVICE_ID_PATTERN}$")
    status: Literal["online", "offline"]
    at: AwareDatetime | None = None
    hardware: HardwareFacts | None = None
    serving: dict[str, str] = Field(default_factory=dict)

    _strict = field_validator("serving")(classmethod(lambda cls, v: strict_json(v)))


P = TypeVar("P", bound=Payload)


def parse_payload(data: bytes | str, model: type[P]) -> P:
    """Parse JSON bytes into ``model``; every failure is :class:`InvalidPayload`."""
    if len(data) > MAX_PAYLOAD_BYTES:
        raise InvalidPayload(f"payload of {len(data)} bytes exceeds {MAX_PAYLOAD_BYTES}")
    try:  # pydantic-core parses and validates in one pass: ~3x faster on the server's hot path
        return model.model_validate_json(data)
    except ValidationError:
        pass  # anything it refuses takes the path below, which words every error as it always has
    try:
        obj = json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:  # RecursionError: deep nesting
        raise InvalidPayload(f"not JSON: {exc}") from None
    return validate_payload(obj, model)


def validate_payload(obj: Any, model: type[P]) -> P:
    """Validate an already-decoded JSON object into ``model``."""
    if not isinstance(obj, dict):
        raise InvalidPayload("payload is not a JSON object")
    try:
        return model.model_validate(obj)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()))
        raise InvalidPayload(f"{model.__name__}: {where}: {first.get('msg')}") from None
