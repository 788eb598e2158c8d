"""API schemas of the model registry, and the checks on names the registry accepts."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from device_client.protocol.bundle import TensorSpec, ValidationSpec
from device_client.protocol.messages import MODEL_NAME_RE, SEMVER_RE, VARIANT_RE
from server.catalog.tables import VersionStatus
from server.errors import Invalid

#: the bundle file's name inside each target directory
BUNDLE_BASENAME = "bundle.tar"


def check_model_name(name: str) -> str:
    if not MODEL_NAME_RE.fullmatch(name):
        raise Invalid(
            f"invalid model name {name!r}: lowercase letters, digits, '.', '_', '-'; 1-64 characters"
        )
    return name


def check_version(version: str) -> str:
    if len(version) > 64 or not SEMVER_RE.fullmatch(version):
        raise Invalid(f"invalid version {version!r}: expected a semantic version such as 1.2.0")
    return version


def check_variant(variant: str) -> str:
    if not VARIANT_RE.fullmatch(variant):
        raise Invalid(
            f"invalid variant {variant!r}: lowercase letters, digits, '.', '_', '-'; 1-32 characters"
        )
    return variant


def target_path(name: str, version: str, variant: str) -> str:
    """The TUF target path of one bundle: ``<name>/<version>/<variant>/bundle.tar``."""
    return f"{name}/{version}/{variant}/{BUNDLE_BASENAME}"


class Constraints(BaseModel):
    """Hardware a variant needs; a device qualifies when it meets every constraint given.

    ``arch`` lists acceptable architectures (a single string is accepted too), ``providers`` lists
    execution providers of which the device must offer at least one, ``cpu_flags`` CPU features it
    must report, all of them.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    arch: list[str] | None = Field(default=None, max_length=16)
    min_ram_mb: int | None = Field(default=None, ge=0)
    providers: list[str] | None = Field(default=None, max_length=16)
    #: CPU flags the device must report, all of them (e.g. ``["avx512_vnni"]`` for an int8 build)
    cpu_flags: list[str] | None = Field(default=None, max_length=16)

    @field_validator("arch", "cpu_flags", mode="before")
    @classmethod
    def _one_item(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(exclude_none=True)


class VersionMetadata(BaseModel):
    """The optional ``metadata`` form field of a push (a JSON object)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    preprocessing: dict[str, Any] | str | None = None
    validation: ValidationSpec = Field(default_factory=ValidationSpec)
    constraints: Constraints = Field(default_factory=Constraints)
    description: str | None = Field(default=None, max_length=2000)


class ArtifactOut(BaseModel):
    """One variant of a version: its signed bundle (a TUF target)."""

    model_config = ConfigDict(from_attributes=True)

    variant: str
    target_path: str
    length: int
    sha256: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    constraints: dict[str, Any]
    #: size, agreement with fp32 and latency ratio, for variants built on push (else empty)
    measurements: dict[str, Any] = Field(default_factory=dict)
    created_at: datetime
    #: listed in the signed targets metadata (false: staged, waiting for ``fleet model sign``)
    published: bool = True


class VersionOut(BaseModel):
    model: str
    version: str
    release: int
    status: VersionStatus
    created_at: datetime
    created_by: str | None
    revoked_at: datetime | None
    variants: list[ArtifactOut]


class ModelSummary(BaseModel):
    name: str
    created_at: datetime
    #: the highest release ever handed out (revoked versions included)
    last_release: int
    version_count: int
    #: the active version with the highest release, if any
    latest_version: str | None
    latest_release: int | None


class ModelOut(ModelSummary):
    versions: list[VersionOut]
