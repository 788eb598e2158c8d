"""Who may call the cloud tier: enrolled devices by device token or by their fleet certificate
(mTLS), checked against the server's database; unknown callers 401, decommissioned ones 403."""

from __future__ import annotations

import ssl

import httpx
import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from server.cloud.auth import CallerAuth
from server.cloud.errors import Forbidden, Unauthorized
from server.cloud.serve import CloudThread
from server.trust.keys import atomic_write, private_key_pem
from server.trust.pki import CA_CERT_FILE, FleetCA, cert_pem, parse_csr
from tests.helpers.cloud import infer_body, start_fleet
from tests.helpers.onnx_models import make_model
from tests.helpers.pki import key_pem, make_csr

X = infer_body(np.zeros((1, 4), np.float32))


@pytest.fixture
def fleet(settings, tmp_path):
    f = start_fleet(settings)
    f.push("clf", "1.0.0", make_model(tmp_path / "m.onnx"))
    yield f
    f.close()


@pytest.fixture
def cloud(fleet):
    with CloudThread(fleet.cloud_settings("clf")) as c:
        c.wait_ready()
        yield c


def _post(cloud, headers=None):
    return httpx.post(f"{cloud.url}/v2/models/clf/infer", json=X, headers=headers or {})


@pytest.mark.parametrize(
    ("authorization", "message"),
    [
        (None, "device token (Authorization: Bearer) or client certificate is required"),
        ("Basic dXNlcjpwdw==", "is required"),
        ("Bearer fd.dev-1.short", "malformed device token"),
        ("Bearer fd.ghost.AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA", "unknown device token"),
    ],
)
def test_callers_without_a_valid_device_token_are_401(fleet, cloud, authorization, message):
    fleet.enroll("dev-1")
    r = _post(cloud, {"Authorization": authorization} if authorization else None)
    assert r.status_code == 401
    assert message in r.json()["error"]
    assert r.headers["www-authenticate"].startswith("Bearer")


def test_wrong_secret_and_admin_tokens_are_401(fleet, cloud):
    device = fleet.enroll("dev-1")
    forged = device.token.rsplit(".", 1)[0] + ".B" + device.token.rsplit(".", 1)[1][1:]
    assert _post(cloud, {"Authorization": f"Bearer {forged}"}).status_code == 401
    admin = fleet.admin.headers["authorization"]
    r = _post(cloud, {"Authorization": admin})
    assert r.status_code == 401
    assert "malformed device token" in r.json()["error"]


def test_decommissioned_device_is_403_everywhere(fleet, cloud):
    device = fleet.enroll("dev-1")
    assert _post(cloud, device.headers()).status_code == 200
    fleet.decommission("dev-1")
    r = _post(cloud, device.headers())
    assert r.status_code == 403
    assert "decommissioned" in r.json()["error"]
    assert httpx.get(f"{cloud.url}/v2/models/clf", headers=device.headers()).status_code == 403
    assert httpx.get(f"{cloud.url}/v2/models/clf/ready", headers=device.headers()).status_code == 403
    # the public probes stay open
    assert httpx.get(f"{cloud.url}/v2/health/ready").status_code == 200


def test_model_endpoints_need_a_caller(fleet, cloud):
    assert httpx.get(f"{cloud.url}/v2/models/clf").status_code == 401
    assert httpx.get(f"{cloud.url}/v2/models/clf/ready").status_code == 401


def test_verdicts_are_reused_for_cache_s_then_asked_again(fleet):
    device = fleet.enroll("dev-1")
    now = [0.0]
    auth = CallerAuth(fleet.ctx.db, cache_s=5.0, clock=lambda: now[0])
    assert auth.by_token(device.token).device_id == "dev-1"
    fleet.decommission("dev-1")
    assert auth.by_token(device.token).device_id == "dev-1"  # within the period: the cached verdict
    now[0] = 5.1
    with pytest.raises(Forbidden):
        auth.by_token(device.token)
    with pytest.raises(Unauthorized):
        auth.by_token("fd.dev-2.AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA")
    now[0] = 100.0
    with pytest.raises(Unauthorized):  # a refusal too is asked again, and still refused
        auth.by_token("fd.dev-2.AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA")


