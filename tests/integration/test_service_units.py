"""The systemd units: the shipped device unit is what ``fleet device install-service`` writes by
default, both units carry the hardening the README promises, and ``systemd-analyze verify``
accepts them where the tool exists."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from device_client.cli import device
from device_client.service import UnitOptions, render_unit

REPO = Path(__file__).resolve().parents[2]
UNITS = REPO / "deploy" / "systemd"
REQUIRED = (
    "Type=notify",
    "Restart=on-failure",
    "StartLimitBurst=",
    "WatchdogSec=",
    "User=fleetota",
    "StateDirectory=",
    "ReadWritePaths=",
    "NoNewPrivileges=yes",
    "ProtectSystem=strict",
    "ProtectHome=yes",
    "PrivateTmp=yes",
    "MemoryMax=",
)


def test_the_shipped_device_unit_is_the_default_render():
    assert (UNITS / "fleetota-device.service").read_text() == render_unit(UnitOptions())


@pytest.mark.parametrize("name", ["fleetota-device.service", "fleetota-server.service"])
def test_units_are_hardened(name):
    lines = (UNITS / name).read_text().splitlines()
    for key in REQUIRED:
        assert any(line.startswith(key) for line in lines), f"{name} lacks {key}"


def test_install_service_writes_the_unit_without_enabling(tmp_path):
    token = tmp_path / "etc" / "enroll-token"
    result = CliRunner().invoke(
        device,
        [
            "install-service",
            "--data-dir", str(tmp_path / "data"),
            "--token-file", str(token),
            "--server", "https://fleet.example",
            "--unit-dir", str(tmp_path / "units"),
            "--no-enable",
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    unit = (tmp_path / "units" / "fleetota-device.service").read_text()
    assert f"--data-dir {tmp_path / 'data'} --token-file {token} --server https://fleet.example" in unit
    assert f"ReadWritePaths={tmp_path / 'data'} -{token.parent}\n" in unit
    assert "StateDirectory=" not in unit  # not under /var/lib: the installer creates the directory
    assert "enabled" not in result.output


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
@pytest.mark.parametrize("name", ["fleetota-device.service", "fleetota-server.service"])
def test_systemd_analyze_verify(tmp_path, name):
    # verify wants ExecStart's program to exist: point it at this install's `fleet`
    fleet = Path(sys.executable).with_name("fleet")
    text = (UNITS / name).read_text().replace("/usr/local/bin/fleet", str(fleet))
    unit = tmp_path / name
    unit.write_text(text)
    proc = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(unit)], capture_output=True, text=True, timeout=60
    )
    problems = [
        line
        for line in (proc.stdout + proc.stderr).splitlines()
        if name in line or "fleetota" in line.lower()
    ]
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert problems == []
