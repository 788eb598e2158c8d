"""The routing policy of hybrid edge/cloud inference (docs/architecture.md, "Hybrid routing").

It travels inside the director-signed DesiredState as ``routing``, so nobody without the director
key can redirect a device's traffic. Validation is strict (``extra="forbid"``, bounded numbers,
``https`` only for an external endpoint): a policy that parses is one the device can follow.
:func:`parse_routing_policy` turns any bad input into one ``InvalidPayload`` naming every problem.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from enum import StrEnum
from typing import Any, ClassVar, Self
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import InvalidPayload
from .names import MODEL_NAME_RE, SEMVER_RE

ROUTING_SCHEMA = "fleet.routing/1"
#: ``cloud.endpoint`` naming the fleet's own cloud tier (``fleet cloud serve``)
FLEET_ENDPOINT = "fleet"
#: ``cloud.send`` sending the edge model's own inputs (anything else names an edge output)
SEND_INPUT = "input"
#: tensor names: ONNX allows nearly anything; this covers what exporters write ("input.1",
#: "onnx::Gemm_0", "float_input", "output_probability") and is safe in JSON and logs
TENSOR_NAME_PATTERN = r"^[A-Za-z0-9_][A-Za-z0-9_.:/-]{0,127}$"
#: cloud model names and versions of an external endpoint (Triton, KServe, MLServer); they go into
#: a URL path, so no "/", "?", "%" or spaces
CLOUD_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}", re.ASCII)
CLOUD_VERSION_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,63}", re.ASCII)
SECRET_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"  # noqa: S105 - a name pattern
#: an HTTP field name (RFC 9110 token)
HEADER_NAME_PATTERN = r"^[!#$%&'*+.^_`|~0-9A-Za-z-]{1,64}$"
#: headers the client sets itself; a credential may not replace them
RESERVED_HEADERS = frozenset(
    {
        "host",
        "content-length",
        "content-type",
        "transfer-encoding",
        "connection",
        "accept-encoding",
        "te",
        "upgrade",
        "expect",
        "trailer",
    }
)
MAX_URL = 2048
MAX_CA_PEM = 16 * 1024
MAX_RENAMES = 32
MIB = 1024**2
GIB = 1024**3


class RoutingMode(StrEnum):
    edge_only = "edge_only"
    prefer_edge = "prefer_edge"
    prefer_cloud = "prefer_cloud"
    cloud_only = "cloud_only"


class ConfidenceKind(StrEnum):
    max_prob = "max_prob"  # the top class's probability; higher is surer
    margin = "margin"  # top-1 minus top-2 probability; higher is surer
    entropy = "entropy"  # in nats; lower is surer


class _Strict(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)


class ConfidenceSpec(_Strict):
    """How to read the edge model's confidence, and when it is sure enough."""

    #: the edge output holding class scores (None: the edge model's first output)
    output: str | None = Field(default=None, pattern=TENSOR_NAME_PATTERN)
    kind: ConfidenceKind = ConfidenceKind.max_prob
    #: apply softmax over the last axis first (the output holds logits)
    softmax: bool = False
    threshold: float = Field(ge=0, le=64)

    @model_validator(mode="after")
    def _threshold_fits_kind(self) -> Self:
        if self.kind is not ConfidenceKind.entropy and self.threshold > 1:
            raise ValueError(f"threshold {self.threshold} is out of range for {self.kind}: must be in [0, 1]")
        return self


class Credential(_Strict):
    """A header the device adds for an external endpoint: ``<header>: <prefix><secret>``. The
    policy names the secret; its value stays on the device (never in a policy)."""

    header: str = Field(pattern=HEADER_NAME_PATTERN)
    secret: str = Field(pattern=SECRET_NAME_PATTERN)
    #: e.g. "Bearer "
    prefix: str = Field(default="", max_length=32, pattern=r"^[\x20-\x7e]*$")

    @field_validator("header")
    @classmethod
    def _not_reserved(cls, value: str) -> str:
        if value.lower() in RESERVED_HEADERS:
            raise ValueError(f"header {value!r} is set by the client itself and cannot carry a credential")
        return value


