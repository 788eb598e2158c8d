"""A Mosquitto restart in the middle of a rollout stage loses no report, and the rollout completes.

Four real daemons (in process) and a live server. While the first stage's devices are downloading,
the broker is stopped (SIGTERM: it saves its persistence file on the way out) or killed (SIGKILL,
after a SIGUSR1 save: a long-running broker has autosaved the server's session long before it
crashes), kept down until each of those devices has journaled reports it could not send, then
started again on the same port with the same configuration and persistence directory. Every
report a device allocated must reach ``device_events`` (no gap in its seq), nothing may stay
journaled on a device, and the rollout must complete with every device having succeeded.

Shared subscriptions are not restored by Mosquitto 2.0 after a restart, so the server on the
embedded broker subscribes plainly (``Settings.shared_subscriptions``); with that, no report is lost.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest

from tests.helpers.chaos_rig import Fleet, chaos_rollout, running_rig
from tests.helpers.device_fleet import push_model, wait_for
from tests.helpers.onnx_models import make_model

pytestmark = pytest.mark.mqtt

IDS = [f"edge-b{i}" for i in range(4)]
STAGES = [{"count": 2, "soak_s": 0}, {"percent": 100, "soak_s": 0}]
STARTED = {"downloading", "verifying", "installing", "probation", "succeeded"}


def follow(fleet: Fleet, rollout_id: str, timeout: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout
    state: dict = {}
    while time.monotonic() < deadline:
        state = fleet.client.get_rollout(rollout_id)
        if state["status"] not in ("running", "draft"):
            return state
        time.sleep(0.2)
    raise AssertionError(f"rollout still {state['status']}: {fleet.deployments(rollout_id)}")


@pytest.mark.parametrize(
    "how",
    [
        # on SIGTERM every device's will fires; devices that began the update still block the stage
        "sigterm",
        # the server on the embedded broker subscribes plainly, which Mosquitto restores
        "sigkill",
    ],
)
def test_broker_restart_mid_stage_loses_no_report(tmp_path: Path, how: str) -> None:
    with running_rig(tmp_path) as rig:
        push_model(rig.live, "clf", "1.0.0", make_model(tmp_path / "m1.onnx", out_dim=20_000))
        fleet = Fleet.on(
            rig,
            tmp_path / "devices",
            IDS,
            download_rate_limit_bps=250_000,  # ~1.6 s per download
            reconnect_min_s=1,
            reconnect_max_s=2,
        )
        try:
            fleet.start()
            first_seq = {d: fleet.report_seq(d) for d in IDS}
            rollout = fleet.client.create_rollout(chaos_rollout("1.0.0", STAGES))

            def stage_one_started() -> list[str]:
                deps = fleet.deployments(rollout["id"])
                ids = [d for d, (stage, _) in deps.items() if stage == 0]
                return ids if ids and all(deps[d][1] in STARTED for d in ids) else []

            stage1 = wait_for(stage_one_started, timeout=30, interval=0.05, what="stage 1 downloading")
            assert fleet.client.get_rollout(rollout["id"])["current_stage"] == 0
            if how == "sigterm":
                rig.broker.stop()
            else:
                assert rig.broker.proc is not None
                rig.broker.proc.send_signal(signal.SIGUSR1)  # write the persistence file now
                time.sleep(0.5)  # (the signal is handled asynchronously; nothing observable to poll)
                rig.broker.kill()
            # the outage: the first stage's devices carry on and journal what they cannot send
            wait_for(
                lambda: all(fleet.unacked(d) > 0 for d in stage1),
                timeout=30,
                what="reports journaled during the outage",
            )
            rig.broker.start()

            # no report lost: every seq each device allocated is stored, none left in a journal
            for d in IDS:
                wait_for(lambda d=d: fleet.unacked(d) == 0, timeout=30, what=f"{d} journal drained")
            wait_for(
                lambda: all(fleet.event_seqs(d)[-1:] == [fleet.report_seq(d)] for d in stage1),
                timeout=15,
                what=f"the reports of {stage1} stored: {[fleet.event_seqs(d) for d in stage1]}",
            )

            final = follow(fleet, rollout["id"])
            assert final["status"] == "completed", (final["reason"], fleet.deployments(rollout["id"]))
            assert {p for _, p in fleet.deployments(rollout["id"]).values()} == {"succeeded"}
            for d in IDS:
                last = fleet.report_seq(d)
                wait_for(lambda d=d, last=last: fleet.event_seqs(d)[-1:] == [last], timeout=20, what=d)
                assert fleet.event_seqs(d) == list(range(first_seq[d] + 1, last + 1)), d
        finally:
            fleet.stop()
