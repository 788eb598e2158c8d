"""Enrollment and the device registry through the API."""

from __future__ import annotations

from datetime import timedelta

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from server.db import utcnow
from server.devices.service import DeviceService
from server.devices.tables import EnrollmentToken
from server.errors import Forbidden
from tests.helpers.pki import HARDWARE, make_csr, make_key


def enroll_token(client, headers, **body) -> str:
    r = client.post("/api/v1/enroll-tokens", json=body, headers=headers)
    assert r.status_code == 201, r.text
    return r.json()["token"]


def actor_of(headers: dict[str, str]) -> str:
    """The audit actor of an admin bearer token (``token:<id>``)."""
    return f"token:{headers['Authorization'].split('.')[1]}"


def enroll(client, token: str, cn: str | None, key=None, **kw):
    csr, _ = make_csr(cn, key, **kw)
    return client.post("/api/v1/enroll", json={"token": token, "csr_pem": csr, "hardware": HARDWARE})


def test_enroll_issues_client_certificate(app_client, admin_headers, ctx):
    token = enroll_token(app_client, admin_headers, tags={"site": "berlin"})
    r = enroll(app_client, token, "cam-001")
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["device_id"] == "cam-001"
    cert = x509.load_pem_x509_certificate(body["certificate_pem"].encode())
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "cam-001"
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    ca = x509.load_pem_x509_certificate(body["ca_certificate_pem"].encode())
    cert.verify_directly_issued_by(ca)
    assert body["tuf_root"]["signed"]["_type"] == "root"
    assert body["director_public_key_pem"].startswith("-----BEGIN PUBLIC KEY-----")
    assert body["device_token"].startswith("fd.cam-001.")
    assert body["mqtt"]["tls"] is True
    assert body["tuf_metadata_url"] == "http://testserver/tuf/metadata/"

    device = app_client.get("/api/v1/devices/cam-001", headers=admin_headers).json()
    assert device["status"] == "enrolled"
    assert device["tags"] == {"site": "berlin"}
    assert device["hardware"]["onnxruntime_version"] == "1.32.0"
    audit = app_client.get("/api/v1/audit?action=device.enroll", headers=admin_headers).json()["items"]
    assert [e["target_id"] for e in audit] == ["cam-001"]


def test_reused_bad_and_expired_tokens_are_refused(app_client, admin_headers, ctx):
    token = enroll_token(app_client, admin_headers)
    assert enroll(app_client, token, "dev-a").status_code == 201
    r = enroll(app_client, token, "dev-b")
    assert r.status_code == 403
    assert r.json()["detail"] == "enrollment token has already been used"

    r = enroll(app_client, "fe.nothere.AAAAAAAAAAAAAAAAAAAAAAAA", "dev-c")
    assert (r.status_code, r.json()["detail"]) == (401, "unknown enrollment token")
    r = enroll(app_client, "not-a-token-at-all", "dev-c")
    assert (r.status_code, r.json()["detail"]) == (401, "malformed enrollment token")

    expiring = enroll_token(app_client, admin_headers)
    with ctx.db.session_scope() as s:
        row = s.get(EnrollmentToken, expiring.split(".")[1])
        row.expires_at = utcnow() - timedelta(seconds=1)
    r = enroll(app_client, expiring, "dev-d")
    assert (r.status_code, r.json()["detail"]) == (403, "enrollment token has expired")

    revoked = enroll_token(app_client, admin_headers)
    revoked_id = revoked.split(".")[1]
    assert app_client.delete(f"/api/v1/enroll-tokens/{revoked_id}", headers=admin_headers).status_code == 200
    r = enroll(app_client, revoked, "dev-e")
    assert (r.status_code, r.json()["detail"]) == (403, "enrollment token has been revoked")
    # the revocation is audited once: revoking it again changes nothing and writes no second row
    assert app_client.delete(f"/api/v1/enroll-tokens/{revoked_id}", headers=admin_headers).status_code == 200
    audit = app_client.get("/api/v1/audit?action=enroll_token.revoke", headers=admin_headers).json()["items"]
    assert [(e["target_type"], e["target_id"], e["actor"]) for e in audit] == [
        ("enroll_token", revoked_id, actor_of(admin_headers))
    ]
    devices = app_client.get("/api/v1/devices", headers=admin_headers).json()["items"]
    assert [d["id"] for d in devices] == ["dev-a"]


