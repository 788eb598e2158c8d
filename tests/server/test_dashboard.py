"""The dashboard at /ui through the TestClient: sign-in with a bearer token (cookie flags,
revoked/expired tokens refused), CSRF checks, roles, pages rendered from the simulated ``lab``
fleet, the rollout's health series (API and chart data) and the 404 page."""

from __future__ import annotations

import html
import re
from datetime import timedelta

import pytest

from server.admin.tables import AdminToken
from server.db import utcnow
from server.rollouts.engine import RolloutEngine
from server.rollouts.tables import Deployment
from tests.helpers.dashboard import CSRF, login, signed_in
from tests.helpers.fleet_sim import Behaviour
from tests.helpers.rollout_lab import drive, rollout_body


def start_rollout(client, headers, **over) -> str:
    r = client.post("/api/v1/rollouts", json=rollout_body("2.0.0", **over), headers=headers)
    assert r.status_code == 201, r.text
    return r.json()["id"]


def test_login_sets_a_strict_httponly_cookie_and_logout_clears_it(app_client, make_token):
    r = login(app_client, make_token("viewer"))
    assert r.status_code == 303
    assert r.headers["location"] == "/ui/"
    cookie = r.headers["set-cookie"]
    assert "fleet_ui=" in cookie
    assert "HttpOnly" in cookie
    assert "SameSite=strict" in cookie
    assert "Path=/ui" in cookie
    assert "Secure" not in cookie  # plain HTTP here; Secure over HTTPS (next test)
    assert "token" not in r.headers["location"]
    csrf = CSRF.search(app_client.get("/ui/").text).group(1)
    out = app_client.post("/ui/logout", data={"csrf": csrf}, follow_redirects=False)
    assert out.status_code == 303
    assert 'fleet_ui=""' in out.headers["set-cookie"] or "Max-Age=0" in out.headers["set-cookie"]
    assert app_client.get("/ui/", follow_redirects=False).status_code == 303


def test_pages_forbid_framing_and_foreign_scripts(app_client, make_token):
    for r in (app_client.get("/ui/login"), login(app_client, make_token("viewer")), app_client.get("/ui/")):
        assert r.headers["x-frame-options"] == "DENY"
        csp = r.headers["content-security-policy"]
        assert "frame-ancestors 'none'" in csp
        assert "default-src 'self'" in csp
        assert r.headers["cache-control"] == "no-store"


def test_cookie_is_secure_over_https(app_client, make_token):
    form = app_client.get("https://testserver/ui/login")
    assert "Secure" in form.headers["set-cookie"]  # the login form's pre-session cookie too
    r = login(app_client, make_token("viewer"), base="https://testserver")
    assert r.status_code == 303
    session = next(c for c in r.headers.get_list("set-cookie") if c.startswith("fleet_ui="))
    assert "Secure" in session


def test_login_form_needs_its_double_submit_token(app_client, make_token):
    """Another site cannot sign a browser in to the attacker's token: its forged POST carries
    neither the form's token nor (SameSite=Strict) the pre-session cookie."""
    token = make_token("operator")
    form = app_client.get("/ui/login")
    cookie = form.headers["set-cookie"]
    for flag in ("fleet_login=", "HttpOnly", "SameSite=strict", "Path=/ui/login", "Max-Age=600"):
        assert flag in cookie, flag
    value = CSRF.search(form.text).group(1)
    assert app_client.cookies.get("fleet_login") == value
    forged = ({"token": token}, {"token": token, "csrf": "0" * 64})
    for data in forged:
        r = app_client.post("/ui/login", data=data, follow_redirects=False)
        assert r.status_code == 403, data
        assert "fleet_ui=" not in r.headers.get("set-cookie", "")
        assert "sign-in form" in r.text
    app_client.cookies.delete("fleet_login")  # a cross-site POST: the field, but not the cookie
    r = app_client.post("/ui/login", data={"token": token, "csrf": value}, follow_redirects=False)
    assert r.status_code == 403
    assert "fleet_ui=" not in r.headers.get("set-cookie", "")
    assert app_client.get("/ui/", follow_redirects=False).status_code == 303  # not signed in
    r = login(app_client, token)
    assert r.status_code == 303
    cookies = r.headers.get_list("set-cookie")
    assert any(c.startswith("fleet_ui=") for c in cookies)
    assert any(c.startswith("fleet_login=") and "Max-Age=0" in c for c in cookies)  # used up
    assert app_client.get("/ui/").status_code == 200


def test_pages_redirect_to_login_without_a_cookie(app_client):
    r = app_client.get("/ui/rollouts", follow_redirects=False)
    assert r.status_code == 303
    assert r.headers["location"].startswith("/ui/login?next=%2Fui%2Frollouts")
    assert app_client.get("/ui/rollouts/x/live", headers={"X-Fleet-Poll": "1"}).status_code == 401


