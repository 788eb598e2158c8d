"""Canary by site tag: roll MODEL VERSION out to the devices tagged site=SITE, a canary share first;
once the canary has soaked, promote it (the gates judge its health) and wait for the verdict and
the rest of the rollout.

    FLEET_URL=https://fleet.example FLEET_TOKEN=... python examples/canary_by_site.py \\
        MODEL VERSION --site berlin [--canary-percent 10] [--soak-s 600] [--min-requests 100]

Exit code 0 when the rollout completed, 1 otherwise (its verdict says why).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

from server.client import DEFAULT_URL, FleetClient

POLL_S = 1.0


def wait_canary_settled(fleet: FleetClient, rollout_id: str) -> dict[str, Any]:
    """Until every canary device has updated (the soak began) or the rollout stopped."""
    while True:
        state = fleet.get_rollout(rollout_id)
        if state["status"] != "running" or state["current_stage"] > 0 or state["soak_until"]:
            return state
        time.sleep(POLL_S)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("version")
    parser.add_argument("--site", required=True)
    parser.add_argument("--canary-percent", type=float, default=10.0)
    parser.add_argument("--soak-s", type=float, default=600.0, help="canary soak before promoting")
    parser.add_argument("--min-requests", type=int, default=100, help="requests the gates need")
    parser.add_argument("--max-p95-ratio", type=float, default=1.5, help="0: no latency gate")
    parser.add_argument("--probation-s", type=float, default=300.0, help="each device's own probation")
    args = parser.parse_args(argv)

    body = {
        "model": args.model,
        "version": args.version,
        "selector": {"tags": {"site": args.site}},
        # the canary's soak is cut short by the promote below; the script's --soak-s decides
        "stages": [{"percent": args.canary_percent, "soak_s": 86400}, {"percent": 100, "soak_s": 0}],
        "gates": {"min_requests": args.min_requests, "max_p95_ratio": args.max_p95_ratio or None},
        "probation": {"seconds": args.probation_s, "min_requests": min(args.min_requests, 10)},
        "on_failure": "rollback",
    }
    with FleetClient(os.environ.get("FLEET_URL", DEFAULT_URL), os.environ.get("FLEET_TOKEN")) as fleet:
        rollout = fleet.create_rollout(body)
        rid = rollout["id"]
        print(f"rollout {rid}: {args.model} {args.version} to site={args.site}")
        state = wait_canary_settled(fleet, rid)
        if state["status"] == "running" and state["current_stage"] == 0:
            print(f"canary updated; soaking {args.soak_s:g} s")
            time.sleep(args.soak_s)
            fleet.rollout_action(rid, "promote")  # skip the rest of the soak: the gates judge now
        reasons: set[str] = set()

        def progress(state: dict[str, Any]) -> None:
            if state["reason"] and state["reason"] not in reasons:
                reasons.add(state["reason"])
                print(state["reason"])

        final = fleet.wait_rollout(rid, poll_s=POLL_S, on_update=progress)
    print(f"rollout {rid}: {final['status']}")
    print(json.dumps(final["verdict"], indent=2, sort_keys=True))
    return 0 if final["status"] == "completed" else 1


if __name__ == "__main__":
    sys.exit(main())