@pytest.mark.parametrize(
    ("tags", "message"),
    [
        ({"Site": "berlin"}, "invalid tag key 'Site'"),  # keys are lowercase
        ({"_site": "berlin"}, "invalid tag key '_site'"),  # and start with a letter or digit
        ({"k" * 64: "v"}, "max 63"),
        ({"site": ""}, "invalid tag value '' for 'site'"),
        ({"site": "new york"}, "invalid tag value 'new york'"),
        ({"site": "v" * 129}, "max 128"),
        ({f"k{i}": "v" for i in range(33)}, "at most 32 tags"),
    ],
)
def test_bad_tags_on_an_enrollment_token_are_422_and_create_nothing(app_client, admin_headers, tags, message):
    r = app_client.post("/api/v1/enroll-tokens", json={"tags": tags}, headers=admin_headers)
    assert r.status_code == 422, r.text
    assert [(e["loc"], message in e["msg"]) for e in r.json()["detail"]] == [(["body", "tags"], True)], r.text
    assert app_client.get("/api/v1/enroll-tokens", headers=admin_headers).json() == []
    audit = app_client.get("/api/v1/audit?action=enroll_token.create", headers=admin_headers).json()["items"]
    assert audit == []
    # the limits themselves are accepted
    limits = {"k" * 63: "v" * 128, "0.a_b-c": "A1_.:/-z"}
    assert enroll_token(app_client, admin_headers, tags=limits)


def test_multi_use_token(app_client, admin_headers):
    token = enroll_token(app_client, admin_headers, uses=2)
    assert enroll(app_client, token, "m-1").status_code == 201
    assert enroll(app_client, token, "m-2").status_code == 201
    assert enroll(app_client, token, "m-3").status_code == 403


@pytest.mark.parametrize(
    ("cn", "key_kind", "message"),
    [
        ("Bad_Name", "ec256", "not a valid device id"),
        ("a+b", "ec256", "not a valid device id"),
        ("dev#1", "ec256", "not a valid device id"),
        ("-lead", "ec256", "not a valid device id"),
        ("x" * 64, "ec256", "not a valid device id"),
        (None, "ec256", "exactly one CN"),
        ("ok-name", "rsa1024", "too small"),
        ("ok-name", "ec521", "not accepted"),
    ],
)
def test_unacceptable_csr_is_422_and_keeps_token(app_client, admin_headers, cn, key_kind, message):
    token = enroll_token(app_client, admin_headers)
    r = enroll(app_client, token, cn, make_key(key_kind))
    assert r.status_code == 422, r.text
    assert message in r.json()["detail"]
    # nothing was consumed: the same token still enrolls a good CSR
    assert enroll(app_client, token, "good-one").status_code == 201


def test_garbage_csr_and_duplicate_device(app_client, admin_headers):
    token = enroll_token(app_client, admin_headers, uses=3)
    r = app_client.post("/api/v1/enroll", json={"token": token, "csr_pem": "x" * 100, "hardware": HARDWARE})
    assert r.status_code == 422
    assert "CSR is not a PEM" in r.json()["detail"]
    assert enroll(app_client, token, "twin").status_code == 201
    r = enroll(app_client, token, "twin")
    assert r.status_code == 409
    assert "already enrolled" in r.json()["detail"]
    r = enroll(app_client, token, "twin", extra_cn="second")
    assert r.status_code == 422


def test_list_filters_and_cursor_pagination(app_client, admin_headers):
    berlin = enroll_token(app_client, admin_headers, tags={"site": "berlin", "line": "a"}, uses=5)
    paris = enroll_token(app_client, admin_headers, tags={"site": "paris"}, uses=5)
    for i in range(5):
        assert enroll(app_client, berlin, f"b-{i}").status_code == 201
    for i in range(3):
        assert enroll(app_client, paris, f"p-{i}").status_code == 201

    def ids(query: str) -> list[str]:
        r = app_client.get(f"/api/v1/devices?{query}", headers=admin_headers)
        assert r.status_code == 200, r.text
        return [d["id"] for d in r.json()["items"]]

    assert ids("tag=site:berlin") == [f"b-{i}" for i in range(5)]
    assert ids("tag=site=paris") == ["p-0", "p-1", "p-2"]
    assert ids("tag=site:berlin&tag=line:a") == [f"b-{i}" for i in range(5)]
    assert ids("tag=site:paris&tag=line:a") == []
    assert ids("status=enrolled&arch=x86_64&limit=1000") == sorted(
        [f"b-{i}" for i in range(5)] + ["p-0", "p-1", "p-2"]
    )
    assert ids("status=online") == []

    seen, cursor = [], None
    while True:
        r = app_client.get(
            "/api/v1/devices",
            params={"limit": 3, **({"cursor": cursor} if cursor else {})},
            headers=admin_headers,
        ).json()
        seen += [d["id"] for d in r["items"]]
        cursor = r["next_cursor"]
        if not cursor:
            break
    assert seen == sorted(seen)
    assert len(seen) == 8

    for bad in ("tag=nocolon", "tag=Bad Key:x", "tag=k:", "status=sleeping", "cursor=%%%", "limit=0"):
        r = app_client.get(f"/api/v1/devices?{bad}", headers=admin_headers)
        assert r.status_code == 422, bad


