"""Secrets and defaults: keys and tokens never reach a log, key files are 0600,
and the server refuses a public bind with development defaults unless told to.
"""

from __future__ import annotations

import logging
import os
import stat
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from device_client.daemon import Daemon
from server.config import Settings
from server.runner import InsecureBind, check_bind
from tests.helpers.device_fleet import assign, auth, device_settings, enroll_device, outcome_for, push_model
from tests.helpers.onnx_models import make_model

KEY_MARKERS = ("PRIVATE KEY", "private_key", "BEGIN EC", "BEGIN OPENSSH")


def _pem_body_lines(path: Path) -> list[str]:
    """The base64 lines of a private key PEM (any of them in a log would leak key material)."""
    return [ln for ln in path.read_text().splitlines() if ln and not ln.startswith("-----")]


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.mqtt
def test_keys_and_tokens_never_logged_and_key_files_are_0600(live_server, tmp_path, caplog, capfd):
    # protection: no log statement on the enrollment, token, push, signing, download or daemon
    # paths formats a secret; every private key file is written with mode 0600 (keys.py, enroll.py)
    caplog.set_level(logging.DEBUG)
    live = live_server
    r = httpx.post(
        f"{live.url}/api/v1/admin/tokens",
        json={"name": "ci", "role": "operator"},
        headers=auth(live, "admin"),
    )
    assert r.status_code == 201
    admin_token = r.json()["token"]
    r = httpx.post(f"{live.url}/api/v1/enroll-tokens", json={}, headers=auth(live))
    enroll_token = r.json()["token"]
    dev_dir = tmp_path / "dev"
    ident = enroll_device(live, dev_dir, "edge-secrets")
    push_model(live, "clf", "1.0.0", make_model(tmp_path / "onnx" / "m.onnx"))
    daemon = Daemon(device_settings(dev_dir)).start()
    try:
        seq = assign(live, "edge-secrets", "clf", "1.0.0", probation={"seconds": 0.2, "min_requests": 0})[
            "seq"
        ]
        assert outcome_for(live, "edge-secrets", seq)["phase"] == "succeeded"
    finally:
        daemon.stop()

    s = live.settings
    key_files = sorted({*s.key_dir.glob("*.key"), *s.broker_dir.glob("*.key"), dev_dir / "device.key"})
    assert {p.name for p in key_files} >= {
        "fleet-ca.key",
        "director.key",
        "tuf-root.key",
        "tuf-targets.key",
        "tuf-snapshot.key",
        "tuf-timestamp.key",
        "broker.key",
        "fleet_server.key",
        "device.key",
    }
    secrets = {
        "admin token": admin_token,
        "admin token secret": admin_token.rsplit(".", 1)[1],
        "enrollment token": enroll_token,
        "enrollment token secret": enroll_token.rsplit(".", 1)[1],
        "device token": ident.device_token,
        "device token secret": ident.device_token.rsplit(".", 1)[1],
        "operator token (test helper)": auth(live)["Authorization"].split()[1],
    }
    for path in key_files:
        for i, line in enumerate(_pem_body_lines(path)):
            secrets[f"{path.name} line {i}"] = line
    out, err = capfd.readouterr()
    logs = {
        "python logging": caplog.text,
        "stdout/stderr": out + err,
        "mosquitto log": (s.broker_dir / "mosquitto.log").read_text(errors="replace"),
    }
    assert "report" in caplog.text  # the logs were captured
    assert "published target" in caplog.text
    for where, text in logs.items():
        for what, value in secrets.items():
            assert value not in text, f"{what} appears in the {where}"
        for marker in KEY_MARKERS:
            assert marker not in text, f"{marker!r} appears in the {where}"

    # key files 0600 and their directories 0700; identity.json (holds the device token) 0600
    for path in key_files:
        assert _mode(path) == 0o600, f"{path} is {oct(_mode(path))}"
    for d in (s.key_dir, s.broker_dir, dev_dir):
        assert _mode(d) == 0o700, f"{d} is {oct(_mode(d))}"
    assert _mode(dev_dir / "identity.json") == 0o600


def _settings(tmp_path: Path, **kw) -> Settings:
    return Settings(data_dir=tmp_path / "data", **kw)


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.0.2.10"])
def test_public_bind_with_development_defaults_is_refused(tmp_path, host):
    # protection: server.runner.check_bind
    with pytest.raises(InsecureBind) as exc:
        check_bind(_settings(tmp_path, host=host))
    assert str(exc.value) == (
        f"refusing to listen on {host} with development defaults: SQLite database; embedded Mosquitto "
        "(no FLEET_MQTT_URL); plain-HTTP public URL (terminate TLS in front and set "
        "FLEET_PUBLIC_URL=https://...). Configure production settings or set FLEET_ALLOW_INSECURE_BIND=1."
    )


def test_public_bind_allowed_when_told_or_when_configured_for_production(tmp_path):
    check_bind(_settings(tmp_path, host="127.0.0.1"))
    check_bind(_settings(tmp_path, host="0.0.0.0", allow_insecure_bind=True))
    check_bind(
        _settings(
            tmp_path,
            host="0.0.0.0",
            database_url="postgresql+psycopg://fleet@db/fleet",
            mqtt_url="mqtts://broker.example:8883",
            public_url="https://fleet.example",
        )
    )
    with pytest.raises(
        InsecureBind, match=r"refusing to listen on 0\.0\.0\.0 with development defaults: SQLite"
    ):
        check_bind(
            _settings(
                tmp_path,
                host="0.0.0.0",
                mqtt_url="mqtts://broker.example:8883",
                public_url="https://fleet.example",
            )
        )


def test_cli_server_run_on_a_public_address_exits_non_zero(tmp_path):
    # protection: run_server calls check_bind before anything is started or listening
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEET_")}
    env["FLEET_DATA_DIR"] = str(tmp_path / "data")
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "fleet"), "server", "run", "--host", "0.0.0.0", "--port", "1"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert proc.returncode != 0
    assert "refusing to listen on 0.0.0.0 with development defaults" in proc.stderr
    assert "FLEET_ALLOW_INSECURE_BIND=1" in proc.stderr
    assert not (tmp_path / "data" / "keys").exists()  # refused before any key or broker was made


def test_cli_server_run_with_an_empty_host_exits_non_zero(tmp_path):
    # protection: Settings refuses FLEET_HOST="" (uvicorn would listen on every interface, and ""
    # must not pass for loopback in check_bind)
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEET_")}
    env["FLEET_DATA_DIR"] = str(tmp_path / "data")
    env["FLEET_HOST"] = ""
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "fleet"), "server", "run", "--port", "1"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert proc.returncode == 2, proc.stderr
    stderr = " ".join(proc.stderr.split())
    assert "error: invalid settings: FLEET_HOST: must not be empty" in stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "data" / "keys").exists()  # refused before any key or broker was made
