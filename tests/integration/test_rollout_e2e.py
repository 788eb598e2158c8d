"""Staged rollouts end to end: a real server (HTTP API, MQTT bridge, rollout engine) against a
private Mosquitto (mTLS), real device daemons (real onnxruntime, TUF downloads, probation) and live
inference traffic through each device's local API, so the health windows the gates read are real.

Covers: a 3-stage rollout over 10 devices completes; a bad version trips
its canary and every touched device ends on the previous version; a shadow stage reports agreement
and gates on it; a device offline during its stage catches up through the retained DesiredState;
a server restarted mid-rollout resumes it. And a stage is judged on evidence: one whose devices
are all offline pauses with its reason; a soak shorter than the health window still judges the
health the stage's devices reported.
"""

from __future__ import annotations

import httpx
import pytest

from tests.helpers.device_fleet import events, push_model, wait_for
from tests.helpers.onnx_models import make_model
from tests.helpers.rollout_e2e import MODEL, Fleet, Traffic, follow, rollout_body, wait_requests

pytestmark = pytest.mark.mqtt

SQLITE = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
THREE_STAGES = [{"percent": 10, "soak_s": 1}, {"percent": 50, "soak_s": 1}, {"percent": 100, "soak_s": 1}]


@pytest.fixture
def models(live_server, tmp_path):
    """Push versions of the test model: ``models("2.0.0", seed=2)`` (make_model keyword arguments)."""

    def push(version: str, **kwargs) -> None:
        push_model(live_server, MODEL, version, make_model(tmp_path / "onnx" / f"{version}.onnx", **kwargs))

    return push


@pytest.fixture
def fleet_of(live_server, tmp_path):
    """``fleet_of(n, **daemon settings)``: n enrolled devices (daemons not started); all stopped after."""
    fleets: list[Fleet] = []

    def make(n: int, **overrides) -> Fleet:
        fleets.append(Fleet(live_server, tmp_path / "devices", n, **overrides))
        return fleets[-1]

    yield make
    for f in fleets:
        f.close()


def ask(fleet: Fleet, device_id: str) -> tuple[int, str | None]:
    """One inference through the device's local API: (status, X-Fleet-Model-Version)."""
    r = httpx.post(fleet.api(device_id) + "/v1/infer", json={"inputs": {"x": [[0.1, 0.2, 0.3, 0.4]]}})
    return r.status_code, r.headers.get("x-fleet-model-version")


def rollout_phases(live, device_id: str, rollout_id: str) -> list[tuple[str, str]]:
    """(version, phase) of the device's reports about ``rollout_id``, in order."""
    return [(e["version"], e["phase"]) for e in events(live, device_id) if e["rollout_id"] == rollout_id]


def audit_actions(fleet: Fleet, rollout_id: str) -> list[str]:
    return [e["action"] for e in fleet.client.audit(limit=500) if e["target_id"] == rollout_id]


# ------------------------------------------------------------------------------------------------
# 1. a rollout over 10 devices in 3 stages completes


