"""Weekly waves: roll MODEL VERSION out in waves spread over days, each next wave starting only
once the wave before passed its gates and an operator approved. Meant to run once a day (cron):

    FLEET_URL=https://fleet.example FLEET_TOKEN=... python examples/weekly_waves.py MODEL VERSION \\
        [--tag site=berlin] [--waves 5,25,50,100] [--soak-s 72000] [--approve | --approval-file PATH]

The first run creates the rollout: one stage per wave, each soaking ``--soak-s`` (20 h by default,
so a daily run finds its verdict) with ``pause_after``: once a wave passes its gates the rollout
pauses. A later run reports where the rollout is and, when it waits for approval and approval is
given (``--approve``, or the approval file exists: it is removed once used, one file one wave),
resumes it: the next wave starts.

Exit code 0: nothing needs a person (started, a wave in progress, approved, completed); 10: a wave
passed and waits for approval; 11: paused for another reason (its reason says why); 12: rolled
back or aborted; 1: the server refused or could not be reached; 2: bad arguments. The rollout's
codes stay clear of the ones Python and argparse use, so a cron wrapper can tell them apart.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from server.client import DEFAULT_URL, FleetAPIError, FleetClient

ACTIVE = ["draft", "running", "paused", "rolling_back"]
#: how the engine words the reason of a rollout paused after a stage with ``pause_after``
APPROVAL = "waits for approval"
WAITS_FOR_APPROVAL, PAUSED, ROLLED_BACK = 10, 11, 12


def tag(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE")
    return key, value


def percents(text: str) -> list[float]:
    try:
        return [float(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not comma-separated percents") from None


def find_rollout(fleet: FleetClient, model: str, version: str) -> dict[str, Any] | None:
    """The active rollout of MODEL VERSION, else its latest finished one, else None."""
    for status in (ACTIVE, None):
        mine = fleet.list_rollouts(status=status, limit=1, model=model, version=version)
        if mine:
            return mine[0]  # the newest
    return None


def wave_numbers(verdict: dict[str, Any]) -> str:
    numbers = verdict.get("numbers") or {}
    keys = ("requests", "error_rate", "p95_ms", "p95_ratio")
    return ", ".join(f"{k} {numbers[k]}" for k in keys if numbers.get(k) is not None)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("version")
    parser.add_argument(
        "--tag", type=tag, action="append", default=[], help="KEY=VALUE: select devices by tag"
    )
    parser.add_argument(
        "--waves", type=percents, default="5,25,50,100", help="cumulative percent of each wave"
    )
    parser.add_argument("--soak-s", type=float, default=72000.0, help="each wave's soak before its verdict")
    parser.add_argument("--min-requests", type=int, default=100, help="requests each wave's gates need")
    parser.add_argument("--max-p95-ratio", type=float, default=1.5, help="0: no latency gate")
    parser.add_argument("--probation-s", type=float, default=300.0, help="each device's own probation")
    parser.add_argument("--approve", action="store_true", help="start the next wave if this one passed")
    parser.add_argument("--approval-file", type=Path, help="approve when this file exists (then remove it)")
    args = parser.parse_args(argv)
    try:
        return run(args)
    except FleetAPIError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


def run(args: argparse.Namespace) -> int:
    with FleetClient(os.environ.get("FLEET_URL", DEFAULT_URL), os.environ.get("FLEET_TOKEN")) as fleet:
        rollout = find_rollout(fleet, args.model, args.version)
        if rollout is None:
            created = fleet.create_rollout(
                {
                    "model": args.model,
                    "version": args.version,
                    "selector": {"tags": dict(args.tag)},
                    "stages": [
                        {"percent": p, "soak_s": args.soak_s, "pause_after": True} for p in args.waves
                    ],
                    "gates": {"min_requests": args.min_requests, "max_p95_ratio": args.max_p95_ratio or None},
                    "probation": {"seconds": args.probation_s, "min_requests": min(args.min_requests, 10)},
                    "on_failure": "rollback",
                }
            )
            print(f"rollout {created['id']}: wave 1 of {len(created['stages'])} started")
            return 0

        rid, status, wave = rollout["id"], rollout["status"], rollout["current_stage"] + 1
        waves = len(rollout["stages"])
        reason = rollout["reason"] or ""
        if status == "completed":
            print(f"rollout {rid}: completed, all {waves} waves")
            return 0
        if status in ("rolled_back", "rolling_back", "aborted"):
            print(f"rollout {rid}: {status}: {reason}")
            return ROLLED_BACK
        if status == "paused" and APPROVAL in reason:
            print(f"rollout {rid}: wave {wave - 1} of {waves} passed ({wave_numbers(rollout['verdict'])})")
            approved = args.approve or (args.approval_file is not None and args.approval_file.exists())
            if not approved:
                print(f"wave {wave} waits for approval (--approve or --approval-file)")
                return WAITS_FOR_APPROVAL
            fleet.rollout_action(rid, "resume")
            if args.approval_file is not None:
                args.approval_file.unlink(missing_ok=True)
            print(f"approved: wave {wave} of {waves} started")
            return 0
        if status == "paused":
            print(f"rollout {rid}: paused in wave {wave} of {waves}: {reason}")
            return PAUSED
        print(f"rollout {rid}: wave {wave} of {waves} in progress" + (f": {reason}" if reason else ""))
        return 0


if __name__ == "__main__":
    sys.exit(main())
