"""Device registry: enrollment, listing, tags, retiring a device (its decommission, with the
deployments it cancels, is :mod:`server.rollouts.device_deployments`), device authentication."""

from __future__ import annotations

import base64
import binascii
import builtins
from collections.abc import Sequence
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from sqlalchemy.orm import Session

from device_client.protocol.enrollment import EnrollRequest, EnrollResponse, MqttEndpoint
from device_client.protocol.messages import HardwareFacts
from device_client.protocol.topics import is_valid_device_id
from server.admin.schemas import Principal
from server.admin.service import audit
from server.db import after_commit, utcnow
from server.devices.crl import refresh_broker_crl
from server.devices.repository import DeviceRepository, EnrollmentTokenRepository, RevocationRepository
from server.devices.schemas import (
    BulkEnrolled,
    BulkEnrollRequest,
    BulkEnrollResponse,
    DeviceEventOut,
    DeviceOut,
    DevicePage,
    EnrollTokenCreate,
    EnrollTokenCreated,
    EnrollTokenOut,
    TagUpdate,
)
from server.devices.tables import Device, DeviceStatus, DeviceTag, EnrollmentToken
from server.devices.tags import check_tag, check_tags
from server.errors import Conflict, Forbidden, Invalid, NotFound
from server.security import DEVICE_PREFIX, ENROLL_PREFIX, authenticate_token, new_id, new_token
from server.trust.pki import parse_csr, serial_hex

if TYPE_CHECKING:
    from server.context import ServerContext


def device_out(d: Device) -> DeviceOut:
    return DeviceOut(
        id=d.id,
        status=d.status,
        arch=d.arch,
        hardware=d.hardware,
        tags=d.tag_dict(),
        serving=dict(d.serving or {}),
        created_at=d.created_at,
        last_seen_at=d.last_seen_at,
        decommissioned_at=d.decommissioned_at,
        cert_serial=d.cert_serial,
        cert_not_after=d.cert_not_after,
    )