@pytest.mark.parametrize(
    "database_url", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)], indirect=True
)
def test_rollout_over_ten_devices_in_three_stages_completes(fleet_of, models):
    fleet = fleet_of(10)
    models("1.0.0", seed=1)
    models("2.0.0", seed=2)
    fleet.start()
    fleet.install("1.0.0")
    with Traffic(fleet) as traffic:
        wait_requests(traffic, fleet.ids, 5)
        fleet.wait_health("1.0.0")  # a pre-rollout baseline on 1.0.0 the server has seen
        created = fleet.client.create_rollout(rollout_body("2.0.0", THREE_STAGES))
        assert created["status"] == "running"
        assert created["devices"] == 10
        assert [v["devices"] for v in created["stage_views"]] == [1, 5, 10]
        rid = created["id"]
        stage_of = {d: s for d, (s, _, _) in fleet.deployments(rid).items()}
        assert sorted(stage_of.values()) == [0] + [1] * 4 + [2] * 5

        seen_stages: list[int] = []

        def check(snapshot: dict) -> None:
            cur = snapshot["current_stage"]
            if not seen_stages or seen_stages[-1] != cur:
                seen_stages.append(cur)
            # a stage's devices are never told before their stage starts
            touched = sum(n for phase, n in snapshot["phases"].items() if phase != "pending")
            assert touched <= snapshot["stage_views"][cur]["devices"], snapshot

        final = follow(fleet.client, rid, timeout=60, on_snapshot=check)
        assert final["status"] == "completed", (final["reason"], final["verdict"])
        assert seen_stages == [0, 1, 2]
        assert final["phases"] == {"succeeded": 10}
        assert [v["phases"] for v in final["stage_views"]] == [
            {"succeeded": 1},
            {"succeeded": 5},
            {"succeeded": 10},
        ]
        # live traffic reached the gates: every stage saw requests answered by 2.0.0, no errors
        for view in final["stage_views"]:
            assert view["health"]["requests"] >= 5, view
            assert view["health"]["errors"] == 0, view
        assert final["verdict"]["passed"] is True
        assert final["verdict"]["numbers"]["requests"] >= 5  # min_requests held on real windows
        assert final["baseline"]["requests"] > 0  # 1.0.0 windows from before the rollout

        # every device serves 2.0.0: on the server, and by the answer header of its local API
        assert set(fleet.serving().values()) == {"2.0.0"}
        for d in fleet.ids:
            assert ask(fleet, d) == (200, "2.0.0")
            assert traffic.answered_by[d]["2.0.0"] > 0
    # each device was told exactly once by the rollout (seq 1 was the direct 1.0.0 install)
    assert set(fleet.desired_versions().values()) == {(2, "2.0.0", "serve")}
    actions = audit_actions(fleet, rid)
    assert actions.count("rollout.promote") == 2
    assert "rollout.complete" in actions


# ------------------------------------------------------------------------------------------------
# 2. a bad version trips the canary gate; every touched device ends on the previous version


@SQLITE
def test_bad_version_trips_canary_gate_and_touched_devices_return(fleet_of, models, live_server):
    models("1.0.0", seed=1)
    # passes its validation vectors (inputs in [0, 1)) but answers NaN for negative inputs
    models("2.0.0", seed=2, nan_on_negative=True)
    fleet = fleet_of(5)
    fleet.start()
    fleet.install("1.0.0")
    with Traffic(fleet, negative_share=0.3) as traffic:
        wait_requests(traffic, fleet.ids, 5)
        body = rollout_body(
            "2.0.0",
            [{"count": 2, "soak_s": 1}, {"percent": 100, "soak_s": 1}],
            # lenient on the device (it keeps 2.0.0 after its probation): the server's gate decides
            probation={"seconds": 0.5, "min_requests": 3, "max_error_rate": 1.0},
            on_failure="rollback",
        )
        created = fleet.client.create_rollout(body)
        rid = created["id"]
        canaries = sorted(d for d, (stage, _, _) in fleet.deployments(rid).items() if stage == 0)
        others = sorted(set(fleet.ids) - set(canaries))
        assert len(canaries) == 2

        # the canaries run 2.0.0 (succeeded on the device) before the gate trips
        follow(fleet.client, rid, until=lambda s: s["stage_views"][0]["phases"] == {"succeeded": 2})
        final = follow(fleet.client, rid, timeout=40)
        assert final["status"] == "rolled_back", (final["status"], final["reason"])
        assert final["reason"].startswith("stage 1 gates failed: error rate"), final["reason"]
        numbers = final["verdict"]["numbers"]
        assert numbers["error_rate"] > 0.05, numbers
        assert numbers["requests"] >= 5, numbers
        assert final["current_stage"] == 0  # never promoted

        # the canaries are back on 1.0.0 (told by a rollback DesiredState), the rest were never told
        assert fleet.deployments(rid) == {
            d: (0 if d in canaries else 1, "rolled_back" if d in canaries else "cancelled", "1.0.0")
            for d in fleet.ids
        }
        assert final["phases"] == {"rolled_back": 2, "cancelled": 3}
        assert set(fleet.serving().values()) == {"1.0.0"}
        desired = fleet.desired_versions()
        for d in canaries:
            assert desired[d] == (3, "1.0.0", "serve")  # 1: install, 2: 2.0.0, 3: the rollback
            assert traffic.answered_by[d]["2.0.0"] > 0  # it did serve the bad version for a while
            assert ask(fleet, d) == (200, "1.0.0")
            phases = wait_for(
                lambda d=d: (p := rollout_phases(live_server, d, rid)) and p[-1][0] == "1.0.0" and p,
                what="rollback reports",
            )
            bad = phases.index(("2.0.0", "succeeded"))
            # then the rollback: 1.0.0 swapped back in (its own probation may still be running)
            assert ("1.0.0", "probation") in phases[bad:], phases
            assert not {"failed", "rolled_back"} & {p for _, p in phases}, phases
        for d in others:
            assert desired[d] == (1, "1.0.0", "serve")
            assert set(traffic.answered_by[d]) == {"1.0.0"}
            assert ask(fleet, d) == (200, "1.0.0")
            assert rollout_phases(live_server, d, rid) == []
    actions = audit_actions(fleet, rid)
    assert "rollout.rollback" in actions
    assert "rollout.rolled_back" in actions
    assert "rollout.promote" not in actions


