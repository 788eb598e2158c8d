"""The rollout form's two options and what the rollout page shows of them: "leave out devices no
variant fits" (``skip_unfit``: without it the API's 422 shows in the form, with it the page counts
the devices left out) and "pause for approval" (``pause_after`` on every stage but the last unless
the stages JSON says otherwise; the page marks those stages and its resume button approves the next
stage)."""

from __future__ import annotations

import html
import re

import pytest

from server.rollouts.engine import RolloutEngine
from server.rollouts.tables import Rollout
from server.ui.operate import pause_between
from tests.helpers.cpu_flags import VNNI_ONLY, flagged_fleet, push_variant
from tests.helpers.dashboard import signed_in
from tests.helpers.rollout_lab import drive

FLAGS = {"plain-1": "avx2", "plain-2": "", "vnni-1": "avx512_vnni,avx2", "vnni-2": "avx512_vnni"}
THREE = '[{"count": 2, "soak_s": 0}, {"count": 5, "soak_s": 0}, {"percent": 100, "soak_s": 0}]'


def form(csrf: str, **over: str) -> dict[str, str]:
    data = {"csrf": csrf, "model": "det", "version": "2.0.0", "tags": "site:lab", "stages": THREE,
            "gates": '{"max_error_rate": 0.05}', "on_failure": "pause"}  # fmt: skip
    return data | over


def start(client, data: dict[str, str]) -> str:
    r = client.post("/ui/rollouts/new", data=data, follow_redirects=False)
    assert r.status_code == 303, r.text
    return r.headers["location"].rsplit("/", 1)[1]


def stored(ctx) -> list[Rollout]:
    with ctx.db.session_scope() as s:
        return list(s.query(Rollout))


# -- pause for approval: the form -> the API body -------------------------------------------------
def test_pause_between_sets_every_stage_but_the_last_unless_given():
    stages = [{"percent": 10}, {"percent": 50, "pause_after": False}, {"percent": 90}, {"percent": 100}]
    assert [s.get("pause_after") for s in pause_between(stages)] == [True, False, True, None]
    assert pause_between([{"percent": 100}]) == [{"percent": 100}]  # one stage: nothing to approve
    assert pause_between({"not": "a list"}) == {"not": "a list"}  # validation says why
    assert pause_between([1, {"percent": 100}]) == [1, {"percent": 100}]


def test_the_form_documents_both_options(app_client, make_token, lab):
    signed_in(app_client, make_token("operator"))
    page = app_client.get("/ui/rollouts/new").text
    assert "<code>pause_after</code>" in re.search(r'id="stages-help">(.*?)</p>', page, re.S).group(1)
    assert re.search(r'name="pause_between" value="true" id="pause-between"\s*>', page)  # unchecked
    assert re.search(r'name="skip_unfit" value="true" id="skip-unfit"\s*>', page)
    assert "Pause for approval after each stage but the last" in page
    assert "Leave out devices no variant fits" in page


@pytest.mark.parametrize(
    ("stages", "checked", "expected"),
    [
        (THREE, "true", [True, True, False]),
        (THREE, None, [False, False, False]),
        # the stages JSON wins over the checkbox
        (THREE.replace('"count": 5,', '"count": 5, "pause_after": false,'), "true", [True, False, False]),
        (THREE.replace('"count": 5,', '"count": 5, "pause_after": true,'), None, [False, True, False]),
    ],
    ids=["checked", "unchecked", "json-says-no", "json-says-yes"],
)
def test_pause_for_approval_reaches_the_api_body(
    app_client, admin_headers, make_token, lab, stages, checked, expected
):
    csrf = signed_in(app_client, make_token("operator"))
    data = form(csrf, stages=stages) | ({"pause_between": checked} if checked else {})
    rid = start(app_client, data)
    state = app_client.get(f"/api/v1/rollouts/{rid}", headers=admin_headers).json()
    assert [s["pause_after"] for s in state["stages"]] == expected
    assert [s.get("count") for s in state["stages"]] == [2, 5, None]


def test_the_checkboxes_stay_as_given_when_the_form_is_refused(app_client, ctx, make_token, lab):
    csrf = signed_in(app_client, make_token("operator"))
    data = form(csrf, version="9.9.9", pause_between="true", skip_unfit="true")
    r = app_client.post("/ui/rollouts/new", data=data)
    assert r.status_code == 404
    assert re.search(r'id="pause-between"\s*checked>', r.text)
    assert re.search(r'id="skip-unfit"\s*checked>', r.text)
    assert stored(ctx) == []


