"""Rich views of a rollout, shared by ``fleet rollout`` and ``fleet demo``: the per-stage progress
table and the live follow of a running rollout, printed on the console the caller gives."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from device_client.console import live_display
from server.client import FleetClient


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
    elif state.get("offline_pending"):
        table.caption = f"{state['offline_pending']} device(s) offline, to update when they return"
    return table


def follow_rollout(
    console: Console, client: FleetClient, rollout_id: str, poll_s: float = 1.0
) -> dict[str, Any]:
    """Live per-stage progress on ``console`` until the rollout stops; returns its final state."""
    with live_display(console) as live:
        state = client.wait_rollout(
            rollout_id, poll_s=poll_s, on_update=lambda s: live.update(rollout_table(s))
        )
    colour = "green" if state["status"] == "completed" else "red"
    console.print(f"[{colour}]rollout {rollout_id} {state['status']}[/{colour}]")
    if state.get("offline_pending"):
        console.print(
            f"{state['offline_pending']} device(s) offline have not taken it yet: "
            "they will when they return (fleet rollout status shows them)"
        )
    return state