class CloudSpec(_Strict):
    """Which cloud model answers escalations, where, and what is sent to it."""

    #: ``fleet`` (the fleet's cloud tier) or the ``https://`` base URL of an Open Inference
    #: Protocol server (Triton, KServe, MLServer)
    endpoint: str = Field(default=FLEET_ENDPOINT, min_length=1, max_length=MAX_URL)
    #: CA bundle verifying an external endpoint: a file on the device, or PEM text (signed with the
    #: policy); neither: the system's CAs
    ca_file: str | None = Field(default=None, min_length=2, max_length=4096)
    ca_pem: str | None = Field(default=None, max_length=MAX_CA_PEM)
    credential: Credential | None = None
    model: str = Field(min_length=1, max_length=128)
    #: None: whichever version the cloud serves as active
    version: str | None = Field(default=None, min_length=1, max_length=64)
    timeout_ms: int = Field(default=1000, ge=10, le=30_000)
    #: ``input`` (the edge model's inputs) or the name of an edge output the cloud model takes
    #: instead (split inference: raw data stays on the device)
    send: str = Field(default=SEND_INPUT, pattern=TENSOR_NAME_PATTERN)
    #: names of what is sent as the cloud model calls them: {edge name: cloud input name}
    inputs: dict[str, str] = Field(default_factory=dict, max_length=MAX_RENAMES)
    #: the outputs the cloud answers: {edge output name: cloud output name}; empty: every edge
    #: output, under the same name
    outputs: dict[str, str] = Field(default_factory=dict, max_length=MAX_RENAMES)

    @field_validator("inputs", "outputs")
    @classmethod
    def _tensor_names(cls, value: dict[str, str]) -> dict[str, str]:
        for k, v in value.items():
            for name in (k, v):
                if not re.fullmatch(TENSOR_NAME_PATTERN[1:-1], name, re.ASCII):
                    raise ValueError(f"{name!r} is not a tensor name")
        return value

    @field_validator("ca_file")
    @classmethod
    def _absolute(cls, value: str | None) -> str | None:
        if value is not None and (not value.startswith("/") or any(c in value for c in "\0\r\n")):
            raise ValueError("ca_file must be an absolute path on the device")
        return value

    @field_validator("ca_pem")
    @classmethod
    def _pem(cls, value: str | None) -> str | None:
        if value is not None and "-----BEGIN CERTIFICATE-----" not in value:
            raise ValueError("ca_pem must hold PEM certificates")
        return value

    @property
    def is_fleet(self) -> bool:
        return self.endpoint == FLEET_ENDPOINT

    @model_validator(mode="after")
    def _endpoint(self) -> Self:
        if self.send != SEND_INPUT and not self.outputs:
            raise ValueError(
                f"send names the edge output {self.send!r}: list in outputs what the cloud "
                "model answers (edge output name: cloud output name)"
            )
        if self.is_fleet:
            if self.ca_file or self.ca_pem or self.credential:
                raise ValueError(
                    "ca_file, ca_pem and credential are for an external endpoint; "
                    "the fleet endpoint uses the device's own identity"
                )
            if not MODEL_NAME_RE.fullmatch(self.model):
                raise ValueError(f"model {self.model!r} is not a fleet model name")
            if self.version is not None and not SEMVER_RE.fullmatch(self.version):
                raise ValueError(f"version {self.version!r} is not a semantic version")
            return self
        check_external_url(self.endpoint)
        if self.ca_file and self.ca_pem:
            raise ValueError("give ca_file or ca_pem, not both")
        if not CLOUD_NAME_RE.fullmatch(self.model):
            raise ValueError(f"model {self.model!r} is not a usable model name")
        if self.version is not None and not CLOUD_VERSION_RE.fullmatch(self.version):
            raise ValueError(f"version {self.version!r} is not a usable version")
        return self


