"""API schemas of the device registry (the tag syntax is :mod:`server.devices.tags`)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from device_client.protocol.enrollment import MqttEndpoint
from device_client.protocol.messages import HardwareFacts
from server.devices.tables import DeviceStatus
from server.devices.tags import check_tags
from server.errors import Invalid


class DeviceOut(BaseModel):
    id: str
    status: DeviceStatus
    arch: str
    hardware: dict[str, Any]
    tags: dict[str, str]
    #: what the device reports it serves: {model: version}
    serving: dict[str, str]
    created_at: datetime
    last_seen_at: datetime | None
    decommissioned_at: datetime | None
    cert_serial: str
    cert_not_after: datetime


class DevicePage(BaseModel):
    items: list[DeviceOut]
    next_cursor: str | None


class TagUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    set: dict[str, str] = Field(default_factory=dict)
    remove: list[str] = Field(default_factory=list)


class EnrollTokenCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tags: dict[str, str] = Field(default_factory=dict)
    uses: int = Field(default=1, ge=1, le=100_000)
    ttl_s: int | None = Field(default=None, ge=60, le=365 * 86400)

    @field_validator("tags")
    @classmethod
    def _tags(cls, v: dict[str, str]) -> dict[str, str]:
        try:
            return check_tags(v)
        except Invalid as exc:
            raise ValueError(exc.message) from None


class EnrollTokenOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    tags: dict[str, str]
    uses_left: int
    expires_at: datetime
    created_at: datetime
    created_by: str | None
    revoked_at: datetime | None


class EnrollTokenCreated(EnrollTokenOut):
    #: shown once; only its hash is stored
    token: str


class DeviceEventOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    seq: int
    at: datetime
    phase: str
    rollout_id: str | None
    desired_seq: int | None
    model: str | None
    version: str | None
    reason: str | None
    details: dict[str, Any]


class BulkEnrollItem(BaseModel):
    model_config = ConfigDict(extra="forbid")

    csr_pem: str = Field(min_length=64, max_length=16384, description="PEM CSR; CN is the device id")
    hardware: HardwareFacts


class BulkEnrollRequest(BaseModel):
    """Many devices at once (a provisioning line, the fleet simulator): one enrollment token with
    at least as many uses left as there are CSRs; all are enrolled or none."""

    model_config = ConfigDict(extra="forbid")

    token: str = Field(min_length=8, max_length=256, description="one enrollment token")
    devices: list[BulkEnrollItem] = Field(min_length=1, max_length=1000)


class BulkEnrolled(BaseModel):
    device_id: str
    certificate_pem: str
    #: bearer token bound to this device, for artifact downloads (stored hashed on the server)
    device_token: str


class BulkEnrollResponse(BaseModel):
    """What every device of the batch shares (as in a single enrollment's answer), once, and each
    device's own certificate and token."""

    ca_certificate_pem: str
    mqtt: MqttEndpoint
    tuf_root: dict[str, Any]
    tuf_metadata_url: str
    tuf_targets_url: str
    director_public_key_pem: str
    tags: dict[str, str] = Field(default_factory=dict)
    #: base URL of the fleet's cloud tier, as in a single enrollment's answer
    cloud_url: str | None = None
    devices: list[BulkEnrolled]
