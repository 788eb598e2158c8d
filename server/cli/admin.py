"""``fleet admin token ...`` and ``fleet keys ...``: administration on the server host, from the
FLEET_* settings, the database and the key directory (docs/keys.md for the keys).

Server modules (SQLAlchemy, TUF) load inside the commands, so the device install can run
``fleet device ...``.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
from rich.table import Table

from server.cli.common import console, err_console, fail, local_ctx

if TYPE_CHECKING:
    from server.trust.repository import ImageRepository


@click.group()
def admin() -> None:
    """Administration on the server host (uses FLEET_* settings and the database directly)."""


@admin.group("token")
def admin_token() -> None:
    """Admin API bearer tokens."""


def _ttl(ctx: click.Context, param: click.Parameter, value: str | None) -> int | None:
    from server.admin.schemas import parse_ttl

    try:
        return None if value is None else parse_ttl(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


@admin_token.command("create")
@click.option("--role", type=click.Choice(["admin", "operator", "viewer", "cloud"]), required=True)
@click.option("--name", default=None, help="a label for the token")
@click.option("--ttl", callback=_ttl, help="expire after this long: 90s, 15m, 12h, 30d (default: never)")
def admin_token_create(role: str, name: str | None, ttl: int | None) -> None:
    """Create a token and print it (only its hash is stored)."""
    from server.admin.service import CLI_PRINCIPAL, AdminService
    from server.admin.tables import Role

    ctx = local_ctx()
    try:
        with ctx.db.session_scope() as session:
            service = AdminService(session)
            created = service.create_token(name or f"{role}-token", Role(role), CLI_PRINCIPAL, ttl_s=ttl)
    finally:
        ctx.close()
    click.echo(created.token)


@admin_token.command("list")
def admin_token_list() -> None:
    from server.admin.service import AdminService

    ctx = local_ctx()
    try:
        with ctx.db.session_scope() as session:
            tokens = AdminService(session).list_tokens(include_revoked=True)
    finally:
        ctx.close()
    from server.db import utcnow

    table = Table("id", "name", "role", "created", "expires", "revoked")
    for t in tokens:
        expires = "never"
        if t.expires_at is not None:
            expires = f"{t.expires_at:%Y-%m-%d %H:%M}" + (" (expired)" if t.expires_at <= utcnow() else "")
        table.add_row(
            t.id,
            t.name,
            t.role.value,
            f"{t.created_at:%Y-%m-%d %H:%M}",
            expires,
            f"{t.revoked_at:%Y-%m-%d %H:%M}" if t.revoked_at else "",
        )
    console.print(table)


@admin_token.command("revoke")
@click.argument("token_id")
def admin_token_revoke(token_id: str) -> None:
    from server.admin.service import CLI_PRINCIPAL, AdminService
    from server.errors import FleetError

    ctx = local_ctx()
    try:
        with ctx.db.session_scope() as session:
            AdminService(session).revoke_token(token_id, CLI_PRINCIPAL)
    except FleetError as exc:
        fail(exc.message)
    finally:
        ctx.close()
    click.echo(f"revoked {token_id}")


# -- keys -----------------------------------------------------------------------------------------
@click.group()
def keys() -> None:
    """TUF and director keys on the server host: status, rotation, moving keys offline (docs/keys.md)."""


_KEY_PATH = click.Path(dir_okay=False, path_type=Path)


def _database_url() -> str:
    """The database key changes are audited in: the one ``fleet admin token create`` uses."""
    from server.config import Settings

    return Settings().database_url


def _local_repo() -> ImageRepository:
    """The server's image repository from FLEET_* settings (no database needed), with an
    interrupted rotation completed or discarded first."""
    from server.admin.key_audit import KeyAuditError, record_key_change
    from server.config import Settings
    from server.trust.local_repo import NoImageRepository, existing_image_repository
    from server.trust.rotation import finish_pending

    try:
        repo = existing_image_repository(Settings())
    except NoImageRepository as exc:
        fail(str(exc))
    messages = finish_pending(repo)
    for message in messages:
        err_console.print(f"[yellow]{message}[/yellow]")
    if messages:  # key files changed: recorded like any key change, but never blocking the command
        try:
            record_key_change(
                _database_url(), "key.rotation_resolved", "interrupted-rotation", {"outcomes": messages}
            )
        except KeyAuditError as exc:
            err_console.print(f"[yellow]{exc}[/yellow]")
    return repo


def _keys_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Errors of the key files, the rotation or the audit database as one-line errors."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from server.admin.key_audit import KeyAuditError
        from server.trust.repository import RepositoryError
        from server.trust.rotation import RotationError

        try:
            return fn(*args, **kwargs)
        except (RotationError, RepositoryError, KeyAuditError, ValueError, OSError) as exc:
            fail(str(exc))

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
    from server.admin.key_audit import key_audit
    from server.trust.rotation import rotate_director, rotate_tuf_role

    repo = _local_repo()
    if role == "director" and (root_key is not None or out is not None):
        raise click.BadParameter("the director key stays online: only --targets-key applies")
    with key_audit(_database_url(), "key.rotate", role) as details:
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
    from server.admin.key_audit import key_audit
    from server.trust.rotation import published_director_keys, retire_director_key

    repo = _local_repo()
    with key_audit(_database_url(), "key.retire_director", "director") as details:
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
    from server.admin.key_audit import key_audit
    from server.trust.rotation import export_key, status

    repo = _local_repo()
    with key_audit(_database_url(), "key.export", role) as details:
        keyids = next(r.keyids for r in status(repo).roles if r.role == role)
        path = export_key(repo, role, out)
        details["keyids"] = list(keyids)
    click.echo(f"{role} key written to {path} and removed from the key directory")
