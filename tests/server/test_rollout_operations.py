"""Rollouts through the API and the real engine over the simulated fleet: the p95 gates against the
stage devices' stored baseline, operator pause/resume and promote, hardware selectors, and actions
on a finished rollout."""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from server.db import utcnow
from server.rollouts.engine import RolloutEngine
from server.rollouts.tables import Deployment, DesiredRecord, Rollout
from tests.helpers.fleet_sim import Behaviour, SimFleet
from tests.helpers.pki import HARDWARE, make_csr
from tests.helpers.rollout_lab import drive, make_lab, push, rollout_body


@pytest.fixture
def lab(app_client, admin_headers, ctx, onnx_model) -> SimFleet:
    """Ten simulated devices serving det 1.0.0 (5 ms p95) with a stored baseline, 2.0.0 published."""
    return make_lab(app_client, admin_headers, ctx, onnx_model)


def get(client, headers, rid: str) -> dict:
    r = client.get(f"/api/v1/rollouts/{rid}", headers=headers)
    assert r.status_code == 200, r.text
    return r.json()


def act(client, headers, rid: str, action: str, status: int = 200) -> dict:
    r = client.post(f"/api/v1/rollouts/{rid}/{action}", headers=headers)
    assert r.status_code == status, r.text
    return r.json()


def audit_actions(client, headers, rid: str) -> list[str]:
    items = client.get(f"/api/v1/audit?target_id={rid}&limit=100", headers=headers).json()["items"]
    return [e["action"] for e in reversed(items)]


# -- p95 gates ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("p95", "gates", "on_failure", "status", "reason"),
    [
        # 2.0.0 at 10 ms where the same devices ran 1.0.0 at 5 ms: 2x > 1.5x
        (10.0, {}, "pause", "paused", "p95 2.00x the same devices' baseline > 1.5x"),
        (10.0, {}, "rollback", "rolled_back", "p95 2.00x the same devices' baseline > 1.5x"),
        (7.0, {}, "rollback", "completed", None),  # 1.4x: just below the gate
        (10.0, {"max_p95_ratio": None, "max_p95_ms": 8}, "pause", "paused", "p95 10.00 ms > 8.0 ms"),
    ],
    ids=["ratio-pauses", "ratio-rolls-back", "ratio-below-passes", "absolute-pauses"],
)
def test_p95_gates_judge_the_stage_against_its_devices_baseline(
    app_client, admin_headers, ctx, lab, p95, gates, on_failure, status, reason
):
    lab.behaviours["2.0.0"] = Behaviour(p95_ms=p95)
    body = rollout_body("2.0.0", on_failure=on_failure)
    body["gates"] = {**body["gates"], **gates}
    rid = app_client.post("/api/v1/rollouts", json=body, headers=admin_headers).json()["id"]
    final = drive(RolloutEngine(ctx), lab, app_client, admin_headers, rid)
    assert final["status"] == status, final["reason"]
    assert final["baseline"]["p95_ms"] == pytest.approx(5.0)  # the stored 1.0.0 windows
    if reason is None:
        assert final["phases"] == {"succeeded": 10}
        assert {d.serving["det"] for d in lab.devices.values()} == {"2.0.0"}
        assert final["verdict"]["numbers"]["p95_ratio"] == pytest.approx(1.4)
        return
    assert final["reason"] == f"stage 1 gates failed: {reason}"
    verdict = final["verdict"]
    assert (verdict["stage"], verdict["passed"], verdict["reasons"]) == (0, False, [reason])
    assert verdict["numbers"]["p95_ms"] == pytest.approx(p95)
    assert verdict["numbers"]["baseline_p95_ms"] == pytest.approx(5.0)
    if body["gates"]["max_p95_ratio"] is not None:
        assert verdict["numbers"]["p95_ratio"] == pytest.approx(p95 / 5.0)
    if status == "paused":  # the canary keeps the new version; nobody else was told
        assert final["stage_views"][0]["health"]["p95_ms"] == pytest.approx(p95)
        assert final["phases"] == {"succeeded": 1, "pending": 9}
        assert sorted(d.serving["det"] for d in lab.devices.values()) == ["1.0.0"] * 9 + ["2.0.0"]
    else:  # the canary went back to 1.0.0
        assert final["phases"] == {"rolled_back": 1, "cancelled": 9}
        assert {d.serving["det"] for d in lab.devices.values()} == {"1.0.0"}
        # the failed stage still shows its health (the rollback runs on a clock of its own)
        assert final["stage_views"][0]["health"]["p95_ms"] == pytest.approx(p95)
        assert final["rollback_started_at"] >= final["stage_started_at"]