def test_status_filter_follows_presence_from_the_ingest_path(app_client, admin_headers, ctx):
    """``status=online``/``offline`` list what the devices' MQTT presence made them (the ingest
    worker's real write path: parse, batch, one transaction), combined with the other filters."""
    from device_client.protocol import Presence
    from server.mqtt.handlers import IngestWorker

    berlin = enroll_token(app_client, admin_headers, tags={"site": "berlin"}, uses=3)
    paris = enroll_token(app_client, admin_headers, tags={"site": "paris"}, uses=2)
    for device_id in ("b-0", "b-1", "b-2"):
        assert enroll(app_client, berlin, device_id).status_code == 201
    for device_id in ("p-0", "p-1"):
        assert enroll(app_client, paris, device_id).status_code == 201

    def ids(query: str) -> list[str]:
        r = app_client.get(f"/api/v1/devices?{query}", headers=admin_headers)
        assert r.status_code == 200, r.text
        return [d["id"] for d in r.json()["items"]]

    assert ids("status=online") == []
    now = utcnow()
    presence = [("b-1", "online"), ("p-0", "online"), ("b-2", "online"), ("b-2", "offline")]
    messages = [
        (f"fleet/v1/d/{d}/presence", Presence.build(device_id=d, status=st, at=now).to_json(), now)
        for d, st in presence
    ]
    assert IngestWorker(ctx, ctx.metrics).process(messages)

    assert ids("status=online") == ["b-1", "p-0"]
    assert ids("status=online&tag=site:paris") == ["p-0"]
    assert ids("status=offline") == ["b-2"]  # the last presence of the batch wins
    assert ids("status=enrolled") == ["b-0", "p-1"]
    one = app_client.get("/api/v1/devices/b-1", headers=admin_headers).json()
    assert (one["status"], one["last_seen_at"] is not None) == ("online", True)


def test_tag_and_decommission(app_client, admin_headers, ctx):
    token = enroll_token(app_client, admin_headers, tags={"site": "berlin"})
    body = enroll(app_client, token, "retire-me").json()
    r = app_client.patch(
        "/api/v1/devices/retire-me/tags",
        json={"set": {"ring": "canary"}, "remove": ["site"]},
        headers=admin_headers,
    )
    assert r.status_code == 200
    assert r.json()["tags"] == {"ring": "canary"}
    r = app_client.patch("/api/v1/devices/retire-me/tags", json={"set": {"BAD": "x"}}, headers=admin_headers)
    assert r.status_code == 422
    assert app_client.patch("/api/v1/devices/nobody/tags", json={}, headers=admin_headers).status_code == 404
    # the change is audited with what was set and removed; the refused ones left no row
    audit = app_client.get("/api/v1/audit?action=device.tag", headers=admin_headers).json()["items"]
    assert [(e["target_type"], e["target_id"], e["actor"], e["details"]) for e in audit] == [
        ("device", "retire-me", actor_of(admin_headers), {"set": {"ring": "canary"}, "remove": ["site"]})
    ]

    with ctx.db.session_scope() as s:
        assert DeviceService(s, ctx).authenticate_device(body["device_token"]).id == "retire-me"

    r = app_client.post("/api/v1/devices/retire-me/decommission", headers=admin_headers)
    assert r.status_code == 200
    assert r.json()["status"] == "decommissioned"
    serial = int(r.json()["cert_serial"], 16)
    crl = x509.load_pem_x509_crl(app_client.get("/api/v1/pki/crl.pem").content)
    assert crl.get_revoked_certificate_by_serial_number(serial) is not None
    on_disk = x509.load_pem_x509_crl((ctx.settings.broker_dir / "crl.pem").read_bytes())
    assert on_disk.get_revoked_certificate_by_serial_number(serial) is not None
    with ctx.db.session_scope() as s, pytest.raises(Forbidden):
        DeviceService(s, ctx).authenticate_device(body["device_token"])
    # a decommissioned id cannot be re-enrolled
    assert enroll(app_client, enroll_token(app_client, admin_headers), "retire-me").status_code == 409