# ------------------------------------------------------------------------------------------------
# 3. a shadow stage reports agreement and gates on it


def shadow_windows(live, version: str) -> list[tuple[str, int, float | None]]:
    """(device, requests, agreement) of the shadow health windows of ``version`` in the database."""
    import sqlalchemy as sa

    from server.health.tables import HealthSample

    with live.ctx.db.session_scope() as s:
        return list(
            s.execute(
                sa.select(HealthSample.device_id, HealthSample.requests, HealthSample.agreement).where(
                    HealthSample.model == MODEL,
                    HealthSample.version == version,
                    HealthSample.mode == "shadow",
                    HealthSample.requests > 0,
                )
            )
        )


@SQLITE
def test_shadow_stage_reports_agreement_and_gates_on_it(fleet_of, models, live_server):
    models("1.0.0", seed=1)
    # agreement is top-1 equality for class scores: negated scores never pick the same class
    models("2.0.0", seed=1, scale=-1.0)
    models("1.1.0", seed=1, slow_factor=1)  # another model file with the same answers
    fleet = fleet_of(4, shadow_sample_rate=1.0)
    fleet.start()
    fleet.install("1.0.0")
    stages = [{"count": 2, "soak_s": 1, "shadow": True}, {"percent": 100, "soak_s": 1}]
    gates = {"min_agreement": 0.9}
    with Traffic(fleet) as traffic:
        wait_requests(traffic, fleet.ids, 5)

        # a disagreeing candidate: its shadow stage pauses the rollout; it never answered a caller
        body = rollout_body("2.0.0", stages, gates=gates, on_failure="pause")
        bad = fleet.client.create_rollout(body)
        shadowed = sorted(d for d, (stage, _, _) in fleet.deployments(bad["id"]).items() if stage == 0)
        final = follow(fleet.client, bad["id"], timeout=40)
        assert final["status"] == "paused", (final["status"], final["reason"])
        assert final["reason"].startswith("stage 1 gates failed: shadow agreement 0.000 < 0.9"), final
        assert final["verdict"]["numbers"]["agreement"] == 0.0
        assert final["stage_views"][0]["health"]["agreement"] == 0.0
        assert final["stage_views"][0]["health"]["requests"] >= 5
        # the shadow devices passed their own probation (the candidate did not fail): only the
        # server's agreement gate stopped it; the serving stage was never started
        assert final["phases"] == {"succeeded": 2, "pending": 2}
        assert final["current_stage"] == 0
        rows = shadow_windows(live_server, "2.0.0")
        assert {d for d, _, _ in rows} == set(shadowed)
        assert {a for _, _, a in rows} == {0.0}
        assert set(fleet.serving().values()) == {"1.0.0"}
        for d in fleet.ids:
            assert set(traffic.answered_by[d]) == {"1.0.0"}  # 2.0.0 never answered
        for d in shadowed:
            health = httpx.get(fleet.api(d) + "/v1/health").json()["models"][MODEL]
            assert (health["version"], health["shadow"]) == ("1.0.0", "2.0.0")
        fleet.client.rollout_action(bad["id"], "abort")

        # an agreeing candidate passes its shadow stage, then serves everywhere
        good = fleet.client.create_rollout(rollout_body("1.1.0", stages, gates=gates, on_failure="pause"))
        shadowed = sorted(d for d, (stage, _, _) in fleet.deployments(good["id"]).items() if stage == 0)
        # the shadow stage passed on the devices and soaks: the candidate still answers nobody
        follow(
            fleet.client,
            good["id"],
            timeout=40,
            until=lambda s: s["stage_views"][0]["phases"] == {"succeeded": 2},
        )
        assert not any("1.1.0" in traffic.answered_by[d] for d in fleet.ids)
        final = follow(fleet.client, good["id"], timeout=40)
        assert final["status"] == "completed", (final["status"], final["reason"])
        assert final["stage_views"][0]["shadow"] is True
        assert final["stage_views"][0]["health"]["agreement"] == 1.0
        promoted = [
            e for e in fleet.client.audit(limit=500, action="rollout.promote") if e["target_id"] == good["id"]
        ]
        assert len(promoted) == 1
        assert promoted[0]["details"]["passed"] is True
        assert promoted[0]["details"]["numbers"]["agreement"] == 1.0
        rows = shadow_windows(live_server, "1.1.0")
        assert {d for d, _, _ in rows} >= set(shadowed)
        assert {a for _, _, a in rows} == {1.0}
        assert set(fleet.serving().values()) == {"1.1.0"}
        wait_requests(traffic, fleet.ids, 1)
        for d in fleet.ids:
            assert ask(fleet, d) == (200, "1.1.0")
            assert traffic.answered_by[d]["1.1.0"] > 0
            assert "2.0.0" not in traffic.answered_by[d]
        # the shadowed devices were re-armed to serve: two DesiredStates (shadow, then serve) and
        # each ended succeeded; the others got one
        desired = fleet.desired_versions()
        for d in fleet.ids:
            assert desired[d][1:] == ("1.1.0", "serve")
            outcomes = rollout_outcomes(live_server, d, good["id"])
            assert list(outcomes.values()) == ["succeeded"] * (2 if d in shadowed else 1), outcomes
            assert max(outcomes) == desired[d][0]