# -- operator actions --------------------------------------------------------------------------------
def test_operator_pause_holds_the_rollout_and_resume_finishes_it(app_client, admin_headers, ctx, lab):
    engine = RolloutEngine(ctx)
    body = rollout_body("2.0.0", stages=[{"count": 2, "soak_s": 0}, {"percent": 100, "soak_s": 0}])
    rid = app_client.post("/api/v1/rollouts", json=body, headers=admin_headers).json()["id"]
    engine.tick()  # the two canaries are told
    paused = act(app_client, admin_headers, rid, "pause")
    assert (paused["status"], paused["reason"]) == ("paused", "paused by operator")
    act(app_client, admin_headers, rid, "pause", 409)  # already paused
    act(app_client, admin_headers, rid, "promote", 409)  # only a running rollout is promoted
    for _ in range(6):  # the canaries finish, but a paused rollout neither promotes nor tells anyone
        lab.step()
        lab.health()
        engine.tick()
    state = get(app_client, admin_headers, rid)
    assert (state["status"], state["current_stage"]) == ("paused", 0)
    assert state["phases"] == {"succeeded": 2, "pending": 8}
    with ctx.db.session_scope() as s:
        assert s.scalar(sa.select(sa.func.count()).select_from(DesiredRecord)) == 2

    resumed = act(app_client, admin_headers, rid, "resume")
    assert (resumed["status"], resumed["reason"]) == ("running", None)
    final = drive(engine, lab, app_client, admin_headers, rid)
    assert final["status"] == "completed", final["reason"]
    assert final["phases"] == {"succeeded": 10}
    assert {d.serving["det"] for d in lab.devices.values()} == {"2.0.0"}
    actions = audit_actions(app_client, admin_headers, rid)
    assert actions.index("rollout.pause") < actions.index("rollout.resume")
    assert actions.index("rollout.resume") < actions.index("rollout.complete")


def test_pause_after_holds_a_passed_stage_until_resumed(app_client, admin_headers, ctx, lab):
    engine = RolloutEngine(ctx)
    stages = [
        {"count": 2, "soak_s": 0, "pause_after": True},
        {"count": 5, "soak_s": 0},  # no pause after this one
        {"percent": 100, "soak_s": 0, "pause_after": True},  # the last: it completes
    ]
    rid = app_client.post(
        "/api/v1/rollouts", json=rollout_body("2.0.0", stages=stages), headers=admin_headers
    ).json()["id"]
    held = drive(engine, lab, app_client, admin_headers, rid)
    assert (held["status"], held["current_stage"]) == ("paused", 1)
    assert held["reason"] == "waits for approval to start stage 2 (stage 1 passed its gates)"
    assert (held["verdict"]["stage"], held["verdict"]["passed"]) == (0, True)
    assert held["stages"][0]["pause_after"] is True
    for _ in range(4):  # held: stage 2's devices are not told
        lab.step()
        lab.health()
        engine.tick()
    assert get(app_client, admin_headers, rid)["phases"] == {"succeeded": 2, "pending": 8}

    act(app_client, admin_headers, rid, "resume")
    final = drive(engine, lab, app_client, admin_headers, rid)
    assert final["status"] == "completed", final["reason"]  # straight through stages 2 and 3
    assert final["phases"] == {"succeeded": 10}
    actions = audit_actions(app_client, admin_headers, rid)
    assert actions.count("rollout.pause") == 1
    assert (
        actions.index("rollout.pause") < actions.index("rollout.resume") < actions.index("rollout.complete")
    )


