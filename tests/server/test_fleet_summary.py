"""``GET /api/v1/fleet/summary``: the overview's numbers as JSON, over the simulated ``lab`` fleet
after a rolled-back rollout and during a running one, with devices of other hardware; the
dashboard's overview page shows the same numbers."""

from __future__ import annotations

import re
from datetime import UTC, datetime

import sqlalchemy as sa

from server.devices.tables import Device
from server.rollouts.engine import RolloutEngine
from tests.helpers.dashboard import signed_in
from tests.helpers.device_rows import device_row
from tests.helpers.fleet_sim import Behaviour
from tests.helpers.rollout_lab import drive, rollout_body

ARM = {"arch": "aarch64", "execution_providers": ["XnnpackExecutionProvider", "CPUExecutionProvider"]}


def test_summary_counts_the_fleet_rollouts_and_failures(app_client, admin_headers, make_token, ctx, lab):
    now = datetime.now(UTC)
    with ctx.db.session_scope() as s:
        s.execute(sa.insert(Device.__table__), [
            device_row("arm-0", now, status="offline", arch="aarch64", hardware=ARM,
                       serving={"det": "1.0.0"}),
            device_row("arm-1", now, status="offline", arch="aarch64", hardware=ARM,
                       serving={"det": "1.0.0", "kws": "0.1.0"}),
            device_row("gone", now, status="decommissioned", serving={"det": "9.9.9"}),
        ])  # fmt: skip
    lab.behaviours["3.0.0"] = Behaviour(install_fails=True)
    bad = app_client.post("/api/v1/rollouts", json=rollout_body("3.0.0"), headers=admin_headers).json()
    assert drive(RolloutEngine(ctx), lab, app_client, admin_headers, bad["id"])["status"] == "rolled_back"
    stages = [{"percent": 10, "soak_s": 3600}, {"percent": 100, "soak_s": 0}]
    r = app_client.post("/api/v1/rollouts", json=rollout_body("2.0.0", stages=stages), headers=admin_headers)
    rid = r.json()["id"]
    RolloutEngine(ctx).tick()  # the canary (one device of ten) is told: in progress
    (told,) = app_client.get("/api/v1/fleet/summary", headers=admin_headers).json()["rollouts"]
    assert (told["devices"], told["succeeded"], told["failed"], told["in_progress"]) == (10, 0, 0, 1)
    lab.step()  # the canary installs 2.0.0

    r = app_client.get("/api/v1/fleet/summary", headers=admin_headers)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["devices"] == 13
    assert body["by_status"] == {"online": 10, "offline": 2, "decommissioned": 1}
    assert body["by_version"] == [
        {"model": "det", "version": "1.0.0", "devices": 11},
        {"model": "det", "version": "2.0.0", "devices": 1},
        {"model": "kws", "version": "0.1.0", "devices": 1},
    ]  # the decommissioned device's 9.9.9 is left out
    assert body["by_arch"] == {"aarch64": 2, "x86_64": 10}
    assert body["by_execution_providers"] == [
        {"execution_providers": ["CPUExecutionProvider"], "devices": 10},
        {"execution_providers": ["XnnpackExecutionProvider", "CPUExecutionProvider"], "devices": 2},
    ]
    (running,) = body["rollouts"]  # the rolled-back one is neither running nor paused
    assert running["id"] == rid
    assert (running["status"], running["current_stage"], running["stages"]) == ("running", 0, 2)
    assert (running["devices"], running["succeeded"], running["failed"], running["in_progress"]) == (
        10, 1, 0, 0,
    )  # fmt: skip
    (failure,) = body["failures"]  # the failed rollout's canary
    assert (failure["rollout_id"], failure["version"], failure["phase"]) == (bad["id"], "3.0.0", "failed")
    assert failure["reason"] == "validation vectors do not match"
    assert app_client.get("/api/v1/fleet/summary").status_code == 401

    signed_in(app_client, make_token("viewer"))
    page = app_client.get("/ui/").text
    assert re.search(r'offline</span></td><td class="num">2<', page)
    assert re.search(r'<td>det 2.0.0</td><td class="num">1<', page)
    assert re.search(r'XnnpackExecutionProvider, CPUExecutionProvider</td><td class="num">2<', page)
    assert f'href="/ui/rollouts/{rid}"' in page
    assert "1 / 10" in page
    assert f'<a href="/ui/devices/{failure["device_id"]}">' in page.split('id="failures"')[1]
