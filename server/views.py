"""Rich views of a rollout, shared by ``fleet rollout`` and ``fleet demo``: the per-stage progress
table and the live follow of a running rollout, printed on the console the caller gives."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from device_client.console import live_display
from server.client import FleetClient


def routing_summary(policy: dict[str, Any] | None) -> str:
    """One line for a routing policy: its mode, the cloud model it asks, the confidence threshold."""
    if not policy:
        return "none (edge only)"
    parts = [str(policy.get("mode"))]
    cloud = policy.get("cloud") or {}
    if cloud:
        where = "" if cloud.get("endpoint", "fleet") == "fleet" else f" at {cloud['endpoint']}"
        parts.append(f"cloud {cloud.get('model')} {cloud.get('version') or '(active)'}{where}")
    confidence = policy.get("confidence") or {}
    if confidence:
        parts.append(f"{confidence.get('kind', 'max_prob')} threshold {confidence.get('threshold')}")
    return ", ".join(parts)


def rollout_table(state: dict[str, Any]) -> Table:
    """Per-stage progress of a rollout as a rich table; the escalation rate and cloud agreement of
    hybrid routing when a stage reports them."""
    # escaped: rich reads "[running]" as a markup tag and drops it
    title = escape(f"rollout {state['id']}: {state['model']} {state['version']} [{state['status']}]")
    if state.get("routing"):
        title += escape(f"\nrouting: {routing_summary(state['routing'])}")
    if state.get("unfit_skipped"):
        title += escape(
            f"\n{state['unfit_skipped']} selected device(s) fit no variant: left out (skip_unfit)"
        )
    hybrid = any(
        v["health"].get("escalation_rate") is not None or v["health"].get("cloud_agreement") is not None
        for v in state["stage_views"]
    )
    columns = ["stage", "devices", "succeeded", "failed", "in progress", "errors", "p95 ms", "agreement"]
    table = Table(*columns, *(("escalated", "cloud agr.") if hybrid else ()), title=title)
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
            *((_share(h.get("escalation_rate")), _ratio(h.get("cloud_agreement"))) if hybrid else ()),
        )
    if state.get("reason"):
        table.caption = state["reason"]
    elif state.get("offline_pending"):
        table.caption = f"{state['offline_pending']} device(s) offline, to update when they return"
    return table


def variant_table(state: dict[str, Any]) -> Table | None:
    """Health per variant of the new version on the current stage's devices (requests, error
    rate, p95, CPU per request): what the gates judge per variant. None before any device of the
    stage reported, and when every device serves the ``default`` variant."""
    views = state["stage_views"]
    if not views:
        return None
    view = views[min(state["current_stage"], len(views) - 1)]
    variants = view["health"].get("variants") or {}
    if not variants or list(variants) == ["default"]:
        return None  # the stage table says it all
    title = escape(f"stage {view['index'] + 1} per variant")
    table = Table("variant", "devices", "requests", "error rate", "p95 ms", "CPU ms/request", title=title)
    for name, h in sorted(variants.items()):
        table.add_row(
            escape(name),
            str(h.get("devices_reporting", 0)),
            str(h.get("requests", 0)),
            "" if h.get("error_rate") is None else f"{h['error_rate']:.2%}",
            "" if h.get("p95_ms") is None else f"{h['p95_ms']:.1f}",
            "" if h.get("cpu_ms_per_request") is None else f"{h['cpu_ms_per_request']:.3f}",
        )
    return table


def _share(value: float | None) -> str:
    return "" if value is None else f"{value:.1%}"


def _ratio(value: float | None) -> str:
    return "" if value is None else f"{value:.3f}"


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