# -- approval on the rollout page -----------------------------------------------------------------
def test_a_rollout_waiting_for_approval_offers_approve_stage_2(
    app_client, admin_headers, ctx, make_token, lab
):
    csrf = signed_in(app_client, make_token("operator"))
    rid = start(app_client, form(csrf, pause_between="true"))
    page = app_client.get(f"/ui/rollouts/{rid}").text
    table = re.search(r'id="stages">(.*?)</table>', page, re.S).group(1)
    rows = re.findall(r"<tr class=\"(?:current)?\">\s*<td>(.*?)</td>", table, re.S)
    assert ["data-pause-after" in row for row in rows] == [True, True, False]
    assert "Approve stage" not in page  # running: nothing to approve yet

    engine = RolloutEngine(ctx)
    held = drive(engine, lab, app_client, admin_headers, rid)
    assert (held["status"], held["current_stage"]) == ("paused", 1), held["reason"]
    live = app_client.get(f"/ui/rollouts/{rid}/live").text
    button = re.search(r'<form method="post" action="([^"]+)"[^>]*data-confirm="([^"]+)">\s*'
                       r'<input[^>]*>\s*<button[^>]*id="act-resume">([^<]*)</button>', live)  # fmt: skip
    assert button, live
    assert button.groups() == (
        f"/ui/rollouts/{rid}/resume",
        "Approve stage 2: tell its devices to update now?",
        "Approve stage 2",
    )
    assert "Approve stage 2" in app_client.get(f"/ui/rollouts/{rid}").text

    signed_in(app_client, make_token("viewer"))  # a viewer sees the wait, no button
    viewer = app_client.get(f"/ui/rollouts/{rid}").text
    assert "waits for approval to start stage 2" in viewer
    assert 'id="actions"' not in viewer
    assert "Approve stage" not in viewer

    csrf = signed_in(app_client, make_token("operator"))
    r = app_client.post(f"/ui/rollouts/{rid}/resume", data={"csrf": csrf}, follow_redirects=False)
    assert r.status_code == 303
    held = drive(engine, lab, app_client, admin_headers, rid)
    assert (held["status"], held["current_stage"]) == ("paused", 2)
    assert "Approve stage 3" in app_client.get(f"/ui/rollouts/{rid}/live").text
    app_client.post(f"/ui/rollouts/{rid}/resume", data={"csrf": csrf})
    assert drive(engine, lab, app_client, admin_headers, rid)["status"] == "completed"


def test_an_operator_pause_keeps_the_resume_button(app_client, admin_headers, make_token, lab):
    csrf = signed_in(app_client, make_token("operator"))
    rid = start(app_client, form(csrf, pause_between="true"))
    app_client.post(f"/ui/rollouts/{rid}/pause", data={"csrf": csrf})
    live = app_client.get(f"/ui/rollouts/{rid}/live").text
    assert re.search(r'id="act-resume">Resume</button>', live)
    assert "Approve stage" not in live


# -- devices no variant fits ----------------------------------------------------------------------
@pytest.fixture
def unfit_fleet(app_client, admin_headers, ctx, onnx_model):
    """Four devices; det 1.0.0 published as one variant only vnni-1 and vnni-2 fit."""
    fleet = flagged_fleet(app_client, admin_headers, ctx, FLAGS)
    r = push_variant(app_client, admin_headers, onnx_model(), "vnni", VNNI_ONLY)
    assert r.status_code == 201, r.text
    return fleet


def test_unfit_devices_refuse_the_form_unless_left_out(
    app_client, admin_headers, ctx, make_token, unfit_fleet
):
    csrf = signed_in(app_client, make_token("operator"))
    one = '[{"percent": 100, "soak_s": 0}]'
    data = form(csrf, version="1.0.0", tags="", stages=one)
    r = app_client.post("/ui/rollouts/new", data=data)
    assert r.status_code == 422
    message = html.unescape(re.search(r'id="form-error">([^<]*)<', r.text).group(1))
    assert "2 of the 4 selected devices fit no variant of det 1.0.0" in message
    assert "plain-1, plain-2" in message
    assert stored(ctx) == []

    rid = start(app_client, data | {"skip_unfit": "true"})
    state = app_client.get(f"/api/v1/rollouts/{rid}", headers=admin_headers).json()
    assert (state["devices"], state["unfit_skipped"]) == (2, 2)
    for url in (f"/ui/rollouts/{rid}", f"/ui/rollouts/{rid}/live"):
        unfit = re.search(r'id="unfit">(.*?)</p>', app_client.get(url).text, re.S)
        assert unfit, url
        text = " ".join(html.unescape(unfit.group(1)).split())
        assert text == "2 selected devices fit no variant: left out (e.g. plain-1, plain-2)"


def test_no_unfit_line_when_every_device_fits(app_client, make_token, lab):
    csrf = signed_in(app_client, make_token("operator"))
    rid = start(app_client, form(csrf, skip_unfit="true"))
    assert 'id="unfit"' not in app_client.get(f"/ui/rollouts/{rid}").text