# ---------------------------------------------------------------------------------- mTLS


@pytest.fixture
def tls_cloud(fleet, tmp_path):
    """The tier over HTTPS with a certificate from the fleet CA, asking for client certificates."""
    key = ec.generate_private_key(ec.SECP256R1())
    cert = fleet.ctx.ca.issue_server(key.public_key(), "fleet-cloud", [], ["127.0.0.1"])
    cert_file, key_file = tmp_path / "cloud.crt", tmp_path / "cloud.key"
    atomic_write(cert_file, cert_pem(cert).encode())
    atomic_write(key_file, private_key_pem(key), mode=0o600)
    settings = fleet.cloud_settings("clf", cloud_tls_cert=cert_file, cloud_tls_key=key_file)
    with CloudThread(settings) as c:
        c.wait_ready()
        yield c


def _client(fleet, cert=None) -> httpx.Client:
    context = ssl.create_default_context(cafile=str(fleet.settings.key_dir / CA_CERT_FILE))
    if cert is not None:
        context.load_cert_chain(*map(str, cert))
    return httpx.Client(verify=context)


def test_device_certificate_authenticates_without_a_token(fleet, tls_cloud, tmp_path):
    device = fleet.enroll("dev-1")
    with _client(fleet, device.write_identity(tmp_path / "id")) as client:
        r = client.post(f"{tls_cloud.url}/v2/models/clf/infer", json=X)
        assert r.status_code == 200, r.text
        fleet.decommission("dev-1")
        r = client.post(f"{tls_cloud.url}/v2/models/clf/infer", json=X)
    assert r.status_code == 403
    assert "revoked" in r.json()["error"]


def test_token_still_works_over_tls_without_a_certificate(fleet, tls_cloud):
    device = fleet.enroll("dev-1")
    with _client(fleet) as client:
        assert (
            client.post(f"{tls_cloud.url}/v2/models/clf/infer", json=X, headers=device.headers()).status_code
            == 200
        )
        assert client.post(f"{tls_cloud.url}/v2/models/clf/infer", json=X).status_code == 401


def test_certificates_the_registry_does_not_know_are_refused(fleet, tls_cloud, tmp_path):
    # a fleet-CA certificate for a device id that was never enrolled
    csr, key = make_csr("dev-ghost")
    ghost = fleet.ctx.ca.issue_client(parse_csr(csr)[0], "dev-ghost", 1)
    (tmp_path / "ghost.crt").write_text(cert_pem(ghost))
    (tmp_path / "ghost.key").write_bytes(key_pem(key))
    with _client(fleet, (tmp_path / "ghost.crt", tmp_path / "ghost.key")) as client:
        r = client.post(f"{tls_cloud.url}/v2/models/clf/infer", json=X)
    assert r.status_code == 401
    assert "unknown device" in r.json()["error"]

    # a certificate from another CA never gets past the handshake
    other = FleetCA(tmp_path / "other-ca")
    csr, key = make_csr("dev-1")
    fleet.enroll("dev-1")
    foreign = other.issue_client(parse_csr(csr)[0], "dev-1", 1)
    (tmp_path / "foreign.crt").write_text(cert_pem(foreign))
    (tmp_path / "foreign.key").write_bytes(key_pem(key))
    with (
        _client(fleet, (tmp_path / "foreign.crt", tmp_path / "foreign.key")) as client,
        pytest.raises((httpx.ConnectError, httpx.ReadError, httpx.RemoteProtocolError)),
    ):
        client.post(f"{tls_cloud.url}/v2/models/clf/infer", json=X)
