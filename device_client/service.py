"""The device daemon's systemd unit (``fleet device install-service``): :func:`render_unit` writes
``deploy/systemd/fleetota-device.service`` for a given user, data directory, token file and
``fleet`` executable; :func:`install` writes it and enables it with the ``systemctl`` on ``PATH``."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

UNIT_NAME = "fleetota-device.service"
DEFAULT_UNIT_DIR = Path("/etc/systemd/system")
DEFAULT_EXEC = Path("/usr/local/bin/fleet")
DEFAULT_USER = "fleetota"
DEFAULT_DATA_DIR = Path("/var/lib/fleetota")


class ServiceInstallError(RuntimeError):
    """``systemctl`` failed; the unit written stays in place."""


@dataclass(frozen=True)
class UnitOptions:
    user: str = DEFAULT_USER
    data_dir: Path = DEFAULT_DATA_DIR
    token_file: Path | None = None
    server_url: str | None = None
    executable: Path = DEFAULT_EXEC
    memory_max: str = "512M"
    watchdog_s: int = 60


def render_unit(opts: UnitOptions) -> str:
    """The unit's text. The data directory is the only writable path (``ReadWritePaths=``); under
    ``/var/lib`` systemd creates it for the user (``StateDirectory=``)."""
    data = opts.data_dir
    state_dir = ""
    if data.parent == Path("/var/lib"):
        state_dir = f"StateDirectory={data.name}\nStateDirectoryMode=0700\n"
    run = f"{opts.executable} device run --data-dir {data}"
    if opts.token_file is not None:
        run += f" --token-file {opts.token_file}"
    if opts.server_url is not None:
        run += f" --server {opts.server_url}"
    # the token file is deleted after enrollment: its directory must be writable too
    writable = [str(data)]
    if opts.token_file is not None and opts.token_file.parent != data:
        writable.append(f"-{opts.token_file.parent}")
    return f"""[Unit]
Description=fleetota device daemon (model updates and local inference)
Wants=network-online.target
After=network-online.target
StartLimitIntervalSec=600
StartLimitBurst=5

[Service]
Type=notify
NotifyAccess=main
ExecStart={run}
Restart=on-failure
RestartSec=5
WatchdogSec={opts.watchdog_s}
TimeoutStopSec=45
User={opts.user}
Group={opts.user}
{state_dir}ReadWritePaths={" ".join(writable)}
Environment=FLEET_DEVICE_DATA_DIR={data}
NoNewPrivileges=yes
ProtectSystem=strict
ProtectHome=yes
PrivateTmp=yes
PrivateDevices=yes
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectControlGroups=yes
RestrictSUIDSGID=yes
LockPersonality=yes
RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6 AF_NETLINK
MemoryMax={opts.memory_max}
TasksMax=256

[Install]
WantedBy=multi-user.target
"""


def install(opts: UnitOptions, unit_dir: Path = DEFAULT_UNIT_DIR, *, enable: bool = True) -> list[str]:
    """Write the unit into ``unit_dir``; unless ``enable`` is False or there is no ``systemctl``
    on ``PATH``, reload systemd and enable the unit. Returns what was done, one line each.
    :class:`ServiceInstallError` when ``systemctl`` fails: the unit is left in place (it is what
    was asked for; enabling can be retried by hand once the cause is fixed)."""
    unit_dir.mkdir(parents=True, exist_ok=True)
    path = unit_dir / UNIT_NAME
    path.write_text(render_unit(opts))
    done = [f"wrote {path}"]
    systemctl = shutil.which("systemctl")
    if not enable:
        return done
    if systemctl is None:
        return [*done, "systemctl not found: not enabled"]
    for args in (["daemon-reload"], ["enable", UNIT_NAME]):
        proc = subprocess.run([systemctl, *args], capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            said = (proc.stderr or proc.stdout).strip().splitlines()
            raise ServiceInstallError(
                f"{systemctl} {' '.join(args)} failed (exit {proc.returncode})"
                + (f": {said[-1]}" if said else "")
                + f"; {path} is left in place: run `systemctl daemon-reload && systemctl enable "
                f"{UNIT_NAME}` once that is fixed"
            )
    return [*done, f"enabled {UNIT_NAME} (systemctl start {UNIT_NAME} starts it)"]