def test_login_refuses_revoked_expired_and_unknown_tokens(app_client, make_token, ctx):
    revoked, expired = make_token("operator"), make_token("viewer")
    with ctx.db.session_scope() as s:  # tokens are ``fa.<id>.<secret>``
        s.get(AdminToken, revoked.split(".")[1]).revoked_at = utcnow()
        s.get(AdminToken, expired.split(".")[1]).expires_at = utcnow() - timedelta(seconds=1)
    for token, words in ((revoked, "revoked"), (expired, "expired"), ("fa.nope.nope", "")):
        r = login(app_client, token)
        assert r.status_code == 401, token
        assert "fleet_ui=" not in r.headers.get("set-cookie", "")  # no session
        assert words in r.text
        assert app_client.get("/ui/", follow_redirects=False).status_code == 303


def test_a_token_revoked_after_login_signs_the_browser_out(app_client, make_token, ctx):
    token = make_token("operator")
    signed_in(app_client, token)
    with ctx.db.session_scope() as s:
        s.get(AdminToken, token.split(".")[1]).revoked_at = utcnow()
    r = app_client.get("/ui/", follow_redirects=False)
    assert r.status_code == 303
    assert "revoked" in r.headers["location"]


def test_login_never_redirects_off_the_dashboard(app_client, make_token):
    r = login(app_client, make_token("viewer"), next="https://evil.example/")
    assert r.headers["location"] == "/ui/"


def test_actions_need_the_csrf_token(app_client, admin_headers, make_token, lab):
    rid = start_rollout(app_client, admin_headers)
    csrf = signed_in(app_client, make_token("operator"))
    for data in ({}, {"csrf": "0" * 64}):
        r = app_client.post(f"/ui/rollouts/{rid}/pause", data=data, follow_redirects=False)
        assert r.status_code == 403, data
        assert "CSRF" in r.text
    assert app_client.get(f"/api/v1/rollouts/{rid}", headers=admin_headers).json()["status"] == "running"
    assert app_client.post("/ui/logout", data={}).status_code == 403
    r = app_client.post(f"/ui/rollouts/{rid}/pause", data={"csrf": csrf}, follow_redirects=False)
    assert r.status_code == 303
    assert app_client.get(f"/api/v1/rollouts/{rid}", headers=admin_headers).json()["status"] == "paused"
    page = app_client.get(f"/ui/rollouts/{rid}").text
    assert 'id="act-resume"' in page
    assert 'id="act-pause"' not in page
    app_client.post(f"/ui/rollouts/{rid}/resume", data={"csrf": csrf})
    assert app_client.get(f"/api/v1/rollouts/{rid}", headers=admin_headers).json()["status"] == "running"


def test_viewer_sees_no_buttons_and_is_refused(app_client, admin_headers, make_token, lab):
    rid = start_rollout(app_client, admin_headers)
    csrf = signed_in(app_client, make_token("viewer"))
    page = app_client.get(f"/ui/rollouts/{rid}")
    assert page.status_code == 200
    assert "act-pause" not in page.text
    assert 'id="actions"' not in page.text
    r = app_client.post(f"/ui/rollouts/{rid}/pause", data={"csrf": csrf}, follow_redirects=False)
    assert r.status_code == 403
    assert "viewer" in r.text
    assert app_client.get(f"/api/v1/rollouts/{rid}", headers=admin_headers).json()["status"] == "running"


def test_a_cloud_token_cannot_sign_in(app_client, make_token):
    assert login(app_client, make_token("cloud")).status_code == 401