#: a CSR on secp112r1, made with `openssl ecparam -name secp112r1 -genkey` + `openssl req -new
#: -subj /CN=weird-1`: cryptography parses it but cannot use the key (UnsupportedAlgorithm)
SECP112R1_CSR = """-----BEGIN CERTIFICATE REQUEST-----
MIGCME0CAQAwEjEQMA4GA1UEAwwHd2VpcmQtMTAyMBAGByqGSM49AgEGBSuBBAAG
Ax4ABLgHjlST37eVugch2WXEZCow0awLYlBBxD0st7igADAKBggqhkjOPQQDAgMl
ADAiAg8Arn9I+0j7496MhnQSQa0CDwCZTsn6z/LAIwaf17fxIw==
-----END CERTIFICATE REQUEST-----
"""


def test_csr_on_an_unsupported_curve_is_422_not_500(app_client, admin_headers):
    # the token is checked before the CSR: without a valid one the CSR is never looked at
    r = app_client.post(
        "/api/v1/enroll",
        json={"token": "fe.nothere.AAAAAAAAAAAAAAAAAAAAAAAA", "csr_pem": SECP112R1_CSR, "hardware": HARDWARE},
    )
    assert (r.status_code, r.json()["detail"]) == (401, "unknown enrollment token")
    token = enroll_token(app_client, admin_headers, uses=2)
    body = {"token": token, "csr_pem": SECP112R1_CSR, "hardware": HARDWARE}
    r = app_client.post("/api/v1/enroll", json=body)
    assert r.status_code == 422, r.text
    assert r.json()["code"] == "invalid"
    assert "CSR public key is not supported" in r.json()["detail"]
    r = app_client.post(
        "/api/v1/enroll/bulk",
        json={"token": token, "devices": [
            {"csr_pem": make_csr("fine-1")[0], "hardware": HARDWARE},
            {"csr_pem": SECP112R1_CSR, "hardware": HARDWARE},
        ]},
        headers=admin_headers,
    )  # fmt: skip
    assert r.status_code == 422, r.text
    assert "CSR public key is not supported" in r.json()["detail"]
    assert enroll(app_client, token, "good-one").status_code == 201  # the token was not consumed
    assert enroll(app_client, token, "good-two").status_code == 201


def test_parse_csr_maps_unusable_keys_to_invalid(monkeypatch):
    from cryptography.exceptions import UnsupportedAlgorithm

    from server.errors import Invalid
    from server.trust import pki

    csr_pem, _ = make_csr("dev-x")
    real = x509.load_pem_x509_csr

    class Lazy:
        """A CSR whose signature verifies but whose key or subject cryptography cannot parse."""

        def __init__(self, fail: str, exc: Exception) -> None:
            self._csr, self._fail, self._exc = real(csr_pem.encode()), fail, exc

        @property
        def is_signature_valid(self) -> bool:
            return self._csr.is_signature_valid

        def public_key(self):
            if self._fail == "key":
                raise self._exc
            return self._csr.public_key()

        @property
        def subject(self):
            if self._fail == "subject":
                raise self._exc
            return self._csr.subject

    for fail, exc, message in [
        ("key", UnsupportedAlgorithm("no such curve"), "CSR public key is not supported"),
        ("key", ValueError("bad point"), "CSR public key is not supported"),
        ("subject", ValueError("bad string"), "CSR subject cannot be parsed"),
    ]:
        monkeypatch.setattr(pki.x509, "load_pem_x509_csr", lambda _b, f=fail, e=exc: Lazy(f, e))
        with pytest.raises(Invalid, match=message):
            pki.parse_csr(csr_pem)


def test_concurrent_enrollments_of_one_device_id_end_in_409(app_client, admin_headers, ctx, monkeypatch):
    """Two enrollments of one id both pass the existence check before either commits; the
    primary key refuses the second: a 409 like the sequential case, not a 500 IntegrityError."""
    from server.devices.repository import DeviceRepository
    from server.devices.tables import Device

    token = enroll_token(app_client, admin_headers, uses=4)
    assert enroll(app_client, token, "twin").status_code == 201
    # the other enrollment's row is committed after our check: what the race looks like here
    monkeypatch.setattr(DeviceRepository, "exists", lambda self, device_id: False)
    monkeypatch.setattr(DeviceRepository, "existing", lambda self, device_ids: set())
    r = enroll(app_client, token, "twin")
    assert r.status_code == 409, r.text
    assert "already enrolled" in r.json()["detail"]
    r = app_client.post(
        "/api/v1/enroll/bulk",
        json={"token": token, "devices": [{"csr_pem": make_csr(d)[0], "hardware": HARDWARE}
                                          for d in ("solo", "twin")]},
        headers=admin_headers,
    )  # fmt: skip
    assert r.status_code == 409, r.text
    assert "concurrently" in r.json()["detail"]
    with ctx.db.session_scope() as s:  # nothing of the refused enrollments stayed, uses included
        assert s.get(Device, "solo") is None
        assert s.get(EnrollmentToken, token.split(".")[1]).uses_left == 3
