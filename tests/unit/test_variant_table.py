"""``fleet rollout status``'s per-variant table (:func:`server.views.variant_table`): its columns
say what they show."""

from __future__ import annotations

from rich.console import Console

from server.views import variant_table


def render(state: dict) -> str:
    console = Console(width=200, record=True)
    table = variant_table(state)
    assert table is not None
    console.print(table)
    return console.export_text()


def test_the_error_rate_column_is_named_so():
    variants = {
        "default": {"devices_reporting": 2, "requests": 400, "errors": 40, "error_rate": 0.1, "p95_ms": 3.0},
        "int8": {"devices_reporting": 2, "requests": 400, "errors": 0, "error_rate": 0.0, "p95_ms": 2.0},
    }
    state = {"current_stage": 0, "stage_views": [{"index": 0, "health": {"variants": variants}}]}
    text = render(state)
    header = next(line for line in text.splitlines() if "variant" in line and "devices" in line)
    assert header.split("┃")[4].strip() == "error rate", text
    row = next(line for line in text.splitlines() if " default " in line)
    assert row.split("│")[4].strip() == "10.00%", text
