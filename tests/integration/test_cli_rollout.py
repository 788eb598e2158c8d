"""`fleet rollout status|pause|resume|abort|rollback ID` and `fleet rollout start --wait` on a rollout
that pauses. The CLI talks HTTP to the real app in-process (the TestClient's ASGI transport under
the CLI's own FleetClient): no uvicorn and no broker needed; the engine and the simulated fleet
are the real ones of the rollout lab (tests/helpers/rollout_lab.py)."""

from __future__ import annotations

import io
import json
import logging
import re
import threading
import time

import pytest

from device_client.console import CliConsole
from server.client import FleetClient
from server.rollouts.engine import RolloutEngine
from server.views import follow_rollout
from tests.helpers.cli_app import BOX, cli_against
from tests.helpers.fleet_sim import Behaviour, SimFleet
from tests.helpers.rollout_lab import make_lab, rollout_body

pytestmark = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


@pytest.fixture
def lab(app_client, admin_headers, ctx, onnx_model) -> SimFleet:
    """Ten simulated devices serving det 1.0.0, with 2.0.0 published."""
    return make_lab(app_client, admin_headers, ctx, onnx_model, baseline=False)


@pytest.fixture
def fleet_cli(app_client, monkeypatch, make_token):
    """Run `fleet ...` against the app; returns its output as words (rich's wrapping and table
    borders removed)."""
    return cli_against(app_client, monkeypatch, make_token("operator"))


def create(app_client, admin_headers, **over) -> str:
    r = app_client.post("/api/v1/rollouts", json=rollout_body("2.0.0", **over), headers=admin_headers)
    assert r.status_code == 201, r.text
    return r.json()["id"]


def test_status_and_the_operator_actions(app_client, admin_headers, ctx, lab, fleet_cli):
    engine = RolloutEngine(ctx)
    rid = create(app_client, admin_headers, stages=[{"count": 2, "soak_s": 0}, {"percent": 100, "soak_s": 0}])
    engine.tick()
    out = fleet_cli("rollout", "status", rid)
    assert f"rollout {rid}: det 2.0.0" in out
    # one row per stage: index (< marks the current one), devices, succeeded, failed, in progress
    assert "1 < 2 0 0 2" in out
    assert "2 10 0 0 10" in out
    state = json.loads(fleet_cli("rollout", "status", rid, "--json"))
    assert (state["id"], state["status"], state["phases"]) == (rid, "running", {"notified": 2, "pending": 8})

    assert fleet_cli("rollout", "pause", rid) == f"rollout {rid}: paused"
    out = fleet_cli("rollout", "status", rid)
    assert out.endswith("paused by operator")  # the reason is the table's caption
    assert "1 2 0 0 2" in out  # no longer marked as the stage in progress
    out = fleet_cli("rollout", "pause", rid, code=1)
    assert out == f"error: server answered 409: rollout {rid} is paused: cannot go to paused"
    assert fleet_cli("rollout", "resume", rid) == f"rollout {rid}: running"
    assert fleet_cli("rollout", "abort", rid) == f"rollout {rid}: aborted"
    assert app_client.get(f"/api/v1/rollouts/{rid}", headers=admin_headers).json()["phases"] == {
        "notified": 2, "cancelled": 8,
    }  # fmt: skip
    out = fleet_cli("rollout", "resume", rid, code=1)
    assert "409" in out
    assert "aborted" in out


def test_rollback_command(app_client, admin_headers, ctx, lab, fleet_cli):
    engine = RolloutEngine(ctx)
    rid = create(app_client, admin_headers, stages=[{"percent": 100, "soak_s": 3600}])
    for _ in range(3):
        engine.tick()
        lab.step()
    assert fleet_cli("rollout", "rollback", rid) == f"rollout {rid}: rolling_back"
    for _ in range(3):
        lab.step()
        engine.tick()
    assert json.loads(fleet_cli("rollout", "status", rid, "--json"))["status"] == "rolled_back"
    assert {d.serving["det"] for d in lab.devices.values()} == {"1.0.0"}
    assert "409" in fleet_cli("rollout", "rollback", rid, code=1)


