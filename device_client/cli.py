"""``fleet device ...``: enroll this device, run the daemon, show its state.

Imports only click, rich and ``device_client`` (never ``server``), so it works with the device-only
install (``pip install fleetota[device]``). Heavy modules load inside the commands.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

import click

from .console import make_console

console = make_console()
err_console = make_console(stderr=True)  # errors: one line each, never wrapped


def _parse_tags(values: tuple[str, ...]) -> dict[str, str]:
    tags: dict[str, str] = {}
    for value in values:
        for part in filter(None, (p.strip() for p in value.split(","))):
            key, sep, val = part.partition("=")
            if not sep or not key or not val:
                raise click.BadParameter(f"invalid tag {part!r}: expected key=value")
            tags[key] = val
    return tags


data_dir_option = click.option(
    "--data-dir",
    type=click.Path(path_type=Path, file_okay=False),
    envvar="FLEET_DEVICE_DATA_DIR",
    required=True,
    help="the device's data directory (FLEET_DEVICE_DATA_DIR)",
)


@click.group()
def device() -> None:
    """Commands that run on the edge device."""


@device.command("enroll")
@click.option("--server", "server_url", required=True, help="control server URL, e.g. https://fleet.example")
@click.option("--token", required=True, envvar="FLEET_ENROLL_TOKEN", help="one-time enrollment token")
@data_dir_option
@click.option("--device-id", default=None, help="device id (default: a generated dev-<hex>)")
@click.option("--tags", multiple=True, help="expected tags k=v[,k=v] (the token's tags apply)")
@click.option(
    "--ca-file",
    type=click.Path(path_type=Path, dir_okay=False, exists=True),
    default=None,
    help="verify the server's certificate with this CA (PEM) instead of the system's; kept for the daemon",
)
@click.option(
    "--server-fingerprint",
    default=None,
    help="SHA-256 of the server's certificate (hex, colons allowed): only that certificate is accepted",
)
@click.option(
    "--insecure-http",
    is_flag=True,
    help="allow a plain http:// server URL (a lab only: anyone on the path can take the device over)",
)
def enroll_cmd(
    server_url: str,
    token: str,
    data_dir: Path,
    device_id: str | None,
    tags: tuple[str, ...],
    ca_file: Path | None,
    server_fingerprint: str | None,
    insecure_http: bool,
) -> None:
    """Create this device's key, get it certified, and store the identity in DATA_DIR.

    The server must be https:// (verified against the system's CAs, --ca-file, or pinned with
    --server-fingerprint) unless --insecure-http is given."""
    from .enroll import EnrollError, enroll

    try:
        identity = enroll(
            server_url,
            token,
            data_dir,
            device_id=device_id,
            tags=_parse_tags(tags),
            insecure_http=insecure_http,
            ca_file=ca_file,
            server_fingerprint=server_fingerprint,
        )
    except EnrollError as exc:
        err_console.print(f"[red]error:[/red] {exc}")
        sys.exit(1)
    console.print(f"enrolled as [bold]{identity.device_id}[/bold]; identity stored in {identity.data_dir}")
    if identity.tags:
        console.print("tags: " + ", ".join(f"{k}={v}" for k, v in sorted(identity.tags.items())))


@device.command("run")
@data_dir_option
@click.option(
    "--token-file",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="first boot: enroll with the token in this file when DATA_DIR has no identity, then delete it",
)
@click.option("--server", "server_url", default=None, help="control server URL for that enrollment")
@click.option("-v", "--verbose", is_flag=True)
def run_cmd(data_dir: Path, token_file: Path | None, server_url: str | None, verbose: bool) -> None:
    """Run the device daemon until SIGTERM/SIGINT (settings: FLEET_DEVICE_* variables)."""
    from .api import ApiConfigError
    from .config import DeviceSettings
    from .daemon import configure_logging, run
    from .enroll import EnrollError

    configure_logging(verbose)
    # under `fleet` the root logger is already set up (WARNING unless `fleet -v`): the daemon's
    # own log is this command's output, so its loggers are raised to INFO (DEBUG with -v)
    own = logging.DEBUG if verbose else logging.INFO
    if logging.getLogger().getEffectiveLevel() > own:
        logging.getLogger("device_client").setLevel(own)
    try:
        overrides: dict[str, Any] = {"data_dir": data_dir}
        if token_file is not None:
            overrides["token_file"] = token_file
        if server_url is not None:
            overrides["enroll_server"] = server_url
        run(DeviceSettings(**overrides))
    except (EnrollError, ApiConfigError) as exc:
        err_console.print(f"[red]error:[/red] {exc}")
        sys.exit(1)


@device.command("install-service")
@click.option("--user", default="fleetota", show_default=True, help="the unprivileged user it runs as")
@click.option(
    "--data-dir", type=click.Path(path_type=Path, file_okay=False), default=Path("/var/lib/fleetota")
)
@click.option("--token-file", type=click.Path(path_type=Path, dir_okay=False), default=None)
@click.option("--server", "server_url", default=None, help="control server URL for first-boot enrollment")
@click.option(
    "--unit-dir", type=click.Path(path_type=Path, file_okay=False), default=Path("/etc/systemd/system")
)
@click.option("--no-enable", is_flag=True, help="only write the unit")
def install_service_cmd(
    user: str,
    data_dir: Path,
    token_file: Path | None,
    server_url: str | None,
    unit_dir: Path,
    no_enable: bool,
) -> None:
    """Write the systemd unit fleetota-device.service (and enable it unless --no-enable)."""
    import shutil

    from .service import DEFAULT_EXEC, ServiceInstallError, UnitOptions, install

    fleet = shutil.which("fleet")
    opts = UnitOptions(
        user=user,
        data_dir=data_dir.absolute(),
        token_file=token_file.absolute() if token_file is not None else None,
        server_url=server_url,
        executable=Path(fleet) if fleet else DEFAULT_EXEC,
    )
    try:
        for line in install(opts, unit_dir, enable=not no_enable):
            console.print(line)
    except (OSError, ServiceInstallError) as exc:
        err_console.print(f"[red]error:[/red] {exc}")
        sys.exit(1)


def _mqtt_status(data_dir: Path) -> dict[str, object] | None:
    """The MQTT link state the daemon last recorded, and whether that daemon still runs."""
    from .mqtt import MQTT_STATUS_FILE

    try:
        doc = json.loads((data_dir / MQTT_STATUS_FILE).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(doc, dict):
        return None
    pid = doc.pop("pid", None)
    running = False
    if isinstance(pid, int) and pid > 0:
        try:
            os.kill(pid, 0)
            running = True
        except PermissionError:
            running = True
        except OSError:
            running = False
    doc["daemon_running"] = running
    return doc


@device.command("status")
@data_dir_option
def status_cmd(data_dir: Path) -> None:
    """Print the persisted state: what serves, the update in flight, release floors, and the MQTT
    link's state and last error as the daemon last recorded them."""
    from .store import StateStore

    if not data_dir.is_dir():
        err_console.print(f"[red]error:[/red] {data_dir} does not exist")
        sys.exit(1)
    loaded = StateStore(data_dir).load()
    state = loaded.state
    doc = {
        "source": loaded.source,
        "serving": state.serving(),
        "previous": {k: v.version for k, v in state.previous.items()},
        "shadow": {k: v.version for k, v in state.shadow.items()},
        "release_floor": state.release_floor,
        "last_desired_seq": state.last_desired_seq,
        "update": None
        if state.update is None
        else {
            "phase": state.update.phase.value,
            "model": state.update.model,
            "version": state.update.version,
            "desired_seq": state.update.desired_seq,
            "reason": state.update.reason,
        },
        "mqtt": _mqtt_status(data_dir),
    }
    click.echo(json.dumps(doc, indent=2))
