"""The scripts in ``examples/`` run as a user runs them (a subprocess with ``FLEET_URL`` and
``FLEET_TOKEN``) against a live server and real device daemons."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.device_fleet import push_model, wait_for
from tests.helpers.onnx_models import make_model
from tests.helpers.rollout_e2e import MODEL, Fleet, Traffic, rollout_body

pytestmark = pytest.mark.mqtt

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def run_example(live, name: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "FLEET_URL": live.url, "FLEET_TOKEN": live.token("operator")}
    return subprocess.run(
        [sys.executable, str(EXAMPLES / name), *args], env=env, capture_output=True, text=True, timeout=90
    )


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_emergency_rollback_rolls_back_every_active_rollout_of_the_model(live_server, tmp_path):
    for version, scale in (("1.0.0", 1.0), ("2.0.0", 2.0)):
        push_model(live_server, MODEL, version, make_model(tmp_path / f"{version}.onnx", scale=scale))
    fleet = Fleet(live_server, tmp_path / "devices", 2)
    try:
        fleet.start()
        fleet.install("1.0.0")
        # the first stage reaches one device, then soaks far longer than the test
        stages = [{"percent": 50, "soak_s": 3600}, {"percent": 100, "soak_s": 1}]
        created = fleet.client.create_rollout(rollout_body("2.0.0", stages))
        wait_for(lambda: "2.0.0" in fleet.serving().values(), timeout=60, what="the canary serves 2.0.0")
        assert fleet.client.get_rollout(created["id"])["status"] == "running"

        done = run_example(live_server, "emergency_rollback.py", MODEL)
        assert done.returncode == 0, done.stderr
        assert f"{created['id']} 2.0.0: running -> rolling_back" in done.stdout
        wait_for(
            lambda: fleet.client.get_rollout(created["id"])["status"] == "rolled_back",
            timeout=60,
            what="rolled back",
        )
        wait_for(lambda: set(fleet.serving().values()) == {"1.0.0"}, timeout=60, what="1.0.0 everywhere")
        # nothing active is left: a second run has nothing to do
        again = run_example(live_server, "emergency_rollback.py", MODEL)
        assert (again.returncode, again.stdout) == (0, "")
    finally:
        fleet.close()


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_canary_by_site_promotes_after_the_verdict(live_server, tmp_path):
    for version, scale in (("1.0.0", 1.0), ("2.0.0", 2.0)):
        push_model(live_server, MODEL, version, make_model(tmp_path / f"{version}.onnx", scale=scale))
    fleet = Fleet(live_server, tmp_path / "devices", 3)
    other = Fleet(live_server, tmp_path / "elsewhere", 1, prefix="far", tags={"site": "far"})
    try:
        fleet.start()
        other.start()
        fleet.install("1.0.0")
        other.install("1.0.0")
        with Traffic(fleet):
            done = run_example(
                live_server, "canary_by_site.py", MODEL, "2.0.0", "--site", "lab",
                "--canary-percent", "34", "--soak-s", "1", "--min-requests", "5",
                "--max-p95-ratio", "0", "--probation-s", "0.5",
            )  # fmt: skip
        assert done.returncode == 0, done.stdout + done.stderr
        assert "canary updated; soaking 1 s" in done.stdout
        assert ": completed" in done.stdout
        assert '"passed": true' in done.stdout
        assert set(fleet.serving().values()) == {"2.0.0"}
        assert set(other.serving().values()) == {"1.0.0"}  # another site is untouched

        # the same rollout's health per stage, as CSV
        rollout_id = done.stdout.split()[1].rstrip(":")
        out = tmp_path / "health.csv"
        exported = run_example(live_server, "rollout_health_csv.py", rollout_id, str(out))
        assert exported.returncode == 0, exported.stderr
        with open(out, newline="") as fh:
            table = list(csv.DictReader(fh))
        assert [r["stage"] for r in table] == ["1", "2", "baseline"]
        assert int(table[0]["devices"]) < int(table[1]["devices"]) == 3  # the canary, then all
        assert all(r["rollout"] == rollout_id for r in table)
        assert int(table[1]["requests"]) >= 5
    finally:
        fleet.close()
        other.close()


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_weekly_waves_pause_between_waves_until_approved(live_server, tmp_path):
    for version, scale in (("1.0.0", 1.0), ("2.0.0", 2.0)):
        push_model(live_server, MODEL, version, make_model(tmp_path / f"{version}.onnx", scale=scale))
    fleet = Fleet(live_server, tmp_path / "devices", 3)
    args = [
        MODEL, "2.0.0", "--tag", "site=lab", "--waves", "30,60,100", "--soak-s", "1",
        "--min-requests", "5", "--max-p95-ratio", "0", "--probation-s", "0.5",
    ]  # fmt: skip
    approval = tmp_path / "approve-next-wave"

    def waves(*extra: str) -> subprocess.CompletedProcess[str]:
        return run_example(live_server, "weekly_waves.py", *args, *extra)

    def on_new() -> int:
        return sum(v == "2.0.0" for v in fleet.serving().values())

    try:
        fleet.start()
        fleet.install("1.0.0")
        with Traffic(fleet):
            started = waves()
            assert started.returncode == 0, started.stdout + started.stderr
            assert "wave 1 of 3 started" in started.stdout
            rid = started.stdout.split()[1].rstrip(":")

            def paused_in(stage: int) -> bool:
                state = fleet.client.get_rollout(rid)
                assert state["status"] in ("running", "paused"), state
                return state["status"] == "paused" and state["current_stage"] == stage

            for done in (1, 2):  # wave `done` passed: the rollout holds until approved
                wait_for(lambda d=done: paused_in(d), timeout=90, what=f"paused after wave {done}")
                state = fleet.client.get_rollout(rid)
                assert state["verdict"]["passed"] is True
                assert state["verdict"]["stage"] == done - 1
                assert "waits for approval to start stage" in state["reason"]
                assert on_new() == done

                held = waves()  # a daily run without approval: report, nothing moves
                assert held.returncode == 10, held.stdout + held.stderr
                assert f"wave {done} of 3 passed" in held.stdout
                assert f"wave {done + 1} waits for approval" in held.stdout
                phases = fleet.deployments(rid)
                assert {p for s, p, _ in phases.values() if s == done} == {"pending"}
                assert fleet.client.get_rollout(rid)["status"] == "paused"
                assert on_new() == done

                if done == 1:
                    approved = waves("--approve")
                else:
                    approval.touch()
                    approved = waves("--approval-file", str(approval))
                    assert not approval.exists()  # one approval, one wave
                assert approved.returncode == 0, approved.stdout + approved.stderr
                assert f"approved: wave {done + 1} of 3 started" in approved.stdout
                assert fleet.client.get_rollout(rid)["status"] == "running"

            wait_for(
                lambda: fleet.client.get_rollout(rid)["status"] == "completed", timeout=90, what="completed"
            )
        assert set(fleet.serving().values()) == {"2.0.0"}
        final = waves()
        assert (final.returncode, final.stdout.strip()) == (0, f"rollout {rid}: completed, all 3 waves")
        bad = run_example(live_server, "weekly_waves.py", MODEL, "3.0.0", "--tag", "site")
        assert bad.returncode == 2  # a usage error, not "waits for approval"
        assert "'site' is not KEY=VALUE" in bad.stderr
        refused = run_example(live_server, "weekly_waves.py", MODEL, "9.9.9", "--waves", "100")
        assert refused.returncode == 1, refused.stdout + refused.stderr  # no such version: an error
        assert refused.stderr.startswith("error: ")
        assert "Traceback" not in refused.stderr
    finally:
        fleet.close()
