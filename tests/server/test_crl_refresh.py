"""The broker's CRL is rebuilt from the database: at server start-up, and by the periodic refresh
job before it nears its nextUpdate (past it, OpenSSL refuses every handshake to the broker).

Proven with ``openssl verify -crl_check`` (what Mosquitto's TLS does at each handshake): a good
certificate verifies and a decommissioned one is "certificate revoked" under the re-issued CRL,
where the stale one gave "CRL has expired" for every certificate."""

from __future__ import annotations

import shutil
import subprocess
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from fastapi.testclient import TestClient

from server.app import create_app
from server.devices.repository import RevocationRepository
from tests.helpers.pki import HARDWARE, make_csr
from tests.helpers.tokens import create_admin_token

needs_openssl = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")


def _enroll(client, ctx, device_id: str, tmp_path: Path) -> Path:
    headers = {"Authorization": f"Bearer {create_admin_token(ctx, 'admin')}"}
    token = client.post("/api/v1/enroll-tokens", json={}, headers=headers).json()["token"]
    csr, _ = make_csr(device_id)
    r = client.post("/api/v1/enroll", json={"token": token, "csr_pem": csr, "hardware": HARDWARE})
    assert r.status_code == 201, r.text
    cert = tmp_path / f"{device_id}.crt"
    cert.write_text(r.json()["certificate_pem"])
    return cert


def _decommission(client, ctx, device_id: str) -> int:
    headers = {"Authorization": f"Bearer {create_admin_token(ctx, 'admin')}"}
    r = client.post(f"/api/v1/devices/{device_id}/decommission", headers=headers)
    assert r.status_code == 200, r.text
    return int(r.json()["cert_serial"], 16)


def _crl(path: Path) -> x509.CertificateRevocationList:
    return x509.load_pem_x509_crl(path.read_bytes())


def _openssl_verify(ca_pem: str, crl: Path, cert: Path, tmp_path: Path) -> str:
    ca_file = tmp_path / "ca.pem"
    ca_file.write_text(ca_pem)
    r = subprocess.run(
        ["openssl", "verify", "-crl_check", "-CAfile", ca_file, "-CRLfile", crl, cert],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    return r.stdout + r.stderr


def test_startup_rebuilds_the_crl_from_the_database(settings, tmp_path):
    with TestClient(create_app(settings)) as client:
        ctx = client.app.state.ctx
        _enroll(client, ctx, "dev-gone", tmp_path)
        serial = _decommission(client, ctx, "dev-gone")
    # the broker dir is lost (a new disk, a cleaned deployment): an empty CRL would let the
    # decommissioned device back in, no CRL at all keeps an embedded broker from starting
    shutil.rmtree(settings.broker_dir)
    with TestClient(create_app(settings)):
        crl = _crl(settings.broker_dir / "crl.pem")
    assert crl.get_revoked_certificate_by_serial_number(serial) is not None
    assert crl.next_update_utc > datetime.now(UTC) + timedelta(days=29)


def test_startup_reissues_a_crl_that_lost_a_revocation(settings, tmp_path):
    with TestClient(create_app(settings)) as client:
        ctx = client.app.state.ctx
        _enroll(client, ctx, "dev-gone", tmp_path)
        serial = _decommission(client, ctx, "dev-gone")
        ctx.ca.write_crl(settings.broker_dir / "crl.pem", [])  # e.g. restored from an old backup
    with TestClient(create_app(settings)):
        crl = _crl(settings.broker_dir / "crl.pem")
    assert crl.get_revoked_certificate_by_serial_number(serial) is not None


@needs_openssl
def test_refresh_job_reissues_an_expiring_crl(settings, tmp_path):
    fast = settings.model_copy(update={"metadata_refresh_interval_s": 0.1})
    with TestClient(create_app(fast)) as client:
        ctx = client.app.state.ctx
        good = _enroll(client, ctx, "dev-ok", tmp_path)
        gone = _enroll(client, ctx, "dev-gone", tmp_path)
        serial = _decommission(client, ctx, "dev-gone")
        path = fast.broker_dir / "crl.pem"

        # what 31 days without a decommission leave on disk: a CRL past its nextUpdate, under
        # which OpenSSL (the broker's TLS) refuses every handshake, the server's own included
        stale_at = datetime.now(UTC) - timedelta(days=31)
        with ctx.db.session_scope() as s:
            revoked = RevocationRepository(s).all()
        ctx.ca.write_crl(path, revoked, now=stale_at)
        assert "CRL has expired" in _openssl_verify(ctx.ca.cert_pem, path, good, tmp_path)

        deadline = time.monotonic() + 10
        while _crl(path).next_update_utc < datetime.now(UTC) + timedelta(days=29):
            assert time.monotonic() < deadline, "the refresh job did not re-issue the expired CRL"
            time.sleep(0.05)
        crl = _crl(path)
        assert crl.get_revoked_certificate_by_serial_number(serial) is not None
        assert crl.is_signature_valid(ctx.ca.key.public_key())
        assert _openssl_verify(ctx.ca.cert_pem, path, good, tmp_path).strip().endswith("OK")
        assert "certificate revoked" in _openssl_verify(ctx.ca.cert_pem, path, gone, tmp_path)

        # a CRL with less than half of its validity left is re-issued too (not only an expired one)
        ctx.ca.write_crl(path, revoked, timedelta(minutes=4))
        deadline = time.monotonic() + 10
        while _crl(path).next_update_utc < datetime.now(UTC) + timedelta(days=29):
            assert time.monotonic() < deadline, "the refresh job did not re-issue an expiring CRL"
            time.sleep(0.05)
        # and a current one is left alone
        before = path.read_bytes()
        time.sleep(0.5)
        assert path.read_bytes() == before


def test_refresh_broker_crl_reports_what_it_did(ctx, tmp_path):
    from server.devices.crl import refresh_broker_crl

    path = ctx.settings.broker_dir / "crl.pem"
    assert path.exists()  # written at start-up
    assert refresh_broker_crl(ctx) is None  # current: untouched
    later = datetime.now(UTC) + timedelta(days=16)
    written = refresh_broker_crl(ctx, now=later)
    assert written is not None
    assert "less than half" in written.reason
    assert (written.revoked, written.reloaded) == (0, 0)  # no local broker runs this config
    assert refresh_broker_crl(ctx, force=True) is not None
