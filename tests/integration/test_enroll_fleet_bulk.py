"""The simulator's bulk enrollment (``enroll_fleet(bulk=True)`` -> ``POST /api/v1/enroll/bulk``)
against a real server under uvicorn on SQLite.

The batch size is lowered to 20 so 50 devices travel as three batches: the keys and CSRs are made
in the spawned worker processes and the batches are posted two at a time, concurrently, into one
SQLite database. Every identity written to the work directory must be a working one: its
certificate chains to the fleet CA and belongs to its key, its device row carries the enrollment
token's tags, its device token is accepted, and the token's uses are consumed exactly.
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
import sqlalchemy as sa
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

from server.admin.tables import AuditEntry
from server.devices.tables import Device, DeviceStatus, EnrollmentToken
from server.mqtt.broker import free_port
from server.runner import ServerThread
from server.security import verify_secret
from server.sim import provision
from server.sim.provision import FleetIdentities, enroll_fleet
from tests.helpers.tokens import create_admin_token

pytestmark = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)

N = 50
TAGS = {"fleet": "bulk-sim", "site": "line-7"}


@pytest.fixture
def server(settings) -> Iterator[ServerThread]:
    """The real app under uvicorn on a free loopback port (no broker: enrollment is HTTP only)."""
    port = free_port()
    live = ServerThread(settings.model_copy(update={"port": port, "public_url": f"http://127.0.0.1:{port}"}))
    live.start()
    yield live
    live.stop()


def _public_der(key) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def test_enroll_fleet_bulk_on_sqlite(server, tmp_path, monkeypatch):
    monkeypatch.setattr(provision, "BULK_BATCH", 20)
    admin = create_admin_token(server.ctx, "operator")
    workdir = tmp_path / "sim"
    fleet = enroll_fleet(server.url, admin, N, workdir, prefix="bulk", tags=TAGS, bulk=True)

    ids = [f"bulk-{i:05d}" for i in range(N)]
    assert [d.device_id for d in fleet.devices] == ids
    assert fleet.ca_pem == server.ctx.ca.cert_pem
    assert fleet.director_pem == server.ctx.director.public_key_pem

    # every identity: a certificate issued by the fleet CA, for its id, to the key beside it
    ca = x509.load_pem_x509_certificate(fleet.ca_file.read_bytes())
    assert ca.subject == x509.load_pem_x509_certificate(server.ctx.ca.cert_pem.encode()).subject
    serials = set()
    for ident in fleet.devices:
        cert = x509.load_pem_x509_certificate(fleet.cert_file(ident.device_id).read_bytes())
        cert.verify_directly_issued_by(ca)  # raises unless the CA's key signed it
        assert cert.issuer == ca.subject
        assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == ident.device_id
        assert ca.not_valid_before_utc <= cert.not_valid_before_utc < cert.not_valid_after_utc
        key = serialization.load_pem_private_key(fleet.key_file(ident.device_id).read_bytes(), None)
        assert _public_der(key) == cert.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        assert fleet.key_file(ident.device_id).stat().st_mode & 0o077 == 0
        serials.add(cert.serial_number)
    assert len(serials) == N

    # the device rows: one per identity, with the token's tags, the arch the simulator gave it,
    # the certificate it holds and the device token it was given
    with server.ctx.db.session_scope() as s:
        devices = {d.id: d for d in s.scalars(sa.select(Device))}
        tags = {d.id: {t.key: t.value for t in d.tags} for d in devices.values()}
        tokens = s.scalars(sa.select(EnrollmentToken)).all()
        audits = sorted(
            s.scalars(sa.select(AuditEntry.target_id).where(AuditEntry.action == "device.enroll"))
        )
    assert sorted(devices) == ids
    assert all(t == TAGS for t in tags.values()), tags
    for ident in fleet.devices:
        device = devices[ident.device_id]
        cert = x509.load_pem_x509_certificate(fleet.cert_file(ident.device_id).read_bytes())
        assert device.status == DeviceStatus.enrolled
        assert device.arch == ident.arch == device.hardware["arch"]
        assert int(device.cert_serial, 16) == cert.serial_number
        assert ident.device_token.startswith(f"fd.{ident.device_id}.")
        assert verify_secret(ident.device_token.split(".")[2], device.token_hash)
        assert device.enrolled_with == tokens[0].id
    assert {d.arch for d in devices.values()} == {"x86_64", "aarch64"}
    assert audits == ids

    # the enrollment token: made for exactly N uses, all of them consumed
    assert len(tokens) == 1
    assert tokens[0].uses_left == 0
    assert tokens[0].tags == TAGS

    # each device token is accepted by the server (authorised; there is simply no such target)
    with httpx.Client(base_url=server.url, timeout=10) as http:
        for ident in fleet.devices:
            r = http.get("/tuf/targets/none/x.tar", headers={"Authorization": f"Bearer {ident.device_token}"})
            assert r.status_code == 404, (ident.device_id, r.text)
        forged = f"fd.bulk-00000.{'A' * 43}"
        r = http.get("/tuf/targets/none/x.tar", headers={"Authorization": f"Bearer {forged}"})
        assert r.status_code == 401, r.text

    # a restarted simulator reuses the identities in the work directory: nothing enrolled again
    again = enroll_fleet(server.url, admin, N, workdir, prefix="bulk", tags=TAGS, bulk=True)
    assert [(d.device_id, d.device_token) for d in again.devices] == [
        (d.device_id, d.device_token) for d in fleet.devices
    ]
    assert FleetIdentities.load(workdir) is not None
    with server.ctx.db.session_scope() as s:
        assert s.scalar(sa.select(sa.func.count()).select_from(EnrollmentToken)) == 1
        assert s.scalar(sa.select(sa.func.count()).select_from(Device)) == N
