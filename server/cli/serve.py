"""``fleet server run`` and ``fleet broker config``: commands on the server host that start the
control server or write the broker's configuration, from the FLEET_* settings.

Server modules load inside the commands, so the device install can run ``fleet device ...``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from server.cli.common import fail, local_ctx


@click.group()
def server() -> None:
    """Run the control server."""


@server.command("run")
@click.option("--host", default=None, help="bind address (FLEET_HOST, default 127.0.0.1)")
@click.option("--port", type=int, default=None, help="port (FLEET_PORT, default 8080)")
@click.option(
    "--tls-cert", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
    help="serve HTTPS with this PEM certificate (chain) (FLEET_TLS_CERT; with --tls-key)",
)
@click.option(
    "--tls-key", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
    help="the certificate's private key (FLEET_TLS_KEY)",
)
def server_run(host: str | None, port: int | None, tls_cert: Path | None, tls_key: Path | None) -> None:
    """Start the API server; without FLEET_MQTT_URL also start Mosquitto as a child process."""
    from pydantic import ValidationError

    from server.runner import run_server

    overrides: dict[str, Any] = {}
    for name, value in (("host", host), ("port", port), ("tls_cert", tls_cert), ("tls_key", tls_key)):
        if value is not None:
            overrides[name] = value
    try:
        run_server(overrides)
    except ValidationError as exc:  # FLEET_* settings, before anything is started
        fail(settings_error(exc), code=2)


def settings_error(exc: Any) -> str:
    """A pydantic ``ValidationError`` of ``Settings`` as one line per bad setting."""
    lines = []
    for err in exc.errors():
        message = err["msg"].removeprefix("Value error, ")
        if err["loc"]:  # a field's error; a check across fields (empty loc) names its settings itself
            message = "FLEET_" + "_".join(str(part) for part in err["loc"]).upper() + f": {message}"
        lines.append(message)
    return "invalid settings: " + "; ".join(lines)


@click.group()
def broker() -> None:
    """Mosquitto broker configuration."""


@broker.command("config")
@click.argument("outdir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--port", type=int, default=8883, show_default=True)
@click.option("--bind", default="127.0.0.1", show_default=True)
@click.option("--hostname", "hostnames", multiple=True, help="extra DNS names for the broker certificate")
@click.option("--ip", "ips", multiple=True, help="extra IP addresses for the broker certificate")
@click.option(
    "--server-name",
    "server_names",
    multiple=True,
    help="a server replica the ACL admits: its FLEET_MQTT_SERVER_NAME (repeat; default: this host's)",
)
def broker_config(
    outdir: Path,
    port: int,
    bind: str,
    hostnames: tuple[str, ...],
    ips: tuple[str, ...],
    server_names: tuple[str, ...],
) -> None:
    """Write mosquitto.conf, CA/broker/server-client certificates, CRL and ACL into OUTDIR."""
    from server.config import SERVER_NAME_MAX
    from server.devices.repository import RevocationRepository
    from server.mqtt.broker import write_broker_config
    from server.mqtt.identity import SERVER_NAME_RE, connection_ids, server_name

    ctx = local_ctx()
    try:
        names = server_names or (server_name(ctx.settings),)
        for name in names:
            if not SERVER_NAME_RE.fullmatch(name):
                fail(f"--server-name {name!r}: use letters, digits and '-' (at most {SERVER_NAME_MAX})")
        identities = [i for name in names for i in connection_ids(name, ctx.settings.ingest_processes)]
        with ctx.db.session_scope() as session:
            revoked = RevocationRepository(session).all()
        files = write_broker_config(
            ctx.ca,
            outdir,
            port=port,
            bind=bind,
            hostnames=("localhost", *hostnames),
            ips=("127.0.0.1", *ips),
            revoked=revoked,
            server_identities=identities,
        )
    finally:
        ctx.close()
    click.echo(f"wrote {files.conf}")
    click.echo(f"server connections admitted: {', '.join(identities)}")
    click.echo(f"operator tools' MQTT identity: {files.server_cert} / {files.server_key}")
    click.echo(f"run it with: mosquitto -c {files.conf}")
