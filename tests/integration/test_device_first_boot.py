"""First boot of a factory image: ``fleet device run --token-file PATH --server URL`` on a data
directory without an identity enrolls, deletes the token file, and serves; a device already
enrolled ignores the file; a refused token leaves it in place and the daemon exits with an error."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import httpx
import pytest

from tests.helpers.device_fleet import DaemonProcess, auth, device_record, enroll_device, wait_for

pytestmark = pytest.mark.mqtt


def run_command(data: Path, token_file: Path, server: str) -> list[str]:
    return [
        sys.executable, "-m", "server.cli", "device", "run", "--data-dir", str(data),
        "--token-file", str(token_file), "--server", server,
    ]  # fmt: skip


def new_token(live) -> str:
    r = httpx.post(f"{live.url}/api/v1/enroll-tokens", json={}, headers=auth(live))
    r.raise_for_status()
    return str(r.json()["token"])


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_first_boot_enrolls_and_deletes_the_token_file(live_server, tmp_path):
    data, token_file = tmp_path / "dev", tmp_path / "enroll-token"
    token_file.write_text(new_token(live_server) + "\n")
    daemon = DaemonProcess(
        data,
        tmp_path / "run.log",
        command=run_command(data, token_file, live_server.url),
        enroll_insecure_http="true",
    )
    try:
        daemon.wait_api(60)
        device_id = json.loads((data / "identity.json").read_text())["device_id"]
        assert not token_file.exists()
        wait_for(lambda: device_record(live_server, device_id)["status"] == "online", what="online")
        assert "first boot: enrolled as" in daemon.log.read_text()
    finally:
        daemon.terminate()


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_an_enrolled_device_ignores_the_token_file(live_server, tmp_path):
    data, token_file = tmp_path / "dev", tmp_path / "enroll-token"
    enroll_device(live_server, data, "edge-old")
    token_file.write_text("not-a-token")
    daemon = DaemonProcess(
        data,
        tmp_path / "run.log",
        command=run_command(data, token_file, live_server.url),
        enroll_insecure_http="true",
    )
    try:
        daemon.wait_api(60)
        assert token_file.read_text() == "not-a-token"
        assert json.loads((data / "identity.json").read_text())["device_id"] == "edge-old"
    finally:
        daemon.terminate()


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_refused_token_keeps_the_file_and_fails(live_server, tmp_path):
    data, token_file = tmp_path / "dev", tmp_path / "enroll-token"
    token_file.write_text("not-a-token")
    daemon = DaemonProcess(
        data,
        tmp_path / "run.log",
        command=run_command(data, token_file, live_server.url),
        enroll_insecure_http="true",
    )
    assert daemon.proc.wait(60) == 1
    assert token_file.read_text() == "not-a-token"
    assert not (data / "identity.json").exists()
    assert "error:" in daemon.log.read_text()