def check_external_url(url: str) -> None:
    """Raise ValueError unless ``url`` is a plain ``https://host[:port][/path]`` base URL."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError as exc:
        raise ValueError(f"endpoint {url!r} is not a URL: {exc}") from None
    if parts.scheme != "https":
        raise ValueError(f"endpoint must be 'fleet' or an https:// URL, got {url!r}")
    if not parts.hostname or parts.username is not None or parts.password is not None:
        raise ValueError(f"endpoint {url!r} needs a host and no user info")
    if parts.query or parts.fragment or any(ord(c) <= 0x20 or ord(c) >= 0x7F for c in url):
        raise ValueError(f"endpoint {url!r} may not carry a query, a fragment, spaces or non-ASCII")


class Budget(_Strict):
    """Per-device token bucket for cloud calls: ``per_minute`` refill, ``burst`` capacity."""

    per_minute: float = Field(default=60.0, ge=0, le=60_000)
    burst: int = Field(default=10, ge=1, le=10_000)


class BreakerSpec(_Strict):
    """Open after ``failures`` consecutive cloud failures; after ``open_s`` let ``probes`` trial
    calls through; a success closes it, a failure opens it again."""

    failures: int = Field(default=5, ge=1, le=1000)
    open_s: float = Field(default=30.0, ge=0.1, le=86_400)
    probes: int = Field(default=1, ge=1, le=100)


class CacheSpec(_Strict):
    """Cloud answers kept on the device's disk (0 bytes: no cache)."""

    max_bytes: int = Field(default=16 * MIB, ge=0, le=16 * GIB)
    ttl_s: float = Field(default=3600.0, ge=0, le=30 * 86_400)


class CollectSpec(_Strict):
    """Whether the cloud may keep escalated inputs as hard examples (personal-data-sensitive)."""

    enabled: bool = False
    sample_rate: float = Field(default=0.1, ge=0, le=1)
    max_bytes: int = Field(default=256 * MIB, ge=0, le=1024 * GIB)


class AgreementSpec(_Strict):
    """When an edge answer matches the cloud's: top-1 equality on the confidence output (a
    classifier); ``numpy.allclose`` with these tolerances on any other output (a regressor)."""

    rtol: float = Field(default=0.05, ge=0, le=1000)
    atol: float = Field(default=1e-3, ge=0, le=1e9)


class RoutingPolicy(_Strict):
    """Who answers a device's inference requests: the edge model, the cloud model, or a cached
    cloud answer (docs/architecture.md, "Hybrid routing")."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False, populate_by_name=True)
    SCHEMA: ClassVar[str] = ROUTING_SCHEMA

    schema_: str = Field(default=ROUTING_SCHEMA, alias="schema")
    mode: RoutingMode
    confidence: ConfidenceSpec | None = None
    cloud: CloudSpec | None = None
    budget: Budget = Field(default_factory=Budget)
    #: share of confident edge answers also sent to the cloud, off the caller's path (prefer_edge)
    audit_rate: float = Field(default=0.0, ge=0, le=1)
    breaker: BreakerSpec = Field(default_factory=BreakerSpec)
    cache: CacheSpec = Field(default_factory=CacheSpec)
    collect: CollectSpec = Field(default_factory=CollectSpec)
    agreement: AgreementSpec = Field(default_factory=AgreementSpec)

    @field_validator("schema_")
    @classmethod
    def _check_schema(cls, value: str) -> str:
        if value != ROUTING_SCHEMA:
            raise ValueError(f"expected schema {ROUTING_SCHEMA!r}, got {value!r}")
        return value

    @model_validator(mode="after")
    def _coherent(self) -> Self:
        if self.mode is not RoutingMode.edge_only and self.cloud is None:
            raise ValueError(f"mode {self.mode} needs a cloud section")
        if self.mode is RoutingMode.prefer_edge and self.confidence is None:
            raise ValueError("mode prefer_edge needs a confidence section (when is the edge unsure?)")
        if self.collect.enabled and self.cloud is not None and not self.cloud.is_fleet:
            raise ValueError("collect works with the fleet endpoint only")
        return self

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True)


def parse_routing_policy(data: bytes | str | Mapping[str, Any]) -> RoutingPolicy:
    """A :class:`RoutingPolicy` from JSON text or a decoded object; every failure is one
    :class:`InvalidPayload` listing each problem as ``field.path: message``."""
    if isinstance(data, bytes | str):
        try:
            data = json.loads(data)
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:
            raise InvalidPayload(f"routing policy is not JSON: {exc}") from None
    if not isinstance(data, Mapping):
        raise InvalidPayload("routing policy is not a JSON object")
    try:
        return RoutingPolicy.model_validate(dict(data))
    except ValidationError as exc:
        raise InvalidPayload(f"routing policy: {describe_errors(exc)}") from None


def describe_errors(exc: ValidationError) -> str:
    """Every error of ``exc`` as ``loc: message``, joined with "; "."""
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err.get("loc", ())) or "(policy)"
        msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
        parts.append(f"{where}: {msg}")
    return "; ".join(parts)