def rollout_outcomes(live, device_id: str, rollout_id: str) -> dict[int, str]:
    """desired seq -> last phase the device reported for it, for DesiredStates of ``rollout_id``."""
    seen: dict[int, str] = {}
    for e in events(live, device_id):
        if e["rollout_id"] == rollout_id and e["desired_seq"] is not None:
            seen[e["desired_seq"]] = e["phase"]
    return dict(sorted(seen.items()))


# ------------------------------------------------------------------------------------------------
# 4. a device offline during its stage does not block it and catches up when it returns


@SQLITE
def test_offline_device_does_not_block_and_catches_up_through_retained_desired(fleet_of, models, live_server):
    models("1.0.0", seed=1)
    models("2.0.0", seed=2)
    fleet = fleet_of(6)
    fleet.start()
    fleet.install("1.0.0")
    away = fleet.ids[0]
    fleet.stop([away])  # its last will / goodbye: presence offline, retained
    wait_for(lambda: fleet.device(away)["status"] == "offline", timeout=20, interval=0.2, what="offline")
    with Traffic(fleet) as traffic:
        wait_requests(traffic, fleet.running, 5)
        body = rollout_body("2.0.0", [{"count": 2, "soak_s": 0.5}, {"percent": 100, "soak_s": 0.5}])
        rid = fleet.client.create_rollout(body)["id"]
        final = follow(fleet.client, rid, timeout=40)
        assert final["status"] == "completed", (final["status"], final["reason"])
        # told (a retained DesiredState waits on the broker), but it never moved and blocked nothing
        assert final["phases"] == {"succeeded": 5, "notified": 1}
        assert final["verdict"]["numbers"]["offline_waiting"] == 1
        assert fleet.deployments(rid)[away][1] == "notified"
        seq, version, _ = fleet.desired_versions()[away]
        assert (seq, version) == (2, "2.0.0")
        assert fleet.serving() == {d: "1.0.0" if d == away else "2.0.0" for d in fleet.ids}
        assert rollout_outcomes(live_server, away, rid) == {}

        # it comes back: the retained DesiredState (not a new one) brings it to 2.0.0
        fleet.start([away])
        wait_for(
            lambda: fleet.device(away)["serving"].get(MODEL) == "2.0.0",
            timeout=30,
            interval=0.2,
            what="returning device serves 2.0.0",
        )
        wait_for(
            lambda: rollout_outcomes(live_server, away, rid) == {2: "succeeded"},
            timeout=30,
            interval=0.2,
            what="its deployment succeeded",
        )
    assert ask(fleet, away) == (200, "2.0.0")
    assert fleet.desired_versions()[away][:2] == (2, "2.0.0")
    assert fleet.deployments(rid)[away][1] == "succeeded"
    assert fleet.client.get_rollout(rid)["phases"] == {"succeeded": 6}


