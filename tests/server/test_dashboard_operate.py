"""Dashboard pages for operators: starting a rollout from the form (the API's 422 message shown,
nothing created), the audit log (operator and up) and the model catalog."""

from __future__ import annotations

import html
import re

import pytest

from server.rollouts.tables import Rollout
from tests.helpers.dashboard import signed_in

STAGES = '[{"percent": 50, "soak_s": 0}, {"percent": 100, "soak_s": 0}]'


def form(csrf: str, **over) -> dict[str, str]:
    data = {"csrf": csrf, "model": "det", "version": "2.0.0", "tags": "site:lab", "stages": STAGES,
            "gates": '{"max_error_rate": 0.05}', "on_failure": "rollback"}  # fmt: skip
    data.update(over)
    return data


def rollouts_in_db(ctx) -> int:
    with ctx.db.session_scope() as s:
        return s.query(Rollout).count()


def test_an_operator_starts_a_rollout_from_the_form(app_client, admin_headers, make_token, lab):
    csrf = signed_in(app_client, make_token("operator"))
    assert 'id="new-rollout"' in app_client.get("/ui/rollouts").text
    assert app_client.get("/ui/rollouts/new").status_code == 200
    r = app_client.post("/ui/rollouts/new", data=form(csrf), follow_redirects=False)
    assert r.status_code == 303, r.text
    rid = r.headers["location"].rsplit("/", 1)[1]
    state = app_client.get(f"/api/v1/rollouts/{rid}", headers=admin_headers).json()
    assert state["status"] == "running"
    assert state["devices"] == 10
    assert state["on_failure"] == "rollback"
    assert [s["percent"] for s in state["stages"]] == [50, 100]


@pytest.mark.parametrize(
    ("over", "message"),
    [
        ({"stages": "[]"}, "stages: List should have at least 1 item"),
        ({"stages": '[{"percent": 150}]'}, "stages.0.percent: Input should be less than or equal to 100"),
        ({"stages": "[{"}, "stages: not JSON"),
        ({"gates": "[" * 5000}, "gates: not JSON (nested too deeply)"),
        ({"gates": '{"max_error_rate": 2}'}, "gates.max_error_rate: Input should be less than or equal to 1"),
        ({"gates": '{"nope": 1}'}, "gates.nope: Extra inputs are not permitted"),
        ({"version": "9.9.9"}, "9.9.9"),
        ({"tags": "nocolon"}, "expected key:value"),
    ],
)
def test_a_bad_rollout_form_shows_the_message_and_creates_nothing(
    app_client, ctx, make_token, lab, over, message
):
    csrf = signed_in(app_client, make_token("operator"))
    r = app_client.post("/ui/rollouts/new", data=form(csrf, **over), follow_redirects=False)
    assert r.status_code in (404, 422), r.text
    text = html.unescape(r.text)
    assert message in re.search(r'id="form-error">([^<]*)<', text).group(1)
    assert over[next(iter(over))] in text  # the form keeps what was typed
    assert rollouts_in_db(ctx) == 0


def test_the_rollout_form_is_for_operators_with_a_csrf_token(app_client, ctx, make_token, lab):
    csrf = signed_in(app_client, make_token("operator"))
    assert app_client.post("/ui/rollouts/new", data=form("")).status_code == 403
    viewer = signed_in(app_client, make_token("viewer"))
    assert 'id="new-rollout"' not in app_client.get("/ui/rollouts").text
    assert app_client.get("/ui/rollouts/new").status_code == 403
    assert app_client.post("/ui/rollouts/new", data=form(viewer)).status_code == 403
    assert rollouts_in_db(ctx) == 0
    assert csrf != viewer


def test_audit_log_for_operators_only(app_client, admin_headers, make_token, lab):
    r = app_client.post(
        "/api/v1/rollouts",
        json={"model": "det", "version": "2.0.0", "selector": {"tags": {"site": "lab"}},
              "stages": [{"percent": 100, "soak_s": 0}]},
        headers=admin_headers,
    )  # fmt: skip
    rid = r.json()["id"]
    signed_in(app_client, make_token("viewer"))
    assert app_client.get("/ui/audit").status_code == 403
    signed_in(app_client, make_token("operator"))
    page = app_client.get("/ui/audit?action=rollout.create").text
    assert f'href="/ui/rollouts/{rid}"' in page
    assert "model.push" not in page
    assert "model.push" in app_client.get("/ui/audit").text


def test_models_pages(app_client, make_token, lab):
    signed_in(app_client, make_token("viewer"))
    assert 'href="/ui/models/det"' in app_client.get("/ui/models").text
    page = app_client.get("/ui/models/det").text
    assert "2.0.0" in page
    assert "3.0.0" in page
    assert app_client.get("/ui/models/nope").status_code == 404


def test_only_an_admin_revokes_a_version_from_the_model_page(app_client, admin_headers, make_token, lab):
    url = "/ui/models/det/versions/3.0.0/revoke"
    operator = signed_in(app_client, make_token("operator"))
    assert 'id="revoke-3.0.0"' not in app_client.get("/ui/models/det").text
    assert app_client.post(url, data={"csrf": operator}).status_code == 403
    admin = signed_in(app_client, make_token("admin"))
    assert 'id="revoke-3.0.0"' in app_client.get("/ui/models/det").text
    assert app_client.post(url, data={}).status_code == 403  # no CSRF token

    def status() -> str:
        r = app_client.get("/api/v1/models/det/versions/3.0.0", headers=admin_headers)
        return r.json()["status"]

    assert status() == "active"
    r = app_client.post(url, data={"csrf": admin}, follow_redirects=False)
    assert r.status_code == 303
    assert status() == "revoked"
    assert 'id="revoke-3.0.0"' not in app_client.get("/ui/models/det").text
