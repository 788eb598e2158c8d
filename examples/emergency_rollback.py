"""Emergency rollback: roll back every running or paused rollout of one model.

    FLEET_URL=https://fleet.example FLEET_TOKEN=... python examples/emergency_rollback.py MODEL

Each rollout goes to ``rolling_back``: the devices it touched get their previous version back.
Prints one line per rollout; exit code 1 if any could not be rolled back.
"""

from __future__ import annotations

import os
import sys

from server.client import DEFAULT_URL, FleetAPIError, FleetClient

ACTIVE = ["running", "paused"]


def main(model: str) -> int:
    failed = 0
    with FleetClient(os.environ.get("FLEET_URL", DEFAULT_URL), os.environ.get("FLEET_TOKEN")) as fleet:
        for rollout in fleet.list_rollouts(status=ACTIVE, limit=1000, model=model):
            try:
                after = fleet.rollout_action(rollout["id"], "rollback")
                print(f"{rollout['id']} {rollout['version']}: {rollout['status']} -> {after['status']}")
            except FleetAPIError as exc:
                failed += 1
                print(f"{rollout['id']} {rollout['version']}: cannot roll back: {exc}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    sys.exit(main(sys.argv[1]))
