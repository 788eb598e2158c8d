"""The fleet CA's CRL: validity, when it must be re-issued, and how the broker config keeps it fresh.

A CRL past its ``nextUpdate`` makes OpenSSL refuse every handshake to a broker checking it ("CRL
has expired"), so the CRL must be re-issued long before; these tests build CRLs with short or
past validity instead of waiting 30 days."""

from __future__ import annotations

import shutil
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509

from server.mqtt.broker import CRL_FILE, write_broker_config
from server.trust.pki import CRL_VALIDITY, FleetCA

REVOKED = [("abc123", datetime(2024, 1, 2, tzinfo=UTC)), ("beef", datetime(2024, 3, 4, tzinfo=UTC))]


@pytest.fixture
def ca(tmp_path: Path) -> FleetCA:
    return FleetCA(tmp_path / "keys")


def _load(path: Path) -> x509.CertificateRevocationList:
    return x509.load_pem_x509_crl(path.read_bytes())


def test_crl_validity_and_entries(ca, tmp_path):
    path = tmp_path / "crl.pem"
    ca.write_crl(path, REVOKED, timedelta(hours=2))
    crl = _load(path)
    assert crl.is_signature_valid(ca.key.public_key())
    left = crl.next_update_utc - datetime.now(UTC)
    assert timedelta(hours=2) - timedelta(minutes=1) < left <= timedelta(hours=2)
    assert {r.serial_number for r in crl} == {0xABC123, 0xBEEF}
    assert timedelta(days=30) == CRL_VALIDITY


def test_refresh_reason(ca, tmp_path):
    path = tmp_path / "crl.pem"
    assert "missing" in ca.crl_refresh_reason(path, REVOKED)
    path.write_text("not a crl")
    assert "missing, unreadable" in ca.crl_refresh_reason(path, REVOKED)
    FleetCA(tmp_path / "other-keys").write_crl(path, REVOKED)
    assert "not signed by the fleet CA" in ca.crl_refresh_reason(path, REVOKED)

    ca.write_crl(path, REVOKED)
    assert ca.crl_refresh_reason(path, REVOKED) is None
    assert ca.crl_refresh_reason(path, None) is None
    assert "serials" in ca.crl_refresh_reason(path, REVOKED[:1])  # a decommission it does not list
    assert "serials" in ca.crl_refresh_reason(path, [*REVOKED, ("f00d", datetime.now(UTC))])
    # more than half of the 30 days gone (16 days later): re-issued long before it expires
    later = datetime.now(UTC) + timedelta(days=16)
    assert "less than half" in ca.crl_refresh_reason(path, REVOKED, now=later)
    assert ca.crl_refresh_reason(path, REVOKED, now=datetime.now(UTC) + timedelta(days=14)) is None
    ca.write_crl(path, REVOKED, timedelta(minutes=4))  # 4 of its 9 minutes (5 backdated) left
    assert "less than half" in ca.crl_refresh_reason(path, None)
    ca.write_crl(path, REVOKED, now=datetime.now(UTC) - timedelta(days=31))  # expired
    assert "less than half" in ca.crl_refresh_reason(path, None)


def test_broker_config_writes_the_revoked_serials_it_is_given(ca, tmp_path):
    out = tmp_path / "broker"
    write_broker_config(ca, out, port=18883, revoked=REVOKED, user="nobody")
    assert {r.serial_number for r in _load(out / CRL_FILE)} == {0xABC123, 0xBEEF}


def test_broker_config_keeps_a_fresh_crl_and_reissues_one_nearing_expiry(ca, tmp_path):
    out = tmp_path / "broker"
    write_broker_config(ca, out, port=18883, user="nobody")
    assert list(_load(out / CRL_FILE)) == []  # a new broker dir: an empty CRL, as before

    ca.write_crl(out / CRL_FILE, REVOKED)  # what a decommission wrote
    before = (out / CRL_FILE).read_bytes()
    write_broker_config(ca, out, port=18883, user="nobody")  # `fleet broker config` re-run
    assert (out / CRL_FILE).read_bytes() == before

    ca.write_crl(out / CRL_FILE, REVOKED, now=datetime.now(UTC) - timedelta(days=31))  # expired
    write_broker_config(ca, out, port=18883, user="nobody")
    crl = _load(out / CRL_FILE)
    assert crl.next_update_utc > datetime.now(UTC) + timedelta(days=29)
    assert {(format(r.serial_number, "x"), r.revocation_date_utc) for r in crl} == set(REVOKED)


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
def test_openssl_refuses_every_certificate_under_an_expired_crl(ca, tmp_path):
    """The failure being prevented, as OpenSSL (Mosquitto's TLS) sees it."""
    from server.mqtt.broker import issue_client_files

    ca_file, crl_file = tmp_path / "ca.pem", tmp_path / "crl.pem"
    ca_file.write_text(ca.cert_pem)
    cert, key = tmp_path / "dev.crt", tmp_path / "dev.key"
    issue_client_files(ca, "dev-ok", cert, key)

    def verify() -> str:
        r = subprocess.run(
            ["openssl", "verify", "-crl_check", "-CAfile", ca_file, "-CRLfile", crl_file, cert],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        return r.stdout + r.stderr

    ca.write_crl(crl_file, [], now=datetime.now(UTC) - timedelta(days=31))
    assert "CRL has expired" in verify()
    ca.write_crl(crl_file, [])
    assert verify().strip().endswith("OK")