def test_promote_skips_the_rest_of_the_soak(app_client, admin_headers, ctx, lab):
    engine = RolloutEngine(ctx)
    body = rollout_body("2.0.0", stages=[{"count": 2, "soak_s": 3600}, {"percent": 100, "soak_s": 3600}])
    rid = app_client.post("/api/v1/rollouts", json=body, headers=admin_headers).json()["id"]
    engine.tick()
    r = app_client.post(f"/api/v1/rollouts/{rid}/promote", headers=admin_headers)
    assert r.status_code == 409  # the canaries are still updating: nothing to skip yet
    assert "not settled" in r.json()["detail"]
    lab.step()
    lab.health()
    engine.tick()  # settled: an hour's soak begins
    engine.tick()
    state = get(app_client, admin_headers, rid)
    assert (state["status"], state["current_stage"]) == ("running", 0)
    assert state["soak_until"] is not None
    assert state["phases"] == {"succeeded": 2, "pending": 8}

    promoted = act(app_client, admin_headers, rid, "promote")
    assert promoted["status"] == "running"
    with ctx.db.session_scope() as s:  # the soak now ends now, not in an hour
        assert s.get(Rollout, rid).soak_until <= utcnow()
    engine.tick()  # the gates are judged at once: stage 2 begins
    state = get(app_client, admin_headers, rid)
    assert state["current_stage"] == 1
    assert state["verdict"] == {**state["verdict"], "stage": 0, "passed": True}
    for _ in range(4):
        engine.tick()
        lab.step()
        lab.health()
    engine.tick()
    assert get(app_client, admin_headers, rid)["phases"] == {"succeeded": 10}
    act(app_client, admin_headers, rid, "promote")  # the last stage's hour too
    engine.tick()
    final = get(app_client, admin_headers, rid)
    assert final["status"] == "completed", final["reason"]
    assert audit_actions(app_client, admin_headers, rid).count("rollout.promote") == 3  # 2 operator, 1 engine


def test_promote_still_judges_the_gates(app_client, admin_headers, ctx, lab):
    """Skipping the soak does not skip the gates: a failing canary is rolled back, not promoted."""
    lab.behaviours["2.0.0"] = Behaviour(error_rate=0.3)
    engine = RolloutEngine(ctx)
    body = rollout_body("2.0.0", stages=[{"count": 1, "soak_s": 3600}, {"percent": 100, "soak_s": 0}])
    rid = app_client.post("/api/v1/rollouts", json=body, headers=admin_headers).json()["id"]
    engine.tick()
    lab.step()
    engine.tick()  # settled: soaking
    lab.health()
    act(app_client, admin_headers, rid, "promote")
    engine.tick()
    state = get(app_client, admin_headers, rid)
    assert state["status"] == "rolling_back"
    assert "error rate 0.3000 > 0.05" in state["reason"]
    assert state["current_stage"] == 0


def test_resuming_a_completed_rollout_is_refused_without_change(app_client, admin_headers, ctx, lab):
    rid = app_client.post("/api/v1/rollouts", json=rollout_body("2.0.0"), headers=admin_headers).json()["id"]
    done = drive(RolloutEngine(ctx), lab, app_client, admin_headers, rid)
    assert done["status"] == "completed"
    for action in ("resume", "pause", "abort", "rollback", "start"):
        r = app_client.post(f"/api/v1/rollouts/{rid}/{action}", headers=admin_headers)
        assert r.status_code == 409, (action, r.text)
    r = app_client.post(f"/api/v1/rollouts/{rid}/resume", headers=admin_headers)
    assert "completed" in r.json()["detail"]
    assert get(app_client, admin_headers, rid) == done
    assert "rollout.resume" not in audit_actions(app_client, admin_headers, rid)


# -- selectors ---------------------------------------------------------------------------------------
FACTS = {
    "x86-4g": {"arch": "x86_64", "ram_mb": 4096, "execution_providers": ["CPUExecutionProvider"]},
    "arm-2g": {"arch": "aarch64", "ram_mb": 2048, "execution_providers": ["CPUExecutionProvider"]},
    "arm-8g": {"arch": "aarch64", "ram_mb": 8192, "execution_providers": ["CPUExecutionProvider"]},
    "arm-8g-cuda": {
        "arch": "aarch64", "ram_mb": 8192,
        "execution_providers": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    },
    "x86-16g-cuda": {
        "arch": "x86_64", "ram_mb": 16384,
        "execution_providers": ["CUDAExecutionProvider", "TensorrtExecutionProvider", "CPUExecutionProvider"],
    },
}  # fmt: skip


