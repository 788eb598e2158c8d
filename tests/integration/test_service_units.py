"""The systemd units: the shipped device unit is what ``fleet device install-service`` writes by
default, both units carry the hardening the README promises, ``install-service`` runs the
``systemctl`` on ``PATH`` (a recording script here) and reports its failure, and
``systemd-analyze verify`` accepts them where the tool exists."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from device_client.cli import device
from device_client.service import DEFAULT_EXEC, UnitOptions, render_unit

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


def fake_systemctl(bindir: Path, log: Path, fail_on: str | None = None) -> None:
    """An executable ``systemctl`` first on ``PATH`` recording each call's argv (one line each);
    it exits 1 with a message on stderr when its first argument is ``fail_on``."""
    bindir.mkdir()
    script = bindir / "systemctl"
    script.write_text(
        "#!/bin/sh\n"
        f'echo "$@" >> "{log}"\n'
        f'if [ "$1" = "{fail_on or "-"}" ]; then echo "Failed to $1: Access denied" >&2; exit 1; fi\n'
    )
    script.chmod(0o755)
    os.environ["PATH"] = f"{bindir}{os.pathsep}{os.environ['PATH']}"


def install_args(tmp_path: Path) -> list[str]:
    return ["install-service", "--data-dir", str(tmp_path / "data"), "--unit-dir", str(tmp_path / "units")]


def expected_unit(tmp_path: Path) -> str:
    fleet = shutil.which("fleet")
    return render_unit(
        UnitOptions(data_dir=tmp_path / "data", executable=Path(fleet) if fleet else DEFAULT_EXEC)
    )


def test_install_service_reloads_and_enables_with_systemctl(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", os.environ["PATH"])  # restored after the test
    log = tmp_path / "systemctl.log"
    fake_systemctl(tmp_path / "bin", log)
    result = CliRunner().invoke(device, install_args(tmp_path))
    assert result.exit_code == 0, result.output
    assert log.read_text().splitlines() == ["daemon-reload", "enable fleetota-device.service"]
    unit = (tmp_path / "units" / "fleetota-device.service").read_text()
    assert unit == expected_unit(tmp_path)
    assert "enabled fleetota-device.service" in result.output


def test_install_service_reports_a_failing_systemctl_and_keeps_the_unit(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", os.environ["PATH"])
    log = tmp_path / "systemctl.log"
    fake_systemctl(tmp_path / "bin", log, fail_on="enable")
    result = CliRunner().invoke(device, install_args(tmp_path))
    assert result.exit_code == 1
    assert log.read_text().splitlines() == ["daemon-reload", "enable fleetota-device.service"]
    assert "enable fleetota-device.service failed (exit 1): Failed to enable: Access denied" in result.output
    assert "is left in place" in result.output
    assert "enabled" not in result.output.replace("enable fleetota", "")
    # the unit stays, as written
    assert (tmp_path / "units" / "fleetota-device.service").read_text() == expected_unit(tmp_path)


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