# ------------------------------------------------------------------------------------------------
# 5. a server restarted mid-rollout resumes it


@SQLITE
def test_server_restart_mid_soak_resumes_the_rollout(fleet_of, models, live_server):
    from tests.helpers.live_server import LiveServer

    models("1.0.0", seed=1)
    models("2.0.0", seed=2)
    fleet = fleet_of(6)
    fleet.start()
    fleet.install("1.0.0")
    stages = [{"count": 2, "soak_s": 0.5}, {"count": 4, "soak_s": 3}, {"percent": 100, "soak_s": 0.5}]
    restarted = None
    try:
        with Traffic(fleet) as traffic:
            wait_requests(traffic, fleet.ids, 5)
            rid = fleet.client.create_rollout(rollout_body("2.0.0", stages))["id"]
            # the second stage settled and soaks: stop the server there
            mid = follow(
                fleet.client,
                rid,
                timeout=40,
                until=lambda s: s["current_stage"] == 1 and s["soak_until"] is not None,
            )
            assert mid["status"] == "running"
            live_server.stop()
            with pytest.raises(httpx.TransportError):
                httpx.get(live_server.url + "/api/v1/rollouts", timeout=1)
            stage_of = {d: st for d, (st, _, _) in fleet.deployments(rid).items()}
            untold = {d for d, st in stage_of.items() if st == 2}
            assert {d for d, (_, phase, _) in fleet.deployments(rid).items() if phase == "pending"} == untold

            # a new server process state: same settings, database and keys, same broker
            restarted = LiveServer(live_server.settings).start()
            fleet.use_server(restarted)
            final = follow(fleet.client, rid, timeout=40)
            assert final["status"] == "completed", (final["status"], final["reason"])
            assert final["phases"] == {"succeeded": 6}
            assert set(fleet.serving().values()) == {"2.0.0"}
            wait_requests(traffic, fleet.ids, 1)
            for d in fleet.ids:
                assert ask(fleet, d) == (200, "2.0.0")
        # nothing lost or repeated: each device told once, one promotion per stage boundary
        assert set(fleet.desired_versions().values()) == {(2, "2.0.0", "serve")}
        actions = audit_actions(fleet, rid)
        assert actions.count("rollout.start") == 1
        assert actions.count("rollout.promote") == 2
        assert actions.count("rollout.complete") == 1
    finally:
        if restarted is not None:
            restarted.stop()