def encode_cursor(device_id: str) -> str:
    return base64.urlsafe_b64encode(device_id.encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> str:
    try:
        value = base64.b64decode(cursor + "=" * (-len(cursor) % 4), altchars=b"-_", validate=True).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise Invalid("malformed cursor") from None
    if not is_valid_device_id(value):
        raise Invalid("malformed cursor")
    return value


class DeviceService:
    def __init__(self, session: Session, ctx: ServerContext) -> None:
        self.session = session
        self.ctx = ctx
        self.devices = DeviceRepository(session)
        self.tokens = EnrollmentTokenRepository(session)

    # -- enrollment tokens -------------------------------------------------------------------
    def create_enroll_token(self, body: EnrollTokenCreate, by: Principal) -> EnrollTokenCreated:
        token_id = new_id()
        token, secret_hash = new_token(ENROLL_PREFIX, token_id)
        ttl = body.ttl_s or self.ctx.settings.enroll_token_ttl_s
        row = self.tokens.add(
            EnrollmentToken(
                id=token_id,
                secret_hash=secret_hash,
                tags=body.tags,
                uses_left=body.uses,
                expires_at=utcnow() + timedelta(seconds=ttl),
                created_by=by.actor,
            )
        )
        audit(
            self.session,
            by,
            "enroll_token.create",
            "enroll_token",
            token_id,
            {"tags": body.tags, "uses": body.uses},
        )
        return EnrollTokenCreated(**EnrollTokenOut.model_validate(row).model_dump(), token=token)

    def list_enroll_tokens(self) -> builtins.list[EnrollTokenOut]:
        return [EnrollTokenOut.model_validate(t) for t in self.tokens.list_active(utcnow())]

    def revoke_enroll_token(self, token_id: str, by: Principal) -> EnrollTokenOut:
        row = self.tokens.get(token_id)
        if row is None:
            raise NotFound(f"no enrollment token {token_id!r}")
        if row.revoked_at is None:
            row.revoked_at = utcnow()
            audit(self.session, by, "enroll_token.revoke", "enroll_token", token_id)
        return EnrollTokenOut.model_validate(row)

    def _consume_enroll_token(self, token: str, uses: int = 1) -> EnrollmentToken:
        row = authenticate_token(
            token, ENROLL_PREFIX, "enrollment", self.tokens.get_for_update, lambda t: t.secret_hash
        )
        if row.revoked_at is not None:
            raise Forbidden("enrollment token has been revoked")
        if row.expires_at <= utcnow():
            raise Forbidden("enrollment token has expired")
        if row.uses_left <= 0:
            raise Forbidden("enrollment token has already been used")
        if row.uses_left < uses:
            raise Forbidden(f"enrollment token has {row.uses_left} uses left, not {uses}")
        if not self.tokens.consume(row.id, uses):  # a concurrent enrollment took them meanwhile
            raise Forbidden(
                "enrollment token has already been used"
                if uses == 1
                else f"enrollment token has fewer than {uses} uses left"
            )
        return row

    # -- enrollment --------------------------------------------------------------------------
    def enroll(self, req: EnrollRequest) -> EnrollResponse:
        # the token first: an anonymous caller without one costs a hash lookup, never a signature
        # check; a refused CSR rolls the use back with the rest of the transaction
        token = self._consume_enroll_token(req.token)
        csr, device_id = parse_csr(req.csr_pem)
        if self.devices.exists(device_id):
            raise Conflict(f"device id {device_id!r} is already enrolled (or was decommissioned)")
        device, certificate_pem, device_token = self._new_device(csr, device_id, req.hardware, token)
        self._insert([device])
        audit(
            self.session,
            f"device:{device_id}",
            "device.enroll",
            "device",
            device_id,
            {"enroll_token": token.id, "arch": req.hardware.arch, "cert_serial": device.cert_serial},
        )
        return EnrollResponse(
            device_id=device_id,
            certificate_pem=certificate_pem,
            device_token=device_token,
            **self._fleet_access(token),
        )

    def enroll_many(self, req: BulkEnrollRequest, by: Principal) -> BulkEnrollResponse:
        """Enroll many devices in one transaction (all or none): each still has its own key,
        CSR (CN = device id), certificate, device token and audit entry, exactly as
        :meth:`enroll` would give it; the token's uses are consumed together."""
        token = self._consume_enroll_token(req.token, uses=len(req.devices))  # before any CSR
        parsed = [(parse_csr(item.csr_pem), item) for item in req.devices]
        ids = [device_id for (_, device_id), _ in parsed]
        if len(set(ids)) != len(ids):
            raise Invalid("the batch names a device id more than once")
        taken = self.devices.existing(ids)
        if taken:
            raise Conflict(f"device id {sorted(taken)[0]!r} is already enrolled (or was decommissioned)")
        out: list[BulkEnrolled] = []
        devices: list[Device] = []
        for (csr, device_id), item in parsed:
            device, certificate_pem, device_token = self._new_device(csr, device_id, item.hardware, token)
            devices.append(device)
            audit(
                self.session, by, "device.enroll", "device", device_id,
                {"enroll_token": token.id, "arch": item.hardware.arch, "cert_serial": device.cert_serial,
                 "bulk": True},
            )  # fmt: skip
            out.append(
                BulkEnrolled(device_id=device_id, certificate_pem=certificate_pem, device_token=device_token)
            )
        self._insert(devices)
        return BulkEnrollResponse(devices=out, **self._fleet_access(token))

    def _new_device(
        self,
        csr: x509.CertificateSigningRequest,
        device_id: str,
        hardware: HardwareFacts,
        token: EnrollmentToken,
    ) -> tuple[Device, str, str]:
        """A device enrolled with ``token``, with a new certificate for its CSR and a new device
        token: (the device row, its certificate PEM, its device token)."""
        cert = self.ctx.ca.issue_client(csr, device_id, self.ctx.settings.device_cert_days)
        device_token, token_hash = new_token(DEVICE_PREFIX, device_id)
        device = Device(
            id=device_id,
            status=DeviceStatus.enrolled,
            hardware=hardware.model_dump(mode="json"),
            arch=hardware.arch,
            cert_serial=serial_hex(cert),
            cert_not_after=cert.not_valid_after_utc,
            token_hash=token_hash,
            enrolled_with=token.id,
            tags=[DeviceTag(key=k, value=v) for k, v in sorted(token.tags.items())],
        )
        return device, cert.public_bytes(Encoding.PEM).decode("ascii"), device_token

    def _fleet_access(self, token: EnrollmentToken) -> dict[str, Any]:
        """What every device enrolled with ``token`` is told besides its own certificate and
        token: the fleet CA, the broker, the TUF root and URLs, the director's key, its tags."""
        settings = self.ctx.settings
        host, port = settings.mqtt_endpoint()
        return {
            "ca_certificate_pem": self.ctx.ca.cert_pem,
            "mqtt": MqttEndpoint(host=host, port=port, tls=True),
            "tuf_root": self.ctx.repo.trusted_root(),
            "tuf_metadata_url": f"{settings.public_url}/tuf/metadata/",
            "tuf_targets_url": settings.targets_base_url,
            "director_public_key_pem": self.ctx.director.public_key_pem,
            "tags": dict(token.tags),
            "cloud_url": settings.cloud_public_url.rstrip("/") or None,
        }

    def _insert(self, devices: list[Device]) -> None:
        """INSERT new devices. The existence check before is not atomic: a concurrent enrollment
        of the same id may commit in between, and the primary key then refuses ours (409)."""
        try:
            self.devices.add_all(devices)
        except sa.exc.IntegrityError:
            ids = ", ".join(repr(d.id) for d in devices[:3]) + (", ..." if len(devices) > 3 else "")
            raise Conflict(
                f"device id {ids} was enrolled concurrently (or the batch collides with one)"
                if len(devices) > 1
                else f"device id {ids} is already enrolled (a concurrent enrollment took it)"
            ) from None

    # -- registry ----------------------------------------------------------------------------
    def get(self, device_id: str) -> Device:
        device = self.devices.get(device_id)
        if device is None:
            raise NotFound(f"no device {device_id!r}")
        return device

    def list(
        self,
        *,
        cursor: str | None,
        limit: int,
        tags: Sequence[tuple[str, str]],
        status: DeviceStatus | None,
        arch: str | None,
    ) -> DevicePage:
        rows = self.devices.page(
            after_id=decode_cursor(cursor) if cursor else None,
            limit=limit,
            tags=tags,
            status=status,
            arch=arch,
        )
        items = [DeviceOut(**r) for r in rows]
        return DevicePage(
            items=items, next_cursor=encode_cursor(items[-1].id) if len(items) == limit else None
        )

    def update_tags(self, device_id: str, update: TagUpdate, by: Principal) -> DeviceOut:
        device = self.get(device_id)
        if device.status == DeviceStatus.decommissioned:
            raise Conflict(f"device {device_id!r} is decommissioned")
        check_tags(update.set)
        for key in update.remove:
            check_tag(key, "x")
        current = {t.key: t for t in device.tags}
        for key in update.remove:
            if key in current:
                device.tags.remove(current.pop(key))
        for key, value in update.set.items():
            if key in current:
                current[key].value = value
            else:
                device.tags.append(DeviceTag(key=key, value=value))
        if len(device.tags) > 32:
            raise Invalid("a device may carry at most 32 tags")
        self.session.flush()
        audit(
            self.session, by, "device.tag", "device", device_id, {"set": update.set, "remove": update.remove}
        )
        return device_out(device)

    def retire(self, device: Device) -> None:
        """Mark ``device`` decommissioned and revoke its certificate and its download token; after
        the commit, the broker re-reads the CRL and the device's open connection is cut. The caller
        cancels what the device will never finish and writes the audit entry
        (:meth:`server.rollouts.device_deployments.DeviceDeploymentService.decommission`)."""
        device_id = device.id
        device.status = DeviceStatus.decommissioned
        device.decommissioned_at = utcnow()
        # a tick that read the device before this commit and signs a state for it now fails its
        # seq check (SeqRace) and retries, instead of re-arming a deployment the caller cancels
        device.desired_seq = (device.desired_seq or 0) + 1
        RevocationRepository(self.session).add(device.cert_serial, device_id)
        after_commit(self.session, lambda: self._revoke_on_broker(device_id))

    def _revoke_on_broker(self, device_id: str) -> None:
        """After the commit: the new CRL, then the device's open connection cut (a revoked
        certificate only stops new handshakes; see :mod:`server.mqtt.kick`)."""
        written = refresh_broker_crl(self.ctx, force=True)
        if (written is not None and written.reloaded) or self.ctx.settings.mqtt_enabled:
            self.ctx.broker.cut(device_id)

    def events(self, device_id: str, limit: int) -> builtins.list[DeviceEventOut]:
        self.get(device_id)
        return [DeviceEventOut.model_validate(e) for e in self.devices.events(device_id, limit)]

    def authenticate_device(self, bearer: str) -> Device:
        device = authenticate_token(bearer, DEVICE_PREFIX, "device", self.devices.get, lambda d: d.token_hash)
        if device.status == DeviceStatus.decommissioned:
            raise Forbidden(f"device {device.id!r} is decommissioned")
        return device
