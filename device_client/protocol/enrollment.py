"""Enrollment request and response (``POST /api/v1/enroll``), shared by server and device."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from .messages import HardwareFacts


class EnrollRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    token: str = Field(min_length=8, max_length=256, description="one enrollment token")
    csr_pem: str = Field(min_length=64, max_length=16384, description="PEM CSR; CN is the device id")
    hardware: HardwareFacts


class MqttEndpoint(BaseModel):
    host: str
    port: int
    tls: bool = True


class EnrollResponse(BaseModel):
    device_id: str
    certificate_pem: str
    ca_certificate_pem: str
    mqtt: MqttEndpoint
    #: the TUF trusted root (``root.json`` as JSON) the device pins from now on
    tuf_root: dict[str, Any]
    tuf_metadata_url: str
    tuf_targets_url: str
    director_public_key_pem: str
    #: bearer token bound to this device, for artifact downloads (stored hashed on the server)
    device_token: str
    tags: dict[str, str] = Field(default_factory=dict)
    #: base URL of the fleet's cloud tier (``fleet cloud serve``) for routing policies naming the
    #: ``fleet`` endpoint; None: the server names none (a device may still set one itself)
    cloud_url: str | None = Field(default=None, max_length=2048)
