"""``fleet devices ...`` and ``fleet enroll-token create``: the device registry and the tokens
devices enroll with, through the admin API."""

from __future__ import annotations

import json

import click
from rich.table import Table

from server.cli import common
from server.cli.common import ApiGroup, api_options, console, parse_tags


@click.group("enroll-token", cls=ApiGroup)
def enroll_token() -> None:
    """Device enrollment tokens."""


@enroll_token.command("create")
@api_options
@click.option("--tags", default="", help="tags for enrolled devices: k=v,k2=v2")
@click.option("--uses", type=int, default=1, show_default=True, help="how many devices may use it")
@click.option("--ttl", "ttl_s", type=int, default=None, help="lifetime in seconds")
def enroll_token_create(url: str, token: str | None, tags: str, uses: int, ttl_s: int | None) -> None:
    """Create an enrollment token and print it."""
    with common.api_client(url, token) as client:
        created = client.create_enroll_token(parse_tags(tags), uses, ttl_s)
    click.echo(created["token"])


@click.group(cls=ApiGroup)
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
    tags = parse_tags(",".join(tag_exprs))
    table = Table("id", "status", "arch", "tags", "last seen")
    with common.api_client(url, token) as client:
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
    with common.api_client(url, token) as client:
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
    with common.api_client(url, token) as client:
        d = client.tag_device(device_id, parse_tags(",".join(tags)), list(remove))
    click.echo(",".join(f"{k}={v}" for k, v in d["tags"].items()))


@devices.command("decommission")
@api_options
@click.argument("device_id")
def devices_decommission(url: str, token: str | None, device_id: str) -> None:
    """Retire a device: its certificate goes on the CRL, its download token stops working."""
    with common.api_client(url, token) as client:
        d = client.decommission_device(device_id)
    click.echo(f"{d['id']}: {d['status']}")
