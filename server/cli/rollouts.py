"""``fleet rollout ...``: start, follow, inspect and steer staged rollouts through the admin API.
The tables and the live follow are :mod:`server.views`, which ``fleet demo`` shares."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click
from rich.markup import escape
from rich.table import Table

from server.cli import common
from server.cli.common import ApiGroup, api_options, console, parse_tags
from server.views import follow_rollout, rollout_table, routing_summary, variant_table

EXIT_BY_STATUS = {"completed": 0, "paused": 2, "aborted": 3, "rolled_back": 3}


def parse_gates(items: tuple[str, ...]) -> dict[str, float]:
    """``--gate name=value`` options as a gates object."""
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


def read_policy(path: Path) -> dict[str, Any]:
    """The routing policy in ``path``: a JSON object (the server checks the rest)."""
    try:
        policy = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise click.BadParameter(f"{path} is not a JSON file: {exc}", param_hint="--routing") from None
    if not isinstance(policy, dict):
        raise click.BadParameter(f"{path} holds no JSON object", param_hint="--routing")
    return policy


@click.group(cls=ApiGroup)
def rollout() -> None:
    """Staged rollouts gated on inference health."""


@rollout.command("start")
@api_options
@click.argument("model_name")
@click.argument("version")
@click.option("--stages", default="1,10,50,100", show_default=True, help="cumulative percents")
@click.option("--soak", type=float, default=60, show_default=True, help="soak seconds per stage")
@click.option("--shadow", is_flag=True, help="run the first stage in shadow mode (gated on agreement)")
@click.option(
    "--pause-after",
    is_flag=True,
    help="pause once each stage but the last passes: the next starts at `fleet rollout resume` (an approval)",
)
@click.option("--on-failure", type=click.Choice(["pause", "rollback"]), default="pause", show_default=True)
@click.option("--gate", "gates", multiple=True, help="name=value, e.g. max_error_rate=0.02 (repeatable)")
@click.option("--tag", "tag_exprs", multiple=True, help="select devices with key=value (repeat to AND)")
@click.option("--device", "device_ids", multiple=True, help="select these device ids")
@click.option("--arch", default=None, help="select devices of this architecture")
@click.option("--probation", "probation_s", type=float, default=None, help="device probation seconds")
@click.option(
    "--routing",
    "routing_file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="routing policy JSON (fleet.routing/1) the DesiredStates carry; without it they carry none",
)
@click.option(
    "--skip-unfit",
    is_flag=True,
    help="leave out the selected devices no variant of the version fits (else the start is refused)",
)
@click.option("--max-concurrent", type=int, default=50, show_default=True, help="concurrent downloads")
@click.option("--device-timeout", type=int, default=900, show_default=True)
@click.option(
    "--wait",
    is_flag=True,
    help="follow progress; exit 0 completed (offline devices may still be pending), 2 paused, "
    "3 rolled back/aborted",
)
def rollout_start(
    url: str,
    token: str | None,
    model_name: str,
    version: str,
    stages: str,
    soak: float,
    shadow: bool,
    pause_after: bool,
    on_failure: str,
    gates: tuple[str, ...],
    tag_exprs: tuple[str, ...],
    device_ids: tuple[str, ...],
    arch: str | None,
    probation_s: float | None,
    routing_file: Path | None,
    skip_unfit: bool,
    max_concurrent: int,
    device_timeout: int,
    wait: bool,
) -> None:
    """Start a staged rollout of MODEL_NAME VERSION (with --routing, of its routing policy too: the
    version the devices already run with a new policy is a rollout of the policy alone)."""
    try:
        percents = [float(p) for p in stages.split(",") if p.strip()]
    except ValueError:
        raise click.BadParameter(f"--stages must be comma-separated percents, got {stages!r}") from None
    body: dict[str, Any] = {
        "model": model_name,
        "version": version,
        "selector": selector_of(tag_exprs, device_ids, arch),
        "stages": [
            {
                "percent": p,
                "soak_s": soak,
                "shadow": shadow and i == 0,
                "pause_after": pause_after and i < len(percents) - 1,
            }
            for i, p in enumerate(percents)
        ],
        "gates": parse_gates(gates),
        "on_failure": on_failure,
        "max_concurrent_downloads": max_concurrent,
        "device_timeout_s": device_timeout,
    }
    if probation_s is not None:
        body["probation"] = {"seconds": probation_s}
    if routing_file is not None:
        body["routing"] = read_policy(routing_file)
    with common.api_client(url, token) as client:
        state = client.create_rollout(body, skip_unfit=skip_unfit or None)
        console.print(
            f"rollout [bold]{state['id']}[/bold] started: {state['devices']} devices in "
            f"{len(state['stage_views'])} stages"
        )
        if state.get("routing"):
            console.print(f"routing policy: {escape(routing_summary(state['routing']))}")
        for warning in state.get("warnings", []):
            console.print(f"[yellow]warning:[/yellow] {escape(warning)}")
        if wait:
            state = follow_rollout(console, client, state["id"])
    if wait:
        sys.exit(EXIT_BY_STATUS.get(state["status"], 1))


def selector_of(tag_exprs: tuple[str, ...], device_ids: tuple[str, ...], arch: str | None) -> dict[str, Any]:
    """The selector of ``--tag``, ``--device`` and ``--arch``."""
    return {
        "tags": parse_tags(",".join(tag_exprs)),
        "device_ids": list(device_ids),
        "hardware": {"arch": arch} if arch else {},
    }


@rollout.command("preview")
@api_options
@click.argument("model_name")
@click.argument("version")
@click.option("--tag", "tag_exprs", multiple=True, help="select devices with key=value (repeat to AND)")
@click.option("--device", "device_ids", multiple=True, help="select these device ids")
@click.option("--arch", default=None, help="select devices of this architecture")
@click.option("--json", "as_json", is_flag=True)
def rollout_preview(
    url: str,
    token: str | None,
    model_name: str,
    version: str,
    tag_exprs: tuple[str, ...],
    device_ids: tuple[str, ...],
    arch: str | None,
    as_json: bool,
) -> None:
    """Which variant of MODEL_NAME VERSION each selected device would get, and how many devices
    no variant fits (a rollout over them is refused unless started with --skip-unfit)."""
    with common.api_client(url, token) as client:
        preview = client.preview_rollout(model_name, version, selector_of(tag_exprs, device_ids, arch))
    if as_json:
        click.echo(json.dumps(preview, indent=2))
        return
    title = escape(f"{model_name} {version}: {preview['selected']} selected device(s)")
    table = Table("variant", "devices", title=title)
    for variant, count in preview["variants"].items():
        table.add_row(escape(variant), str(count))
    table.add_row(
        "[red]no variant fits[/red]" if preview["unfit"] else "no variant fits", str(preview["unfit"])
    )
    console.print(table)
    if preview["unfit"]:
        shown = preview["unfit_examples"]
        more = preview["unfit"] - len(shown)
        console.print(f"fit no variant: {escape(', '.join(shown))}{f' and {more} more' if more > 0 else ''}")


@rollout.command("status")
@api_options
@click.argument("rollout_id")
@click.option("--json", "as_json", is_flag=True)
def rollout_status(url: str, token: str | None, rollout_id: str, as_json: bool) -> None:
    with common.api_client(url, token) as client:
        state = client.get_rollout(rollout_id)
    if as_json:
        click.echo(json.dumps(state, indent=2))
    else:
        console.print(rollout_table(state))
        per_variant = variant_table(state)
        if per_variant is not None:
            console.print(per_variant)


@rollout.command("ls")
@api_options
@click.option("--model", "model_name", default=None, help="only rollouts of this model")
@click.option("--version", default=None, help="only rollouts of this version (with --model)")
def rollout_ls(url: str, token: str | None, model_name: str | None, version: str | None) -> None:
    """The newest rollouts (100 at most)."""
    table = Table("id", "model", "version", "status", "stage", "created")
    with common.api_client(url, token) as client:
        for r in client.list_rollouts(model=model_name, version=version):
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
        with common.api_client(url, token) as client:
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
