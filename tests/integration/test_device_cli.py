"""``fleet device enroll|run|status`` as an installer runs them: the real ``fleet`` entry point in a
subprocess against a live server (Mosquitto included); CliRunner only where no server is needed."""

from __future__ import annotations

import json
import stat
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
from click.testing import CliRunner

from server.cli import main
from tests.helpers.device_fleet import (
    DaemonProcess,
    assign,
    auth,
    device_record,
    enroll_device,
    infer,
    outcome_for,
    push_model,
    wait_for,
)
from tests.helpers.onnx_models import make_model

pytestmark = [pytest.mark.mqtt, pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)]

FLEET = Path(sys.executable).with_name("fleet")


def fleet(*args: str) -> subprocess.CompletedProcess[str]:
    assert FLEET.exists(), f"the fleet entry point is not installed next to {sys.executable}"
    return subprocess.run([str(FLEET), *args], capture_output=True, text=True, timeout=120)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_device_enroll_stores_the_identity_with_its_modes(live_server, tmp_path):
    live = live_server
    r = httpx.post(f"{live.url}/api/v1/enroll-tokens", json={"tags": {"site": "lab"}}, headers=auth(live))
    r.raise_for_status()
    token = r.json()["token"]
    data = tmp_path / "dev"

    # a malformed tag is refused before anything is created or sent (the token stays unused)
    bad = CliRunner().invoke(
        main, ["device", "enroll", "--server", live.url, "--token", token, "--data-dir", str(data),
               "--tags", "site=lab,ring"],
    )  # fmt: skip
    assert bad.exit_code == 2, bad.output
    assert "invalid tag 'ring': expected key=value" in bad.output
    assert not data.exists()

    done = fleet(
        "device", "enroll", "--server", live.url, "--token", token, "--data-dir", str(data),
        "--device-id", "cli-dev", "--tags", "site=lab, ring=canary", "--tags", "hw=pi", "--insecure-http",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "enrolled as cli-dev" in done.stdout
    assert "tags: site=lab" in done.stdout  # what the token gave, not what was asked for
    assert "differ from the enrollment token's" in done.stderr

    identity = json.loads((data / "identity.json").read_text())
    assert identity["device_id"] == "cli-dev"
    assert identity["tags"] == {"site": "lab"}
    assert identity["requested_tags"] == {"site": "lab", "ring": "canary", "hw": "pi"}
    assert device_record(live, "cli-dev")["tags"] == {"site": "lab"}
    modes = {
        ".": 0o700,
        "identity.json": 0o600,
        "device.key": 0o600,
        "device.crt": 0o644,
        "ca.crt": 0o644,
        "director.pem": 0o644,
        "tuf": 0o700,
        "tuf/root.json": 0o644,
    }
    assert {name: mode(data / name) for name in modes} == modes
    assert sorted(p.relative_to(data).as_posix() for p in data.rglob("*")) == sorted(set(modes) - {"."})

    again = fleet(
        "device", "enroll", "--server", live.url, "--token", token, "--data-dir", str(data), "--insecure-http"
    )  # fmt: skip
    assert again.returncode == 1
    assert "already enrolled" in again.stderr


def test_device_run_then_status(live_server, tmp_path):
    live = live_server
    data = tmp_path / "dev"
    enroll_device(live, data, "cli-run")
    push_model(live, "clf", "1.0.0", make_model(tmp_path / "v1.onnx", scale=1.0))
    daemon = DaemonProcess(
        data, tmp_path / "run.log", command=[str(FLEET), "device", "run", "--data-dir", str(data)]
    )
    try:
        daemon.wait_api()
        seq = assign(live, "cli-run", "clf", "1.0.0", probation={"seconds": 0.2, "min_requests": 0})["seq"]
        assert outcome_for(live, "cli-run", seq)["phase"] == "succeeded"
        status, body = infer(daemon.url, np.ones((1, 4), np.float32))
        assert (status, body["version"]) == (200, "1.0.0")
        # the finished update is cleared from the state file (status reads it while the daemon runs)
        wait_for(
            lambda: json.loads(fleet("device", "status", "--data-dir", str(data)).stdout)["update"] is None,
            what="the update cleared",
        )
    finally:
        daemon.terminate()  # SIGTERM: the daemon stops cleanly
    assert daemon.proc.returncode == 0, daemon.log_tail()
    assert "device cli-run stopped" in (tmp_path / "run.log").read_text()

    shown = fleet("device", "status", "--data-dir", str(data))
    assert shown.returncode == 0, shown.stderr
    doc = json.loads(shown.stdout)
    mqtt = doc.pop("mqtt")  # the link as the daemon last recorded it: stopped cleanly
    assert (mqtt["state"], mqtt["daemon_running"], mqtt["last_error"]) == ("stopped", False, None)
    assert doc == {
        "source": "primary",
        "serving": {"clf": "1.0.0"},
        "previous": {},
        "shadow": {},
        "release_floor": {"clf": 1},
        "last_desired_seq": seq,
        "update": None,
    }

    missing = CliRunner().invoke(main, ["device", "status", "--data-dir", str(tmp_path / "nowhere")])
    assert missing.exit_code == 1
    assert "does not exist" in missing.output