def test_pages_show_the_fleet_and_a_rolled_back_rollout(app_client, admin_headers, make_token, ctx, lab):
    lab.behaviours["2.0.0"] = Behaviour(error_rate=0.3)
    rid = start_rollout(app_client, admin_headers)
    final = drive(RolloutEngine(ctx), lab, app_client, admin_headers, rid)
    assert final["status"] == "rolled_back"
    signed_in(app_client, make_token("viewer"))
    overview = app_client.get("/ui/").text
    assert re.search(r"online</span></td><td class=\"num\">10<", overview), overview
    assert "det 1.0.0" in overview
    assert "rolled_back" in overview or "failed" in overview  # recent failures
    page = html.unescape(app_client.get(f"/ui/rollouts/{rid}").text)
    assert final["reason"] in page
    assert "Gate verdict" in page
    assert 'data-health="/ui/rollouts/' in page
    assert rid in app_client.get("/ui/rollouts").text
    # the rollout's devices, filtered by phase, with the reason of each
    for phase, n in final["phases"].items():
        listed = app_client.get(f"/ui/rollouts/{rid}?phase={phase}").text
        rows = re.findall(r'<span class="badge p-(\w+)">', listed.split('id="devices"')[1])
        assert rows == [phase] * n, (phase, rows)
    with ctx.db.session_scope() as s:
        reasons = {d.reason for d in s.query(Deployment).filter_by(rollout_id=rid) if d.reason}
    assert reasons
    listed = html.unescape(app_client.get(f"/ui/rollouts/{rid}").text)
    assert all(why in listed for why in reasons)
    assert app_client.get(f"/ui/rollouts/{rid}?phase=lost").status_code == 422
    phase, n = next(iter(final["phases"].items()))
    members = app_client.get(f"/ui/rollouts/{rid}/members?phase={phase}")  # the polled partial
    assert "<html" not in members.text
    assert members.text.count(f'<span class="badge p-{phase}">') == n
    live = app_client.get(f"/ui/rollouts/{rid}/live")
    assert live.status_code == 200
    assert "<html" not in live.text
    assert "rolled_back" in live.text
    devices = app_client.get("/ui/devices?tag=site:lab&limit=4")
    assert devices.text.count('href="/ui/devices/lab-') == 4
    nxt = re.search(r'href="(/ui/devices\?[^"]+)" id="next-page"', devices.text).group(1)
    second = app_client.get(nxt.replace("&amp;", "&")).text
    assert "lab-04" in second
    assert "lab-00" not in second
    device = app_client.get("/ui/devices/lab-00")
    assert device.status_code == 200
    assert "Signed desired state" in device.text
    assert 'data-health="/ui/devices/lab-00/health.json"' in device.text
    health = app_client.get("/ui/devices/lab-00/health.json").json()
    assert health["model"] == "det"
    by_version = {s["version"]: sum(p["requests"] for p in s["points"]) for s in health["series"]}
    assert by_version.get("1.0.0", 0) > 0  # the baseline windows before the rollout
    assert app_client.get("/ui/devices/nope/health.json").status_code == 404


def test_rollout_health_series(app_client, admin_headers, make_token, ctx, lab):
    rid = start_rollout(app_client, admin_headers)
    drive(RolloutEngine(ctx), lab, app_client, admin_headers, rid)
    r = app_client.get(f"/api/v1/rollouts/{rid}/health", headers=admin_headers)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["version"] == "2.0.0"
    versions = {s["version"] for s in body["series"]}
    assert {"1.0.0", "2.0.0"} <= versions
    new = next(s for s in body["series"] if s["version"] == "2.0.0" and s["mode"] == "serve")
    assert sum(p["requests"] for p in new["points"]) > 0
    assert body["baseline"]["error_rate"] is not None
    assert app_client.get(f"/api/v1/rollouts/{rid}/health").status_code == 401
    assert app_client.get("/api/v1/rollouts/nope/health", headers=admin_headers).status_code == 404
    signed_in(app_client, make_token("viewer"))
    assert app_client.get(f"/ui/rollouts/{rid}/health.json").json() == body


@pytest.mark.parametrize("path", ["/ui/rollouts/nope", "/ui/devices/nope", "/ui/no/such/page"])
def test_unknown_ids_render_the_404_page(app_client, make_token, path):
    signed_in(app_client, make_token("viewer"))
    r = app_client.get(path)
    assert r.status_code == 404
    assert "Not found" in r.text
    assert "text/html" in r.headers["content-type"]


def test_bad_filters_are_a_clear_422(app_client, make_token):
    signed_in(app_client, make_token("viewer"))
    r = app_client.get("/ui/devices?status=lost")
    assert r.status_code == 422
    assert "lost" in r.text
    assert app_client.get("/ui/devices?tag=nocolon").status_code == 422


def test_static_files_are_served(app_client):
    assert "uPlot" in app_client.get("/ui/static/vendor/uPlot.iife.min.js").text
    assert app_client.get("/ui/static/app.js").status_code == 200


def test_a_device_reported_reason_is_escaped(app_client, admin_headers, make_token, ctx, lab):
    """Failure reasons come from devices: a compromised one must not script the operator's page."""
    rid = start_rollout(app_client, admin_headers)
    evil = '<img src=x onerror="alert(1)">'
    with ctx.db.session_scope() as s:
        for d in s.query(Deployment).filter_by(rollout_id=rid):
            d.reason = evil
    signed_in(app_client, make_token("viewer"))
    for url in (f"/ui/rollouts/{rid}", f"/ui/rollouts/{rid}/members"):
        text = app_client.get(url).text
        assert evil not in text
        assert "&lt;img src=x onerror=" in text