# ------------------------------------------------------------------------------------------------
# 6. a stage is judged on evidence: it waits for it, and pauses with the reason without it


@SQLITE
def test_a_stage_whose_devices_are_all_offline_pauses_with_its_reason(fleet_of, models, live_server):
    """The stage's only device is offline: the stage settles and soaks with no one updated, then
    waits stage_timeout_s for evidence and pauses saying why (it does not complete); the device
    returns, an operator resumes, and the stage passes on the health it then reports."""
    models("1.0.0", seed=1)
    models("2.0.0", seed=2)
    fleet = fleet_of(2)
    fleet.start()
    fleet.install("1.0.0")
    away = fleet.ids[0]
    fleet.stop([away])
    wait_for(lambda: fleet.device(away)["status"] == "offline", timeout=20, interval=0.2, what="offline")
    with Traffic(fleet):
        body = rollout_body(
            "2.0.0", [{"percent": 100, "soak_s": 0.2}], selector={"device_ids": [away]},
            gates={"stage_timeout_s": 2},
        )  # fmt: skip
        rid = fleet.client.create_rollout(body)["id"]
        paused = follow(fleet.client, rid, timeout=30)
        assert paused["status"] == "paused", (paused["status"], paused["reason"])
        assert paused["reason"].startswith("stage 1 has not enough evidence after stage_timeout_s (2s): ")
        assert "no device of stage 1 is online (1 offline)" in paused["reason"]
        assert (paused["phases"], paused["offline_pending"]) == ({"notified": 1}, 1)

        fleet.start([away])  # the retained DesiredState brings it to 2.0.0
        wait_for(lambda: fleet.deployments(rid)[away][1] == "succeeded", timeout=30, interval=0.2,
                 what="the returning device succeeded")  # fmt: skip
        fleet.client.rollout_action(rid, "resume")
        final = follow(fleet.client, rid, timeout=30)
        assert final["status"] == "completed", (final["status"], final["reason"])
        assert final["verdict"]["numbers"]["succeeded_reporting"] == 1
        assert final["verdict"]["numbers"]["requests"] >= 5
        assert final["offline_pending"] == 0
    assert ask(fleet, away) == (200, "2.0.0")


@SQLITE
def test_a_soak_shorter_than_the_health_window_is_judged_on_the_stage_health(fleet_of, models):
    """Health windows of 2 s, soaks of 0.2 s: the gates read what the stage's devices reported
    since the stage started, so each stage is judged on real requests (the soak alone would hold
    no window: "requests: 0"), and the rollout's creation says the soak is short."""
    models("1.0.0", seed=1)
    models("2.0.0", seed=2)
    fleet = fleet_of(4, health_window_s=2.0)
    fleet.start()
    fleet.install("1.0.0")
    with Traffic(fleet) as traffic:
        wait_requests(traffic, fleet.ids, 5)
        fleet.wait_health("1.0.0")
        stages = [{"percent": 50, "soak_s": 0.2}, {"percent": 100, "soak_s": 0.2}]
        created = fleet.client.create_rollout(rollout_body("2.0.0", stages))
        [warning] = created["warnings"]
        assert warning.startswith("the soak of stage(s) 1, 2 (0.2s) is shorter than the devices' health")
        verdicts: dict[int, dict] = {}

        def record(state: dict) -> None:
            if state["verdict"]:
                verdicts[state["verdict"]["stage"]] = state["verdict"]

        final = follow(fleet.client, created["id"], timeout=60, on_snapshot=record)
        assert final["status"] == "completed", (final["status"], final["reason"])
        for stage in (0, 1):
            numbers = verdicts[stage]["numbers"]
            assert numbers["requests"] >= 5, numbers
            assert numbers["error_rate"] == 0.0, numbers
            assert numbers["succeeded_reporting"] >= 1, numbers