@pytest.mark.parametrize(
    ("hardware", "expected"),
    [
        ({"arch": "aarch64"}, {"arm-2g", "arm-8g", "arm-8g-cuda"}),
        ({"min_ram_mb": 4096}, {"x86-4g", "arm-8g", "arm-8g-cuda", "x86-16g-cuda"}),  # at least
        ({"providers": ["CUDAExecutionProvider"]}, {"arm-8g-cuda", "x86-16g-cuda"}),
        ({"providers": ["CUDAExecutionProvider", "TensorrtExecutionProvider"]}, {"x86-16g-cuda"}),  # all
        ({"arch": "aarch64", "min_ram_mb": 4096}, {"arm-8g", "arm-8g-cuda"}),
        ({"arch": "aarch64", "min_ram_mb": 4096, "providers": ["CUDAExecutionProvider"]}, {"arm-8g-cuda"}),
        ({}, set(FACTS)),
    ],
)
def test_hardware_selector_picks_devices_by_their_enrolled_facts(
    app_client, admin_headers, onnx_model, hardware, expected
):
    token = app_client.post(
        "/api/v1/enroll-tokens", json={"uses": len(FACTS) + 1, "tags": {"site": "hw"}}, headers=admin_headers
    ).json()["token"]
    ids: dict[str, str] = {}
    for name, facts in FACTS.items():
        csr, _ = make_csr(name)
        r = app_client.post(
            "/api/v1/enroll", json={"token": token, "csr_pem": csr, "hardware": {**HARDWARE, **facts}}
        )
        assert r.status_code == 201, r.text
        ids[r.json()["device_id"]] = name
    push(app_client, admin_headers, onnx_model, "1.0.0")
    body = {
        "model": "det", "version": "1.0.0", "start": False,
        "selector": {"tags": {"site": "hw"}, "hardware": hardware},
        "stages": [{"percent": 100, "soak_s": 0}],
    }  # fmt: skip
    r = app_client.post("/api/v1/rollouts", json=body, headers=admin_headers)
    assert r.status_code == 201, r.text
    assert (r.json()["status"], r.json()["devices"]) == ("draft", len(expected))
    ctx = app_client.app.state.ctx
    with ctx.db.session_scope() as s:
        chosen = s.scalars(sa.select(Deployment.device_id).where(Deployment.rollout_id == r.json()["id"]))
        assert {ids[d] for d in chosen} == expected


def test_a_hardware_selector_that_matches_nothing_is_refused(app_client, admin_headers, lab):
    for hardware in ({"arch": "riscv64"}, {"min_ram_mb": 4097}, {"providers": ["CUDAExecutionProvider"]}):
        body = {**rollout_body("2.0.0"), "selector": {"tags": {"site": "lab"}, "hardware": hardware}}
        r = app_client.post("/api/v1/rollouts", json=body, headers=admin_headers)
        assert r.status_code == 422, r.text
        assert "matches no device" in r.json()["detail"]
    assert app_client.get("/api/v1/rollouts", headers=admin_headers).json() == []


def test_a_shadow_canary_then_serving_on_the_same_devices(app_client, admin_headers, ctx, lab):
    """A shadow stage followed by a serve stage covering the same devices (what 1% shadow, 10%
    serve is on a small fleet): the canary shadows, is judged on agreement, then serves."""
    lab.behaviours["2.0.0"] = Behaviour(agreement=0.95)
    stages = [
        {"count": 2, "soak_s": 0, "shadow": True}, {"count": 2, "soak_s": 0}, {"percent": 100, "soak_s": 0},
    ]
    rid = app_client.post(
        "/api/v1/rollouts", json=rollout_body("2.0.0", stages=stages), headers=admin_headers
    ).json()["id"]
    engine = RolloutEngine(ctx)
    final = drive(engine, lab, app_client, admin_headers, rid)
    assert final["status"] == "completed", final["reason"]
    assert [v["devices"] for v in final["stage_views"]] == [2, 2, 10]
    assert {d.serving["det"] for d in lab.devices.values()} == {"2.0.0"}
    assert not any(d.shadow for d in lab.devices.values())
    promotions = [
        e["details"] for e in app_client.get(
            f"/api/v1/audit?target_id={rid}&action=rollout.promote", headers=admin_headers
        ).json()["items"]
    ]
    assert any(p.get("numbers", {}).get("agreement") == pytest.approx(0.95) for p in promotions)


def test_the_rollout_list_filters_by_model_and_version(app_client, admin_headers, ctx, lab):
    def start(version: str) -> str:
        r = app_client.post("/api/v1/rollouts", json=rollout_body(version), headers=admin_headers)
        return r.json()["id"]

    first = start("2.0.0")
    act(app_client, admin_headers, first, "abort")
    second = start("1.0.0")

    def ids(query: str) -> list[str]:
        r = app_client.get(f"/api/v1/rollouts?{query}", headers=admin_headers)
        assert r.status_code == 200, r.text
        return [x["id"] for x in r.json()]

    assert ids("model=det") == [second, first]  # newest first
    assert ids("model=det&version=2.0.0") == [first]
    assert ids("model=det&version=1.0.0&status=running") == [second]
    assert ids("model=det&version=2.0.0&status=running") == []
    assert ids("model=other") == []
    assert app_client.get(f"/api/v1/rollouts?model={'x' * 65}", headers=admin_headers).status_code == 422
