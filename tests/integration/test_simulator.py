"""The fleet simulator against a real server and a real Mosquitto (mTLS): 500 simulated devices,
each with its own enrolled identity and connection, complete a staged rollout; a bad version's
health profile trips its canary; a forged DesiredState is refused; real daemons run among
simulated devices."""

from __future__ import annotations

import json

import pytest
import sqlalchemy as sa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from device_client.daemon import Daemon
from device_client.protocol.signing import sign_envelope
from server.client import FleetClient
from server.devices.tables import Device, DeviceStatus
from server.health.tables import HealthSample
from server.sim.fleet import SimOptions, Simulator
from server.sim.profiles import Profile
from server.sim.provision import enroll_fleet
from tests.helpers.device_fleet import device_settings, enroll_device, push_model, wait_for
from tests.helpers.onnx_models import make_model
from tests.helpers.sim_rollout import sim_rollout_body

pytestmark = [pytest.mark.mqtt, pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)]


def count(live, *where) -> int:
    with live.ctx.db.session_scope() as s:
        return int(s.scalar(sa.select(sa.func.count()).select_from(Device).where(*where)))


def rollout(client: FleetClient, version: str, **over) -> dict:
    stages = [{"percent": 10, "soak_s": 2}, {"percent": 100, "soak_s": 2}]
    body = sim_rollout_body("sim", version, stages=stages, probation={"seconds": 0.5}, on_failure="rollback")
    return client.create_rollout({**body, **over})


def test_500_simulated_devices_complete_a_staged_rollout(live_server, tmp_path):
    live = live_server
    client = FleetClient(live.url, live.token("admin"))
    for v in ("1.0.0", "2.0.0"):
        push_model(live, "det", v, make_model(tmp_path / f"det-{v}.onnx", seed=int(v[0])))
    fleet = enroll_fleet(live.url, live.token("admin"), 500, tmp_path / "sim", tags={"fleet": "sim"})
    assert len({d.device_id for d in fleet.devices}) == 500
    opts = SimOptions(
        processes=2, serving={"det": "1.0.0"}, health_window_s=1.0,
        profiles={"2.0.0": Profile(download_s=0.2, install_s=0.1, p95_ms=9.0)},
    )  # fmt: skip
    sim = Simulator(fleet, opts).start()
    try:
        assert sim.wait_connected(60), sim.stats()
        # every device's retained "online" presence reached the server through the shared subscription
        wait_for(lambda: count(live, Device.status == DeviceStatus.online) == 500, 30, what="500 online")
        state = client.wait_rollout(rollout(client, "2.0.0")["id"], poll_s=0.5, timeout_s=120)
        assert state["status"] == "completed", state
        assert state["phases"].get("succeeded") == 500, state["phases"]
        # the server now knows each device serves 2.0.0 (from the devices' reports)
        with live.ctx.db.session_scope() as s:
            serving = list(s.scalars(sa.select(Device.serving)))
            windows = s.scalar(sa.select(sa.func.count()).select_from(HealthSample))
            versions = set(s.scalars(sa.select(HealthSample.version).distinct()))
        assert all(x == {"det": "2.0.0"} for x in serving)
        assert windows >= 500
        assert versions == {"1.0.0", "2.0.0"}
        stats = sim.stats()
        assert stats["desired_accepted"] == 500  # each verified its director-signed DesiredState
        assert stats.get("desired_rejected", 0) == 0
        assert stats["report_succeeded"] == 500
    finally:
        sim.stop()
    # a stopping device publishes its retained "offline" presence
    wait_for(lambda: count(live, Device.status == DeviceStatus.offline) == 500, 30, what="500 offline")


def test_bad_version_profile_trips_the_canary_and_forged_desired_state_is_refused(live_server, tmp_path):
    live = live_server
    client = FleetClient(live.url, live.token("admin"))
    for v in ("1.0.0", "3.0.0"):
        push_model(live, "det", v, make_model(tmp_path / f"det-{v}.onnx", seed=int(v[0])))
    fleet = enroll_fleet(live.url, live.token("admin"), 40, tmp_path / "sim", tags={"fleet": "sim"})
    opts = SimOptions(
        processes=1, serving={"det": "1.0.0"}, health_window_s=0.3,
        profiles={"3.0.0": Profile(error_rate=0.4)},
    )  # fmt: skip
    sim = Simulator(fleet, opts).start()
    try:
        assert sim.wait_connected(30)
        wait_for(lambda: count(live, Device.status == DeviceStatus.online) == 40, 30, what="40 online")
        state = client.wait_rollout(rollout(client, "3.0.0")["id"], poll_s=0.5, timeout_s=60)
        assert state["status"] == "rolled_back", state
        assert "error rate" in state["reason"]

        # a DesiredState signed by a key that is not the director's is refused by the device
        victim = fleet.devices[0].device_id
        forged = sign_envelope({"schema": "fleet.desired/1", "device_id": victim, "seq": 10**6},
                               Ed25519PrivateKey.generate())  # fmt: skip
        live.mqtt.link.publish(f"fleet/v1/d/{victim}/desired", json.dumps(forged).encode(), 1, False)
        wait_for(lambda: sim.stats().get("desired_rejected", 0) == 1, 10, what="forged state refused")
    finally:
        sim.stop()


def test_real_daemon_among_simulated_devices(live_server, tmp_path):
    live = live_server
    client = FleetClient(live.url, live.token("admin"))
    push_model(live, "det", "1.0.0", make_model(tmp_path / "det-1.onnx", seed=1))
    fleet = enroll_fleet(live.url, live.token("admin"), 20, tmp_path / "sim", tags={"fleet": "sim"})
    enroll_device(live, tmp_path / "real", "real-1")
    client.tag_device("real-1", {"fleet": "sim"})
    # the simulated devices report health (the real one serves no traffic): the stages' evidence
    sim = Simulator(fleet, SimOptions(processes=1, health_window_s=1.0)).start()
    daemon = Daemon(device_settings(tmp_path / "real")).start()
    try:
        assert sim.wait_connected(30)
        assert daemon.link is not None
        assert daemon.link.wait_connected(10)
        wait_for(lambda: count(live, Device.status == DeviceStatus.online) == 21, 30, what="21 online")
        state = client.wait_rollout(
            rollout(client, "1.0.0", gates={"max_error_rate": None, "max_p95_ratio": None,
                                            "min_agreement": None})["id"],
            poll_s=0.5, timeout_s=90,
        )  # fmt: skip
        assert state["status"] == "completed", state
        assert state["phases"].get("succeeded") == 21, state["phases"]
        assert daemon.state.current["det"].version == "1.0.0"  # the real one really installed it
    finally:
        daemon.stop()
        sim.stop()
