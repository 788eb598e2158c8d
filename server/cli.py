"""The ``fleet`` command line.

Operator commands (``enroll-token``, ``devices``, ``model``) talk to the admin REST API through
:class:`server.client.FleetClient`: point them at a server with ``--url``/``FLEET_URL`` and a
bearer token with ``--token``/``FLEET_TOKEN``. Commands that run on the server host itself
(``server run``, ``admin token ...``, ``broker config``, ``keys ...``) use the server's ``Settings``
(``FLEET_*`` environment) and its database and key directory directly: that is how the first
admin token is made.

Heavy imports (FastAPI, SQLAlchemy, onnxruntime) happen inside the commands, so the device-only
install (``pip install fleetota[device]``) can run ``fleet device ...``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import httpx
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from server.client import DEFAULT_URL, UPLOAD_TIMEOUT_S, FleetAPIError, FleetClient

console = Console()
err_console = Console(stderr=True)


def _fail(message: str, code: int = 1) -> None:
    err_console.print(f"[red]error:[/red] {message}")
    sys.exit(code)


def _parse_tags(text: str | None) -> dict[str, str]:
    """``k=v,k2:v2`` checked against the server's tag syntax (server/devices/tags.py): a bad tag is
    a one-line error here, before any request."""
    from server.devices.tags import parse_tags_csv
    from server.errors import Invalid

    try:
        return parse_tags_csv(text or "")
    except Invalid as exc:
        _fail(escape(exc.message), code=2)
        raise  # unreachable: _fail exits


class ApiGroup(click.Group):
    """A group whose commands get a FleetClient and turn API errors into clean messages."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except FleetAPIError as exc:
            _fail(f"server answered {exc.status_code}: {exc.detail}")
        except (httpx.HTTPError, httpx.InvalidURL) as exc:  # refused, timed out, TLS, bad --url ...
            _fail(_transport_error(exc))
        except OSError as exc:
            _fail(str(exc))


def _transport_error(exc: httpx.HTTPError | httpx.InvalidURL) -> str:
    """One line for a request that got no answer: what failed, against which URL."""
    try:
        where = f" ({exc.request.method} {exc.request.url})" if isinstance(exc, httpx.HTTPError) else ""
    except RuntimeError:  # no request attached
        where = ""
    kind = "timed out" if isinstance(exc, httpx.TimeoutException) else "request failed"
    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return escape(f"{kind}{where}: {reason}")


def api_options(fn: Any) -> Any:
    fn = click.option("--token", envvar="FLEET_TOKEN", help="admin bearer token (FLEET_TOKEN)")(fn)
    fn = click.option(
        "--url", envvar="FLEET_URL", default=DEFAULT_URL, show_default=True, help="server URL (FLEET_URL)"
    )(fn)
    return fn


def _client(url: str, token: str | None, **options: Any) -> FleetClient:
    if not token:
        _fail("no admin token: pass --token or set FLEET_TOKEN (create one with `fleet admin token create`)")
    return FleetClient(url, token, **options)


@click.group()
@click.option("-v", "--verbose", is_flag=True, help="debug logging (libraries included)")
def main(verbose: bool) -> None:
    """fleetota: signed ML model updates and staged rollouts for edge fleets."""
    # WARNING unless -v: a command's stdout is its answer (scripts capture it) and its stderr is
    # for problems; services (`server run`, `device run`) raise their own loggers to INFO
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


# -- server ---------------------------------------------------------------------------------------
@main.group()
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
        _fail(_settings_error(exc), code=2)


def _settings_error(exc: Any) -> str:
    """A pydantic ``ValidationError`` of ``Settings`` as one line per bad setting."""
    lines = []
    for err in exc.errors():
        message = err["msg"].removeprefix("Value error, ")
        if err["loc"]:  # a field's error; a check across fields (empty loc) names its settings itself
            message = "FLEET_" + "_".join(str(part) for part in err["loc"]).upper() + f": {message}"
        lines.append(message)
    return "invalid settings: " + "; ".join(lines)


# -- admin ----------------------------------------------------------------------------------------
@main.group()
def admin() -> None:
    """Administration on the server host (uses FLEET_* settings and the database directly)."""


@admin.group("token")
def admin_token() -> None:
    """Admin API bearer tokens."""


def _local_ctx() -> Any:
    from server.config import Settings
    from server.context import ServerContext

    return ServerContext.open(Settings())


@admin_token.command("create")
@click.option("--role", type=click.Choice(["admin", "operator", "viewer"]), required=True)
@click.option("--name", default=None, help="a label for the token")
def admin_token_create(role: str, name: str | None) -> None:
    """Create a token and print it (only its hash is stored)."""
    from server.admin.service import CLI_PRINCIPAL, AdminService
    from server.admin.tables import Role

    ctx = _local_ctx()
    try:
        with ctx.db.session_scope() as session:
            created = AdminService(session).create_token(name or f"{role}-token", Role(role), CLI_PRINCIPAL)
    finally:
        ctx.close()
    click.echo(created.token)


