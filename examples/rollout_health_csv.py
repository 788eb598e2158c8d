"""Export a rollout's health per stage to CSV: one row per stage with its devices, their phases and
the stage's health as ``GET /api/v1/rollouts/{id}`` computes it (error rate, p95, requests, ...),
then a ``baseline`` row (the same devices before the rollout).

    FLEET_URL=https://fleet.example FLEET_TOKEN=... python examples/rollout_health_csv.py ROLLOUT_ID [OUT.csv]

Writes to stdout without OUT.csv.
"""

from __future__ import annotations

import csv
import os
import sys
from typing import Any, TextIO

from server.client import DEFAULT_URL, FleetClient


def rows(rollout: dict[str, Any]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for view in rollout["stage_views"]:
        row: dict[str, Any] = {
            "rollout": rollout["id"],
            "stage": view["index"] + 1,
            "devices": view["devices"],
            "shadow": view["shadow"],
        }
        row.update({f"phase_{k}": v for k, v in sorted(view["phases"].items())})
        row.update({k: v for k, v in view["health"].items() if not isinstance(v, (dict, list))})
        out.append(row)
    baseline = {k: v for k, v in rollout["baseline"].items() if not isinstance(v, (dict, list))}
    out.append({"rollout": rollout["id"], "stage": "baseline", **baseline})
    return out


def write(rollout: dict[str, Any], fh: TextIO) -> None:
    table = rows(rollout)
    fields: list[str] = []
    for row in table:
        fields += [k for k in row if k not in fields]
    writer = csv.DictWriter(fh, fieldnames=fields)
    writer.writeheader()
    writer.writerows(table)


def main(rollout_id: str, out: str | None) -> int:
    with FleetClient(os.environ.get("FLEET_URL", DEFAULT_URL), os.environ.get("FLEET_TOKEN")) as fleet:
        rollout = fleet.get_rollout(rollout_id)
    if out is None:
        write(rollout, sys.stdout)
    else:
        with open(out, "w", newline="") as fh:
            write(rollout, fh)
    return 0


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3):
        sys.exit(__doc__)
    sys.exit(main(sys.argv[1], sys.argv[2] if len(sys.argv) == 3 else None))
