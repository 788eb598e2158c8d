"""``fleet examples ...``: export and purge the hard examples the cloud tier kept for a model
(admin token; they are personal data)."""

from __future__ import annotations

import os
from pathlib import Path

import click

from server.cli import common
from server.cli.common import ApiGroup, api_options
from server.cli.models import parse_since


@click.group(cls=ApiGroup)
def examples() -> None:
    """Hard examples: escalated inputs and the cloud's answers, for retraining (personal data)."""


@examples.command("export")
@api_options
@click.argument("name")
@click.option("--out", "out", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="the .npz to write")  # fmt: skip
@click.option("--since", default=None, help="a duration back from now (24h, 7d) or an ISO time")
@click.option("--limit", type=click.IntRange(1, 100_000), default=None, help="the newest N only")
def examples_export(
    url: str, token: str | None, name: str, out: Path, since: str | None, limit: int | None
) -> None:
    """Write NAME's hard examples to OUT (.npz: inputs/<tensor> and outputs/<tensor> stacked along
    the batch axis; rows, device_ids, versions, times per example). Load with numpy.load."""
    partial = out.with_name(out.name + ".part")
    try:
        with common.api_client(url, token) as client, partial.open("wb") as fh:
            count = client.export_examples(name, fh, since=parse_since(since) if since else None, limit=limit)
        os.replace(partial, out)  # never a truncated .npz under the final name
    finally:
        partial.unlink(missing_ok=True)
    click.echo(f"{count} examples of {name} written to {out}")


@examples.command("purge")
@api_options
@click.argument("name")
@click.confirmation_option(prompt="Delete every hard example kept for this model?")
def examples_purge(url: str, token: str | None, name: str) -> None:
    """Delete every hard example kept for NAME."""
    with common.api_client(url, token) as client:
        deleted = client.purge_examples(name)["deleted"]
    click.echo(f"{deleted} examples of {name} deleted")