def test_start_wait_exits_2_when_the_rollout_pauses(app_client, admin_headers, ctx, lab, fleet_cli):
    """`--wait` follows the rollout while the engine runs it; a failing canary pauses it (on-failure
    pause) and the command exits 2, so a script can tell "needs an operator" from done or undone."""
    lab.behaviours["2.0.0"] = Behaviour(install_fails=True)
    engine = RolloutEngine(ctx)
    stop = threading.Event()

    def run_the_fleet() -> None:
        while not stop.wait(0.05):
            engine.tick()
            lab.step()
            lab.health()

    runner = threading.Thread(target=run_the_fleet, daemon=True)
    runner.start()
    try:
        out = fleet_cli(
            "rollout", "start", "det", "2.0.0", "--tag", "site=lab", "--stages", "10,100", "--soak", "0",
            "--on-failure", "pause", "--wait", code=2,
        )  # fmt: skip
    finally:
        stop.set()
        runner.join(10)
    assert "paused" in out
    rollouts = app_client.get("/api/v1/rollouts", headers=admin_headers).json()
    assert [(r["status"], r["current_stage"]) for r in rollouts] == [("paused", 0)]
    assert "failed" in rollouts[0]["reason"]


def test_status_table_names_the_status(app_client, admin_headers, lab, fleet_cli):
    rid = create(app_client, admin_headers)
    assert "running" in fleet_cli("rollout", "status", rid)


def follow_while_the_fleet_runs(
    app_client, admin_headers, ctx, lab, make_token, screen, console, before=None
) -> dict:
    """`fleet rollout start --wait`'s follow of a new rollout on ``console`` (writing to ``screen``)
    while the engine and the simulated fleet run it; ``before`` runs on the fleet's thread once the
    table is on ``screen``."""
    engine = RolloutEngine(ctx)
    rid = create(app_client, admin_headers)
    stop = threading.Event()

    def run_the_fleet() -> None:
        if before is not None:
            deadline = time.monotonic() + 30
            while "\u250f" not in screen.getvalue() and time.monotonic() < deadline:  # the table is up
                time.sleep(0.01)
            before()
        while not stop.wait(0.05):
            engine.tick()
            lab.step()
            lab.health()

    runner = threading.Thread(target=run_the_fleet, daemon=True)
    runner.start()
    try:
        client = FleetClient("http://testserver", make_token("operator"), transport=app_client._transport)
        return follow_rollout(console, client, rid, poll_s=0.05)
    finally:
        stop.set()
        runner.join(10)


def test_log_lines_print_above_the_live_table(app_client, admin_headers, ctx, lab, make_token):
    """On a terminal `--wait` redraws its table in place. A log record written meanwhile (`fleet
    demo` runs the server, engine warnings included, in the same process) is printed above the
    table on a line of its own, not glued to the table's last line for the next redraw to tear."""
    screen = io.StringIO()  # one terminal: the table (stdout) and the log (stderr) land on it
    console = CliConsole(file=screen, force_terminal=True, width=120)
    handler = logging.StreamHandler(screen)
    logging.getLogger().addHandler(handler)
    try:
        state = follow_while_the_fleet_runs(
            app_client, admin_headers, ctx, lab, make_token, screen, console,
            before=lambda: logging.getLogger("server.rollouts.engine").warning(
                "tick failed, retrying: database is locked"
            ),
        )  # fmt: skip
    finally:
        logging.getLogger().removeHandler(handler)
    assert state["status"] == "completed"
    lines = re.split(r"[\r\n]", ANSI.sub("", screen.getvalue()))
    assert "tick failed, retrying: database is locked" in lines
    assert not [line for line in lines if "database is locked" in line and BOX.search(line)]
    assert any(f"rollout {state['id']}: det 2.0.0 [completed]" in line for line in lines)


