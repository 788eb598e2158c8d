"""Admin tokens, roles and the audit log."""

from __future__ import annotations


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_no_token_is_401_with_message(app_client):
    r = app_client.get("/api/v1/devices")
    assert r.status_code == 401
    assert r.json()["detail"] == "missing bearer token"
    assert r.headers["www-authenticate"] == "Bearer"


def test_malformed_and_unknown_tokens_are_401(app_client, make_token):
    good = make_token("viewer")
    assert app_client.get("/api/v1/devices", headers=bearer("nonsense")).status_code == 401
    forged = good.rsplit(".", 1)[0] + ".AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"
    r = app_client.get("/api/v1/devices", headers=bearer(forged))
    assert r.status_code == 401
    assert r.json()["detail"] == "unknown admin token"
    assert app_client.get("/api/v1/devices", headers=bearer(good)).status_code == 200


def test_roles_gate_actions(app_client, make_token):
    viewer, operator = make_token("viewer"), make_token("operator")
    r = app_client.post("/api/v1/enroll-tokens", json={}, headers=bearer(viewer))
    assert r.status_code == 403
    assert "needs 'operator'" in r.json()["detail"]
    assert app_client.post("/api/v1/enroll-tokens", json={}, headers=bearer(operator)).status_code == 201
    r = app_client.post(
        "/api/v1/admin/tokens", json={"name": "x", "role": "viewer"}, headers=bearer(operator)
    )
    assert r.status_code == 403


def test_token_lifecycle_and_audit(app_client, admin_headers):
    r = app_client.post(
        "/api/v1/admin/tokens", json={"name": "ci", "role": "operator"}, headers=admin_headers
    )
    assert r.status_code == 201, r.text
    created = r.json()
    assert created["token"].startswith(f"fa.{created['id']}.")
    ops = bearer(created["token"])
    assert app_client.get("/api/v1/devices", headers=ops).status_code == 200
    listed = app_client.get("/api/v1/admin/tokens", headers=admin_headers).json()
    assert created["id"] in {t["id"] for t in listed}
    assert all("token" not in t and "secret_hash" not in t for t in listed)

    r = app_client.delete(f"/api/v1/admin/tokens/{created['id']}", headers=admin_headers)
    assert r.status_code == 200
    assert r.json()["revoked_at"]
    r = app_client.get("/api/v1/devices", headers=ops)
    assert r.status_code == 401
    assert r.json()["detail"] == "admin token has been revoked"

    audit = app_client.get("/api/v1/audit", headers=admin_headers).json()["items"]
    actions = [(e["action"], e["target_id"]) for e in audit]
    assert ("token.create", created["id"]) in actions
    assert ("token.revoke", created["id"]) in actions


def test_bad_role_is_422(app_client, admin_headers):
    r = app_client.post("/api/v1/admin/tokens", json={"name": "x", "role": "root"}, headers=admin_headers)
    assert r.status_code == 422


def test_audit_pagination(app_client, admin_headers):
    for i in range(5):
        app_client.post("/api/v1/enroll-tokens", json={"tags": {"n": str(i)}}, headers=admin_headers)
    page1 = app_client.get("/api/v1/audit?limit=2&action=enroll_token.create", headers=admin_headers).json()
    page2 = app_client.get(
        f"/api/v1/audit?limit=2&action=enroll_token.create&cursor={page1['next_cursor']}",
        headers=admin_headers,
    ).json()
    ids = [e["id"] for e in page1["items"] + page2["items"]]
    assert len(ids) == 4
    assert ids == sorted(ids, reverse=True)
    assert app_client.get("/api/v1/audit?cursor=abc", headers=admin_headers).status_code == 422


def test_audit_cursor_out_of_range_or_not_numeric_is_422(app_client, admin_headers):
    # regression: int(cursor) let 10**23 through to SQLite (OverflowError, a 500), and accepted
    # "-5", "1_000" and non-ASCII digits
    for bad in ("99999999999999999999999", str(2**63), "0", "-5", "+5", "1_000", "\u0661", "abc", " 7"):
        r = app_client.get("/api/v1/audit", params={"cursor": bad}, headers=admin_headers)
        assert r.status_code == 422, (bad, r.status_code, r.text)
        body = r.json()
        assert body["code"] == "invalid"
        assert "malformed audit cursor" in body["detail"]
        assert "between 1 and 9223372036854775807" in body["detail"]
    r = app_client.get("/api/v1/audit", params={"cursor": str(2**63 - 1)}, headers=admin_headers)
    assert r.status_code == 200
    assert r.json()["items"]  # every id is below the largest cursor


def test_integer_query_parameters_are_bounded(app_client, admin_headers):
    """Every integer query parameter refuses huge values with a 4xx, never a 500."""
    huge = "99999999999999999999999"
    for url in (
        f"/api/v1/audit?limit={huge}",
        f"/api/v1/rollouts?limit={huge}",
        f"/api/v1/devices?limit={huge}",
        f"/api/v1/devices?cursor={huge}",
        f"/api/v1/devices/nope/events?limit={huge}",
        "/api/v1/rollouts?limit=0",
    ):
        r = app_client.get(url, headers=admin_headers)
        assert r.status_code == 422, (url, r.status_code, r.text)
