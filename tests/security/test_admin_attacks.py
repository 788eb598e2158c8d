"""Attacks on the admin API: no token, a wrong role, a revoked token, a forged secret, a device
token. Each is refused with its exact status and message and changes nothing (no audit entry).

protection: ``server.http.deps.require_role`` (bearer parsing, ``AdminService.authenticate`` with
hashed secrets and revocation, role ordering ``viewer < operator < admin``).
"""

from __future__ import annotations

import pytest


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _state_changing_calls(client, headers: dict[str, str]) -> list:
    return [
        client.post("/api/v1/enroll-tokens", json={}, headers=headers),
        client.post("/api/v1/admin/tokens", json={"name": "x", "role": "admin"}, headers=headers),
        client.post("/api/v1/devices/dev-1/decommission", headers=headers),
    ]


def _audit_count(client, make_token) -> int:
    return len(client.get("/api/v1/audit?limit=200", headers=bearer(make_token("admin"))).json()["items"])


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer"},
        {"Authorization": "Basic YWRtaW46YWRtaW4="},
        {"Authorization": "token"},
    ],
    ids=["none", "empty-bearer", "basic", "no-scheme"],
)
def test_no_token(app_client, make_token, headers):
    before = _audit_count(app_client, make_token)
    for r in _state_changing_calls(app_client, headers):
        assert r.status_code == 401
        assert r.json()["detail"] == "missing bearer token"
        assert r.headers["www-authenticate"] == "Bearer"
    assert app_client.get("/api/v1/devices", headers=headers).status_code == 401
    assert _audit_count(app_client, make_token) == before + 1  # +1: the admin token made to count


def test_wrong_role(app_client, make_token):
    viewer, operator = make_token("viewer"), make_token("operator")
    r = app_client.post("/api/v1/enroll-tokens", json={}, headers=bearer(viewer))
    assert (r.status_code, r.json()["detail"]) == (403, "role 'viewer' may not do this (needs 'operator')")
    r = app_client.post("/api/v1/admin/tokens", json={"name": "x", "role": "admin"}, headers=bearer(operator))
    assert (r.status_code, r.json()["detail"]) == (403, "role 'operator' may not do this (needs 'admin')")
    # an operator cannot mint itself an admin token, so no token was created
    listed = app_client.get("/api/v1/admin/tokens", headers=bearer(make_token("admin"))).json()
    assert not [t for t in listed if t["name"] == "x"]


def test_revoked_token(app_client, make_token):
    admin = bearer(make_token("admin"))
    created = app_client.post(
        "/api/v1/admin/tokens", json={"name": "ci", "role": "admin"}, headers=admin
    ).json()
    assert app_client.get("/api/v1/devices", headers=bearer(created["token"])).status_code == 200
    assert app_client.delete(f"/api/v1/admin/tokens/{created['id']}", headers=admin).status_code == 200
    for r in _state_changing_calls(app_client, bearer(created["token"])):
        assert (r.status_code, r.json()["detail"]) == (401, "admin token has been revoked")


def test_forged_secret_and_device_token(app_client, make_token):
    good = make_token("admin")
    forged = good.rsplit(".", 1)[0] + ".AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"
    r = app_client.post("/api/v1/enroll-tokens", json={}, headers=bearer(forged))
    assert (r.status_code, r.json()["detail"]) == (401, "unknown admin token")
    # a device token (fd.<id>.<secret>) is not an admin token
    r = app_client.post("/api/v1/enroll-tokens", json={}, headers=bearer("fd.dev-1.c2VjcmV0"))
    assert (r.status_code, r.json()["detail"]) == (401, "malformed admin token")
