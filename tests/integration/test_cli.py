"""The `fleet` CLI against a live server: tokens, enrollment tokens, model push, devices, rollouts."""

from __future__ import annotations

import threading

import pytest
from click.testing import CliRunner

from server.cli import main
from tests.helpers.fleet_sim import Behaviour, SimFleet
from tests.helpers.pki import HARDWARE, make_csr

pytestmark = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)


def run(args, env, code=0):
    result = CliRunner().invoke(main, args, env=env, catch_exceptions=False)
    assert result.exit_code == code, result.output
    return result.output


def test_cli_end_to_end(live_server, onnx_model):
    s = live_server.settings
    local_env = {"FLEET_DATA_DIR": str(s.data_dir), "FLEET_DATABASE_URL": s.database_url}
    token = run(["admin", "token", "create", "--role", "operator"], local_env).strip()
    assert token.startswith("fa.")
    env = {"FLEET_URL": live_server.url, "FLEET_TOKEN": token}

    out = run(["model", "push", "det", "1.0.0", str(onnx_model("a.onnx"))], env)
    assert "published det 1.0.0 (release 1)" in out
    run(["model", "push", "det", "2.0.0", str(onnx_model("b.onnx", scale=2.0))], env)
    out = run(["model", "push", "det", "2.0.0", str(onnx_model("c.onnx"))], env, code=1)
    assert "409" in out
    assert "2.0.0" in run(["model", "ls", "det"], env)

    enroll = run(["enroll-token", "create", "--tags", "site=lab", "--uses", "4"], env).strip()
    import httpx

    ids = []
    for i in range(4):
        csr, _ = make_csr(f"cli-{i}")
        r = httpx.post(
            f"{live_server.url}/api/v1/enroll", json={"token": enroll, "csr_pem": csr, "hardware": HARDWARE}
        )
        assert r.status_code == 201, r.text
        ids.append(r.json()["device_id"])
    listing = run(["devices", "ls", "--tag", "site=lab"], env)
    assert all(i in listing for i in ids)
    assert "site=lab" in run(["devices", "tag", "cli-0", "ring=canary"], env)

    fleet = SimFleet(live_server.ctx, ids, behaviours={"2.0.0": Behaviour(error_rate=0.5)})
    fleet.start()
    stop = threading.Event()

    def act():
        while not stop.wait(0.1):
            fleet.step()
            fleet.health()

    actor = threading.Thread(target=act, daemon=True)
    actor.start()
    try:
        out = run(
            [
                "rollout",
                "start",
                "det",
                "1.0.0",
                "--stages",
                "50,100",
                "--soak",
                "0",
                "--tag",
                "site=lab",
                "--wait",
            ],
            env,
        )
        assert "completed" in out
        out = run(
            [
                "rollout",
                "start",
                "det",
                "2.0.0",
                "--stages",
                "25,100",
                "--soak",
                "0",
                "--tag",
                "site=lab",
                "--on-failure",
                "rollback",
                "--gate",
                "max_error_rate=0.05",
                "--wait",
            ],
            env,
            code=3,
        )
        assert "rolled_back" in out
    finally:
        stop.set()
        actor.join()
    assert {d.serving["det"] for d in fleet.devices.values()} == {"1.0.0"}
    bad = run(["rollout", "start", "det", "9.9.9", "--tag", "site=lab"], env, code=1)
    assert "404" in bad
    assert "invalid gate" in run(["rollout", "start", "det", "1.0.0", "--gate", "nonsense"], env, code=2)