@admin_token.command("list")
def admin_token_list() -> None:
    from server.admin.service import AdminService

    ctx = _local_ctx()
    try:
        with ctx.db.session_scope() as session:
            tokens = AdminService(session).list_tokens(include_revoked=True)
    finally:
        ctx.close()
    table = Table("id", "name", "role", "created", "revoked")
    for t in tokens:
        table.add_row(
            t.id,
            t.name,
            t.role.value,
            f"{t.created_at:%Y-%m-%d %H:%M}",
            f"{t.revoked_at:%Y-%m-%d %H:%M}" if t.revoked_at else "",
        )
    console.print(table)


@admin_token.command("revoke")
@click.argument("token_id")
def admin_token_revoke(token_id: str) -> None:
    from server.admin.service import CLI_PRINCIPAL, AdminService
    from server.errors import FleetError

    ctx = _local_ctx()
    try:
        with ctx.db.session_scope() as session:
            AdminService(session).revoke_token(token_id, CLI_PRINCIPAL)
    except FleetError as exc:
        _fail(exc.message)
    finally:
        ctx.close()
    click.echo(f"revoked {token_id}")


# -- broker ---------------------------------------------------------------------------------------
@main.group()
def broker() -> None:
    """Mosquitto broker configuration."""


@broker.command("config")
@click.argument("outdir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--port", type=int, default=8883, show_default=True)
@click.option("--bind", default="127.0.0.1", show_default=True)
@click.option("--hostname", "hostnames", multiple=True, help="extra DNS names for the broker certificate")
@click.option("--ip", "ips", multiple=True, help="extra IP addresses for the broker certificate")
def broker_config(
    outdir: Path, port: int, bind: str, hostnames: tuple[str, ...], ips: tuple[str, ...]
) -> None:
    """Write mosquitto.conf, CA/broker/server-client certificates, CRL and ACL into OUTDIR."""
    from server.devices.repository import RevocationRepository
    from server.mqtt.broker import write_broker_config

    ctx = _local_ctx()
    try:
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
        )
    finally:
        ctx.close()
    click.echo(f"wrote {files.conf}")
    click.echo(f"server MQTT identity: {files.server_cert} / {files.server_key}")
    click.echo(f"run it with: mosquitto -c {files.conf}")


# -- enrollment tokens ----------------------------------------------------------------------------
@main.group("enroll-token", cls=ApiGroup)
def enroll_token() -> None:
    """Device enrollment tokens."""


@enroll_token.command("create")
@api_options
@click.option("--tags", default="", help="tags for enrolled devices: k=v,k2=v2")
@click.option("--uses", type=int, default=1, show_default=True, help="how many devices may use it")
@click.option("--ttl", "ttl_s", type=int, default=None, help="lifetime in seconds")
def enroll_token_create(url: str, token: str | None, tags: str, uses: int, ttl_s: int | None) -> None:
    """Create an enrollment token and print it."""
    with _client(url, token) as client:
        created = client.create_enroll_token(_parse_tags(tags), uses, ttl_s)
    click.echo(created["token"])


# -- devices --------------------------------------------------------------------------------------
@main.group(cls=ApiGroup)
def devices() -> None:
    """The device registry."""


@devices.command("ls")
@api_options
@click.option("--tag", "tag_exprs", multiple=True, help="key=value (repeat to AND)")
@click.option(
    "--status", default=None, type=click.Choice(["enrolled", "online", "offline", "decommissioned"])
)
@click.option("--arch", default=None)
@click.option("--json", "as_json", is_flag=True, help="print JSON lines")
def devices_ls(
    url: str,
    token: str | None,
    tag_exprs: tuple[str, ...],
    status: str | None,
    arch: str | None,
    as_json: bool,
) -> None:
    """List devices (all pages)."""
    tags = _parse_tags(",".join(tag_exprs))
    table = Table("id", "status", "arch", "tags", "last seen")
    with _client(url, token) as client:
        for d in client.iter_devices(tags=tags, status=status, arch=arch):
            if as_json:
                click.echo(json.dumps(d))
                continue
            tag_text = ",".join(f"{k}={v}" for k, v in d["tags"].items())
            table.add_row(d["id"], d["status"], d["arch"], tag_text, d["last_seen_at"] or "")
    if not as_json:
        console.print(table)


@devices.command("show")
@api_options
@click.argument("device_id")
def devices_show(url: str, token: str | None, device_id: str) -> None:
    with _client(url, token) as client:
        click.echo(json.dumps(client.get_device(device_id), indent=2))