def test_a_piped_follow_prints_the_final_table_then_the_outcome(
    app_client, admin_headers, ctx, lab, make_token, monkeypatch
):
    """Piped (`| tee`), the follow prints only the final table, whole, and the outcome on a line of
    its own after it."""
    screen = io.StringIO()  # not a terminal
    monkeypatch.delenv("COLUMNS", raising=False)
    console = CliConsole(file=screen)
    state = follow_while_the_fleet_runs(app_client, admin_headers, ctx, lab, make_token, screen, console)
    assert state["status"] == "completed"
    out = screen.getvalue()
    lines = out.splitlines()
    assert "\x1b" not in out
    assert "…" not in out
    assert sum(1 for line in lines if "\u250f" in line) == 1  # one table: the final one
    assert lines[-2].startswith("\u2514")  # the table's bottom border ends its line
    assert lines[-1] == f"rollout {state['id']} completed"


def test_start_points_out_a_soak_shorter_than_the_health_window(app_client, ctx, lab, fleet_cli):
    from datetime import timedelta

    from device_client.protocol import HealthWindow
    from device_client.protocol.messages import utcnow

    device = sorted(lab.devices)[0]
    window = HealthWindow.build(
        device_id=device, seq=1, at=utcnow() - timedelta(seconds=20), window_s=10.0, model="det",
        version="1.0.0", requests=100, errors=0,
    )  # fmt: skip
    lab._send([(device, "health", window.to_json())])
    out = fleet_cli("rollout", "start", "det", "2.0.0", "--tag", "site=lab", "--stages", "100", "--soak", "5")
    assert "started: 10 devices in 1 stages" in out
    assert "warning: the soak of stage(s) 1 (5s) is shorter than the devices' health window (10s)" in out


def test_start_wait_completes_with_offline_devices_pending(app_client, admin_headers, ctx, lab, fleet_cli):
    """Offline devices do not hold a rollout back: it completes (exit 0) and says how many are
    still to take it when they return."""
    for d in sorted(lab.devices)[:3]:
        lab.presence(d, online=False)
    engine = RolloutEngine(ctx)
    stop = threading.Event()

    def run_the_fleet() -> None:
        while not stop.wait(0.05):
            engine.tick()
            lab.step()
            lab.health()

    runner = threading.Thread(target=run_the_fleet, daemon=True)
    runner.start()
    try:
        out = fleet_cli(
            "rollout", "start", "det", "2.0.0", "--tag", "site=lab", "--stages", "50,100", "--soak", "0",
            "--wait",
        )  # fmt: skip
    finally:
        stop.set()
        runner.join(10)
    assert "completed" in out
    assert "3 device(s) offline have not taken it yet: they will when they return" in out
    [rollout] = app_client.get("/api/v1/rollouts", headers=admin_headers).json()
    status = fleet_cli("rollout", "status", rollout["id"])
    assert status.endswith("3 device(s) offline, to update when they return")


def test_start_with_pause_after_waits_for_resume_between_stages(
    app_client, admin_headers, ctx, lab, fleet_cli
):
    out = fleet_cli("rollout", "start", "det", "2.0.0", "--stages", "20,100", "--soak", "0", "--pause-after")
    rid = re.search(r"rollout (\w+) started", out).group(1)
    state = json.loads(fleet_cli("rollout", "status", rid, "--json"))
    assert [s["pause_after"] for s in state["stages"]] == [True, False]  # never after the last
    engine = RolloutEngine(ctx)
    for _ in range(30):
        lab.step()
        lab.health()
        engine.tick()
        state = json.loads(fleet_cli("rollout", "status", rid, "--json"))
        if state["status"] != "running":
            break
    assert (state["status"], state["current_stage"]) == ("paused", 1), state["reason"]
    assert state["reason"].startswith("waits for approval to start stage 2")
    assert state["phases"] == {"succeeded": 2, "pending": 8}
    assert fleet_cli("rollout", "resume", rid) == f"rollout {rid}: running"