@devices.command("tag")
@api_options
@click.argument("device_id")
@click.argument("tags", nargs=-1)
@click.option("--remove", multiple=True, help="tag key to remove")
def devices_tag(
    url: str, token: str | None, device_id: str, tags: tuple[str, ...], remove: tuple[str, ...]
) -> None:
    """Set tags (k=v ...) and remove tag keys."""
    with _client(url, token) as client:
        d = client.tag_device(device_id, _parse_tags(",".join(tags)), list(remove))
    click.echo(",".join(f"{k}={v}" for k, v in d["tags"].items()))


@devices.command("decommission")
@api_options
@click.argument("device_id")
def devices_decommission(url: str, token: str | None, device_id: str) -> None:
    """Retire a device: its certificate goes on the CRL, its download token stops working."""
    with _client(url, token) as client:
        d = client.decommission_device(device_id)
    click.echo(f"{d['id']}: {d['status']}")


# -- models ---------------------------------------------------------------------------------------
@main.group(cls=ApiGroup)
def model() -> None:
    """The model registry."""


@model.command("push")
@api_options
@click.argument("name")
@click.argument("version")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--variant", default="default", show_default=True, help="hardware variant")
@click.option(
    "--metadata", default=None, help="JSON: preprocessing, validation {rtol, atol, compare}, constraints"
)
@click.option(
    "--validation",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help=".npz of validation inputs (inputs/<name>)",
)
@click.option(
    "--timeout",
    "timeout_s",
    type=click.FloatRange(min=1),
    default=UPLOAD_TIMEOUT_S,
    show_default=True,
    help="read/write timeout of the upload in seconds (the answer comes after validation and signing)",
)
def model_push(
    url: str,
    token: str | None,
    name: str,
    version: str,
    file: Path,
    variant: str,
    metadata: str | None,
    validation: Path | None,
    timeout_s: float,
) -> None:
    """Upload an ONNX model; the server validates, bundles, signs and publishes it.

    Should the upload time out, the server may still publish the version: check with
    ``fleet model ls NAME`` before pushing again (the same version twice is a 409)."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn

    meta = None
    if metadata:
        try:
            meta = json.loads(metadata)
        except ValueError as exc:
            raise click.BadParameter(f"--metadata is not JSON: {exc}") from None
    size = os.path.getsize(file)
    with (
        _client(url, token, upload_timeout=timeout_s) as client,
        Progress(
            "[progress.description]{task.description}",
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            console=err_console,
            transient=True,
            disable=not err_console.is_terminal,  # a script capturing stderr gets no stray newline
        ) as progress,
    ):
        task = progress.add_task(f"uploading {file.name}", total=size)
        result = client.push_model(
            name,
            version,
            file,
            variant=variant,
            metadata=meta,
            validation=validation,
            progress=lambda n: progress.advance(task, n),
        )
    art = next(
        (a for a in result.get("artifacts", result.get("variants", [])) if a.get("variant") == variant), None
    )
    staged = result.get("status") == "pending" or (art is not None and art.get("published") is False)
    click.echo(
        f"{'staged' if staged else 'published'} {name} {version} (release {result.get('release')})"
        + (f": {art.get('target_path')} {art.get('length')} bytes" if art else "")
    )
    if staged:
        click.echo(
            "the targets key is not on the server: the bundle is listed once `fleet model sign "
            "--targets-key PATH` signs it (docs/keys.md)"
        )


@model.command("ls")
@api_options
@click.argument("name", required=False)
def model_ls(url: str, token: str | None, name: str | None) -> None:
    """List models, or the versions of NAME."""
    with _client(url, token) as client:
        if name is None:
            table = Table("model", "latest", "release", "versions")
            for m in client.list_models():
                table.add_row(
                    m["name"],
                    str(m.get("latest_version") or ""),
                    str(m.get("last_release", "")),
                    str(m.get("version_count", "")),
                )
        else:
            table = Table("version", "release", "status", "variants", "created")
            for v in client.list_versions(name):
                variants = ",".join(a["variant"] for a in v.get("artifacts", v.get("variants", [])))
                table.add_row(
                    v["version"], str(v["release"]), v["status"], variants, str(v["created_at"])[:19]
                )
    console.print(table)


@model.command("revoke")
@api_options
@click.argument("name")
@click.argument("version")
def model_revoke(url: str, token: str | None, name: str, version: str) -> None:
    """Revoke a version: its bundles leave the signed repository."""
    with _client(url, token) as client:
        v = client.revoke_version(name, version)
    click.echo(f"{name} {version}: {v['status']}")


@model.command("sign")
@api_options
@click.option(
    "--targets-key",
    "key_path",
    required=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="the offline targets private key (PEM)",
)
@click.option(
    "--renew", is_flag=True, help="when nothing is staged, stage a renewal (same targets, new expiry)"
)
@click.option("--no-verify", is_flag=True, help="do not download and check the bundles about to be listed")
@click.option("--yes", "-y", is_flag=True, help="sign without asking")
def model_sign(
    url: str, token: str | None, key_path: Path, renew: bool, no_verify: bool, yes: bool
) -> None:
    """Sign the staged targets metadata with the offline targets key (on the signer's workstation).

    While the targets key is not on the server, pushes and revocations are staged; this fetches
    what is staged, downloads each bundle about to be listed and checks its length, hash and
    manifest against what is being signed, shows the changes, signs them with --targets-key and
    publishes them. See docs/keys.md ("Keeping root and targets offline")."""
    from datetime import UTC, datetime, timedelta

    from securesystemslib.signer import SSlibKey

    from server.trust.keys import load_private_key
    from server.trust.repository import sign_staged_targets

    try:
        key = load_private_key(key_path)
    except Exception as exc:
        _fail(f"cannot read the targets key {key_path}: {escape(str(exc))}")
        raise  # unreachable: _fail exits
    keyid = SSlibKey.from_crypto(key.public_key()).keyid
    with _client(url, token) as client:
        staged = client.staged_targets()
        if staged is None and renew:
            staged = client.stage_targets_renewal()
        if staged is None:
            click.echo("nothing is staged for the targets key (use --renew to renew the current targets)")
            return
        root = client.http.get("/tuf/metadata/root.json").json()
        if keyid not in root["signed"]["roles"]["targets"]["keyids"]:
            _fail(f"{key_path} is not a targets key of the repository's current root (key id {keyid[:16]})")
        if not no_verify and staged["listed"]:
            _check_staged_bundles(client, staged["listed"])
        table = Table("", "target", "model", "version", "release", "bytes")
        for sign, items in (("+", staged["listed"]), ("-", staged["unlisted"])):
            for t in items:
                c = t.get("custom", {})
                table.add_row(
                    sign, t["path"], str(c.get("model", "")), str(c.get("version", "")),
                    str(c.get("release", "")), str(t["length"]),
                )
        expires = datetime.now(UTC) + timedelta(seconds=staged["lifetime_s"])
        console.print(
            f"targets v{staged['current_version']} -> v{staged['version']}, "
            f"expires {expires.isoformat(timespec='seconds')}"
        )
        console.print(table)
        if not yes and not click.confirm("sign and publish?", default=False):
            _fail("nothing signed", code=1)
        signed = sign_staged_targets(staged["metadata"], key, expires)
        result = client.publish_signed_targets(signed)
    published = ", ".join(result["published"]) or "none"
    unlisted = ", ".join(result["unlisted"]) or "none"
    click.echo(
        f"published targets v{result['version']} (expires {str(result['expires'])[:19]}); "
        f"now listed: {published}; no longer listed: {unlisted}"
    )


def _check_staged_bundles(client: FleetClient, listed: list[dict[str, Any]]) -> None:
    """Download each bundle about to be listed and check it against what will be signed: length,
    sha256, a safe bundle whose members match its manifest, and the manifest's name, version,
    release and variant against the target's custom fields. Any mismatch: nothing is signed."""
    import tempfile

    from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn

    from device_client.protocol.bundle import BundleError, extract_bundle, file_sha256

    with (
        tempfile.TemporaryDirectory(prefix="fleet-sign-") as tmp,
        Progress(
            "[progress.description]{task.description}", BarColumn(), DownloadColumn(), TransferSpeedColumn(),
            console=err_console, transient=True,
        ) as progress,
    ):
        for n, target in enumerate(listed):
            path = Path(tmp) / f"{n}.tar"
            task = progress.add_task(f"checking {target['path']}", total=target["length"])
            with open(path, "wb") as fh:
                client.download_target(target["file"], fh, lambda k, t=task: progress.advance(t, k))
            if file_sha256(path) != (target["length"], target["sha256"]):
                _fail(f"{target['path']}: stored bundle differs from its staged length or sha256; not signed")
            try:
                manifest = extract_bundle(path, Path(tmp) / f"{n}.d")
            except BundleError as exc:
                _fail(f"{target['path']}: not a valid bundle ({escape(str(exc))}); nothing signed")
                raise  # unreachable: _fail exits
            custom = target.get("custom", {})
            got = {"model": manifest.name, "version": manifest.version, "release": manifest.release,
                   "variant": manifest.variant}
            want = {k: custom.get(k) for k in got}
            if got != want:
                _fail(f"{target['path']}: its manifest says {got}, the target says {want}; nothing signed")


from device_client.cli import device as device_cli  # noqa: E402  (device-only deps: click, rich)

main.add_command(device_cli)

# -- rollouts -------------------------------------------------------------------------------------
EXIT_BY_STATUS = {"completed": 0, "paused": 2, "aborted": 3, "rolled_back": 3}


def _parse_gates(items: tuple[str, ...]) -> dict[str, float]:
    gates: dict[str, float] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise click.BadParameter(f"invalid gate {item!r}: expected name=value")
        try:
            gates[key.strip()] = float(value)
        except ValueError:
            raise click.BadParameter(f"gate {key!r} needs a number, got {value!r}") from None
    return gates


def rollout_table(state: dict[str, Any]) -> Table:
    """Per-stage progress of a rollout as a rich table."""
    # escaped: rich reads "[running]" as a markup tag and drops it
    title = escape(f"rollout {state['id']}: {state['model']} {state['version']} [{state['status']}]")
    table = Table(
        "stage", "devices", "succeeded", "failed", "in progress", "errors", "p95 ms", "agreement", title=title
    )
    for v in state["stage_views"]:
        ph = v["phases"]
        failed = sum(ph.get(k, 0) for k in ("failed", "rolled_back", "timed_out"))
        busy = sum(
            ph.get(k, 0)
            for k in ("pending", "notified", "downloading", "verifying", "installing", "probation")
        )
        h = v["health"]
        marker = " <" if v["index"] == state["current_stage"] and state["status"] == "running" else ""
        table.add_row(
            f"{v['index'] + 1}{' (shadow)' if v['shadow'] else ''}{marker}",
            str(v["devices"]),
            str(ph.get("succeeded", 0)),
            str(failed),
            str(busy),
            "" if h["error_rate"] is None else f"{h['error_rate']:.2%}",
            "" if h["p95_ms"] is None else f"{h['p95_ms']:.1f}",
            "" if h["agreement"] is None else f"{h['agreement']:.3f}",
        )
    if state.get("reason"):
        table.caption = state["reason"]
    return table


@main.group(cls=ApiGroup)
def rollout() -> None:
    """Staged rollouts gated on inference health."""


@rollout.command("start")
@api_options
@click.argument("model_name")
@click.argument("version")
@click.option("--stages", default="1,10,50,100", show_default=True, help="cumulative percents")
@click.option("--soak", type=float, default=60, show_default=True, help="soak seconds per stage")
@click.option("--shadow", is_flag=True, help="run the first stage in shadow mode (gated on agreement)")
@click.option("--on-failure", type=click.Choice(["pause", "rollback"]), default="pause", show_default=True)
@click.option("--gate", "gates", multiple=True, help="name=value, e.g. max_error_rate=0.02 (repeatable)")
@click.option("--tag", "tag_exprs", multiple=True, help="select devices with key=value (repeat to AND)")
@click.option("--device", "device_ids", multiple=True, help="select these device ids")
@click.option("--arch", default=None, help="select devices of this architecture")
@click.option("--probation", "probation_s", type=float, default=None, help="device probation seconds")
@click.option("--max-concurrent", type=int, default=50, show_default=True, help="concurrent downloads")
@click.option("--device-timeout", type=int, default=900, show_default=True)
@click.option(
    "--wait", is_flag=True, help="follow progress; exit 0 completed, 2 paused, 3 rolled back/aborted"
)
def rollout_start(
    url: str,
    token: str | None,
    model_name: str,
    version: str,
    stages: str,
    soak: float,
    shadow: bool,
    on_failure: str,
    gates: tuple[str, ...],
    tag_exprs: tuple[str, ...],
    device_ids: tuple[str, ...],
    arch: str | None,
    probation_s: float | None,
    max_concurrent: int,
    device_timeout: int,
    wait: bool,
) -> None:
    """Start a staged rollout of MODEL_NAME VERSION."""
    try:
        percents = [float(p) for p in stages.split(",") if p.strip()]
    except ValueError:
        raise click.BadParameter(f"--stages must be comma-separated percents, got {stages!r}") from None
    body: dict[str, Any] = {
        "model": model_name,
        "version": version,
        "selector": {
            "tags": _parse_tags(",".join(tag_exprs)),
            "device_ids": list(device_ids),
            "hardware": {"arch": arch} if arch else {},
        },
        "stages": [
            {"percent": p, "soak_s": soak, "shadow": shadow and i == 0} for i, p in enumerate(percents)
        ],
        "gates": _parse_gates(gates),
        "on_failure": on_failure,
        "max_concurrent_downloads": max_concurrent,
        "device_timeout_s": device_timeout,
    }
    if probation_s is not None:
        body["probation"] = {"seconds": probation_s}
    with _client(url, token) as client:
        state = client.create_rollout(body)
        console.print(
            f"rollout [bold]{state['id']}[/bold] started: {state['devices']} devices in "
            f"{len(state['stage_views'])} stages"
        )
        if wait:
            state = follow_rollout(client, state["id"])
    if wait:
        sys.exit(EXIT_BY_STATUS.get(state["status"], 1))


def follow_rollout(client: FleetClient, rollout_id: str, poll_s: float = 1.0) -> dict[str, Any]:
    """Live per-stage progress until the rollout stops; returns its final state."""
    from rich.live import Live

    with Live(console=console, refresh_per_second=4) as live:
        state = client.wait_rollout(
            rollout_id, poll_s=poll_s, on_update=lambda s: live.update(rollout_table(s))
        )
    colour = "green" if state["status"] == "completed" else "red"
    console.print(f"[{colour}]rollout {rollout_id} {state['status']}[/{colour}]")
    return state


@rollout.command("status")
@api_options
@click.argument("rollout_id")
@click.option("--json", "as_json", is_flag=True)
def rollout_status(url: str, token: str | None, rollout_id: str, as_json: bool) -> None:
    with _client(url, token) as client:
        state = client.get_rollout(rollout_id)
    if as_json:
        click.echo(json.dumps(state, indent=2))
    else:
        console.print(rollout_table(state))


@rollout.command("ls")
@api_options
def rollout_ls(url: str, token: str | None) -> None:
    table = Table("id", "model", "version", "status", "stage", "created")
    with _client(url, token) as client:
        for r in client.list_rollouts():
            table.add_row(
                r["id"],
                r["model"],
                r["version"],
                r["status"],
                f"{r['current_stage'] + 1}/{len(r['stages'])}",
                str(r["created_at"])[:19],
            )
    console.print(table)


def _rollout_action(action: str, doc: str) -> None:
    @rollout.command(action, help=doc)
    @api_options
    @click.argument("rollout_id")
    def command(url: str, token: str | None, rollout_id: str) -> None:
        with _client(url, token) as client:
            state = client.rollout_action(rollout_id, action)
        click.echo(f"rollout {rollout_id}: {state['status']}")


for _action, _doc in (
    ("pause", "Pause: no new devices are notified."),
    ("resume", "Resume a paused rollout."),
    ("abort", "Abort: pending devices are cancelled."),
    ("rollback", "Return every touched device to its previous version."),
    ("promote", "Skip the rest of the current soak."),
):
    _rollout_action(_action, _doc)


# -- keys -----------------------------------------------------------------------------------------
@main.group()
def keys() -> None:
    """TUF and director keys on the server host: status, rotation, moving keys offline (docs/keys.md)."""


_KEY_PATH = click.Path(dir_okay=False, path_type=Path)


def _local_repo() -> Any:
    """The server's image repository from FLEET_* settings (no database needed)."""
    from server.config import Settings
    from server.trust.repository import ImageRepository
    from server.trust.rotation import finish_pending

    settings = Settings()
    repo = ImageRepository(
        settings.repo_dir,
        settings.key_dir,
        root_expiry_s=settings.root_expiry_s,
        targets_expiry_s=settings.targets_expiry_s,
        snapshot_expiry_s=settings.snapshot_expiry_s,
        timestamp_expiry_s=settings.timestamp_expiry_s,
    )
    if not (settings.repo_dir / "metadata").is_dir():
        _fail(f"no image repository in {settings.repo_dir} (start the server once, or set FLEET_DATA_DIR)")
    messages = finish_pending(repo)
    for message in messages:
        err_console.print(f"[yellow]{message}[/yellow]")
    if messages:  # key files changed: recorded like any key change, but never blocking the command
        _record_key_change("key.rotation_resolved", {"outcomes": messages})
    return repo


def _open_audit_db() -> Any:
    """The database the key commands write their audit rows to: the one ``fleet admin token
    create`` uses (``FLEET_DATABASE_URL``, default SQLite in ``FLEET_DATA_DIR``), migrated to head.
    Raises SQLAlchemyError or OSError when it cannot be opened."""
    from server.config import Settings
    from server.db import Database
    from server.migrate import upgrade_head

    url = Settings().database_url
    upgrade_head(url)
    return Database(url)


def _record_key_change(action: str, details: dict[str, Any]) -> None:
    """One audit row (actor ``cli``, target ``key``) for a change already made to the key files;
    a database that cannot be written is a warning here, not a failure (the change stands)."""
    from sqlalchemy.exc import SQLAlchemyError

    from server.admin.service import CLI_PRINCIPAL, audit

    try:
        db = _open_audit_db()
        try:
            with db.session_scope() as session:
                audit(session, CLI_PRINCIPAL, action, "key", "interrupted-rotation", details)
        finally:
            db.dispose()
    except (SQLAlchemyError, OSError) as exc:
        err_console.print(f"[yellow]audit row {action} not written: {exc}[/yellow]")


@contextlib.contextmanager
def _key_audit(action: str, role: str) -> Iterator[dict[str, Any]]:
    """Record a key change in the server's audit log (actor ``cli``, target ``key``/ROLE).

    The database is the one ``fleet admin token create`` uses (``FLEET_DATABASE_URL``, default
    SQLite in ``FLEET_DATA_DIR``), opened and migrated the same way and *before* any key changes:
    when it cannot be opened, the command refuses and nothing is changed. The body fills in the
    yielded details (role, key ids, versions; never key material or key paths); the row is written
    once the body has succeeded, and not at all when it fails.
    """
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import SQLAlchemyError

    from server.admin.service import CLI_PRINCIPAL, audit
    from server.config import Settings

    where = make_url(Settings().database_url).render_as_string(hide_password=True)
    try:
        db = _open_audit_db()
    except (SQLAlchemyError, OSError) as exc:
        _fail(f"cannot open the audit database {where}: {exc}. No key was changed.")
    try:
        details: dict[str, Any] = {"role": role}
        yield details
        try:
            with db.session_scope() as session:
                audit(session, CLI_PRINCIPAL, action, "key", role, details)
        except SQLAlchemyError as exc:
            _fail(f"the key change is done, but its audit row ({action}) was not written to {where}: {exc}")
    finally:
        db.dispose()


def _keys_errors(fn: Any) -> Any:
    import functools

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from server.trust.repository import RepositoryError
        from server.trust.rotation import RotationError

        try:
            return fn(*args, **kwargs)
        except (RotationError, RepositoryError, ValueError, OSError) as exc:
            _fail(str(exc))

    return wrapper


@keys.command("status")
@click.option("--json", "as_json", is_flag=True, help="print JSON")
@_keys_errors
def keys_status(as_json: bool) -> None:
    """Roles, key ids, versions, expiries, and which private keys are online in the key directory."""
    from server.trust.rotation import status

    st = status(_local_repo())
    if as_json:
        click.echo(json.dumps(st.to_json(), indent=1))
        return
    table = Table("role", "key ids", "version", "expires", "private key")
    for r in st.roles:
        where = "online (key_dir)" if r.online else "offline"
        if r.problem:
            where += f" [red]{r.problem}[/red]"
        table.add_row(
            r.role,
            "\n".join(k[:16] for k in r.keyids),
            "" if r.version is None else str(r.version),
            f"{r.expires:%Y-%m-%d %H:%M}" if r.expires else "",
            where,
        )
    console.print(table)
    if st.director_list_version is None:
        console.print("director key list: not published (devices trust their enrollment pin)")
    else:
        ids = ", ".join(k[:16] for k in st.director_list)
        console.print(f"director key list v{st.director_list_version}: {ids} (first = signing key)")
    for path in st.pending:
        console.print(f"[yellow]pending key file {path}[/yellow]")


@keys.command("rotate")
@click.argument("role", type=click.Choice(["root", "targets", "snapshot", "timestamp", "director"]))
@click.option("--root-key", type=_KEY_PATH, help="the current root key, when it is not in the key directory")
@click.option("--targets-key", type=_KEY_PATH, help="the current targets key, when it is offline")
@click.option("--out", type=_KEY_PATH, help="write the new private key here instead of the key directory")
@_keys_errors
def keys_rotate(role: str, root_key: Path | None, targets_key: Path | None, out: Path | None) -> None:
    """Replace the key of ROLE; devices follow without re-enrolling."""
    from server.trust.rotation import rotate_director, rotate_tuf_role

    repo = _local_repo()
    if role == "director" and (root_key is not None or out is not None):
        raise click.BadParameter("the director key stays online: only --targets-key applies")
    with _key_audit("key.rotate", role) as details:
        if role == "director":
            done = rotate_director(repo, targets_key=targets_key)
        else:
            done = rotate_tuf_role(repo, role, root_key=root_key, targets_key=targets_key, out=out)
        details.update(old_keyids=done.old_keyids, new_keyid=done.new_keyid, offline=out is not None)
        if done.root_version is not None:
            details["root_version"] = done.root_version
        if done.director_list_version is not None:
            details["director_list_version"] = done.director_list_version
    if role == "director":
        click.echo(f"director key rotated: now signing with {done.new_keyid}")
        old = ", ".join(done.old_keyids)
        click.echo(f"published director key list v{done.director_list_version}: [new, {old}]")
        click.echo(f"retire the old key later with: fleet keys retire-director {done.old_keyids[0][:16]}")
        return
    click.echo(f"{role} key rotated: root v{done.root_version} lists {done.new_keyid}")
    click.echo(f"new private key: {done.new_key_file} (0600)")
    for path in done.removed:
        click.echo(f"old key removed from {path}")
    if root_key is not None or (role == "targets" and targets_key is not None):
        click.echo("the old offline key file was not touched: destroy it once the new one is stored safely")


@keys.command("retire-director")
@click.argument("keyid")
@click.option("--targets-key", type=_KEY_PATH, help="the current targets key, when it is offline")
@_keys_errors
def keys_retire_director(keyid: str, targets_key: Path | None) -> None:
    """Remove an old director key (KEYID, 8+ hex digits) from the published list."""
    from server.trust.rotation import published_director_keys, retire_director_key

    repo = _local_repo()
    with _key_audit("key.retire_director", "director") as details:
        before = published_director_keys(repo)
        listed = retire_director_key(repo, keyid, targets_key=targets_key)
        retired = sorted(set(before.keyids if before else ()) - set(listed.keyids))
        details.update(
            retired_keyids=retired, director_list=list(listed.keyids), director_list_version=listed.version
        )
    click.echo(f"published director key list v{listed.version}: {', '.join(listed.keyids)}")


@keys.command("export")
@click.argument("role", type=click.Choice(["root", "targets"]))
@click.option("--out", type=_KEY_PATH, required=True, help="where to write the private key (0600)")
@_keys_errors
def keys_export(role: str, out: Path) -> None:
    """Move the private key of ROLE offline: write it to --out, then delete it from the key directory."""
    from server.trust.rotation import export_key, status

    repo = _local_repo()
    with _key_audit("key.export", role) as details:
        keyids = next(r.keyids for r in status(repo).roles if r.role == role)
        path = export_key(repo, role, out)
        details["keyids"] = list(keyids)
    click.echo(f"{role} key written to {path} and removed from the key directory")


# -- demo -----------------------------------------------------------------------------------------
@main.command("demo")
@click.option(
    "--devices",
    "n_devices",
    type=click.IntRange(1, 50),
    default=4,
    show_default=True,
    help="real device daemons to run (each a process with onnxruntime)",
)
@click.option(
    "--workdir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="keep everything here (default: a temporary directory, removed afterwards)",
)
def demo_cmd(n_devices: int, workdir: Path | None) -> None:
    """Server + Mosquitto + real device daemons: roll out a good version in stages, then a bad one
    whose canary trips and is rolled back automatically."""
    from server.demo import demo

    logging.getLogger().setLevel(logging.WARNING)
    sys.exit(demo(n_devices, workdir))


# -- simulate -------------------------------------------------------------------------------------
@main.command("simulate")
@click.option("--devices", "n_devices", type=click.IntRange(1, 100_000), default=100, show_default=True)
@click.option("--server", "server_url", default=None, help="server URL; omit to run an embedded server")
@click.option("--token", envvar="FLEET_TOKEN", help="operator/admin token of --server (FLEET_TOKEN)")
@click.option("--workdir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="keep identities here (reused on the next run against the same server)")  # fmt: skip
@click.option("--processes", type=int, default=0, help="worker processes (default: one per 2,500 devices)")
@click.option("--prefix", default="sim", show_default=True, help="device ids are PREFIX-00000, ...")
@click.option("--tags", default=None, help="tags of the simulated devices, k=v,k2=v2")
@click.option("--serving", multiple=True, help="model=version every device serves at start (repeatable)")
@click.option("--profile", "profiles", multiple=True,
              help="VERSION:key=value,... behaviour of a version (* for all), e.g. "
                   "2.0.0:download=3,install=1,fail=0.05,errors=0.01,p95=12")  # fmt: skip
@click.option("--health-window", type=float, default=10.0, show_default=True, help="seconds; 0 = none")
@click.option("--duration", type=float, default=0.0, help="stop after this many seconds (0 = Ctrl-C)")
def simulate_cmd(
    n_devices: int, server_url: str | None, token: str | None, workdir: Path | None, processes: int,
    prefix: str, tags: str | None, serving: tuple[str, ...], profiles: tuple[str, ...], health_window: float,
    duration: float,
) -> None:  # fmt: skip
    """N simulated devices over real MQTT (own identity and mTLS connection each), speaking the real
    protocol; against --server, or an embedded server + Mosquitto."""
    from server.sim.run import simulate

    logging.getLogger().setLevel(logging.WARNING)
    sys.exit(simulate(
        n_devices, server_url=server_url, token=token, workdir=workdir, processes=processes, prefix=prefix,
        tags=_parse_tags(tags), serving=_parse_tags(",".join(serving)), profiles=list(profiles),
        health_window_s=health_window, duration_s=duration,
    ))  # fmt: skip


if __name__ == "__main__":  # pragma: no cover
    main()
