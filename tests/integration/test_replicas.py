"""Two server replicas against ONE PostgreSQL database and ONE broker (docs/architecture.md: shared
subscriptions split the device messages; the rollout engine's row lock means a rollout is advanced
by one replica at a time). Simulated devices (server/sim) speak the real protocol."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import sqlalchemy as sa

from server.client import FleetClient
from server.devices.tables import DeviceEvent
from server.mqtt.broker import MosquittoProcess, free_port, write_broker_config
from server.mqtt.handlers import RECEIVED
from server.mqtt.identity import connection_ids
from server.rollouts.tables import Deployment, DesiredRecord
from server.sim.fleet import SimOptions, Simulator
from server.sim.profiles import Profile
from server.sim.provision import enroll_fleet
from server.trust.pki import FleetCA
from tests.helpers.device_fleet import push_model, wait_for
from tests.helpers.live_server import LiveServer
from tests.helpers.onnx_models import make_model
from tests.helpers.sim_rollout import sim_rollout_body

pytestmark = [pytest.mark.mqtt, pytest.mark.parametrize("database_url", ["postgres"], indirect=True)]

N = 60


@pytest.fixture
def broker_process(mqtt_settings) -> Iterator[MosquittoProcess]:
    """The broker, its ACL listing both replicas' identities (`fleet broker config --server-name
    replica-a --server-name replica-b`)."""
    s = mqtt_settings
    s.key_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    identities = [i for name in ("replica-a", "replica-b") for i in connection_ids(name, s.ingest_processes)]
    files = write_broker_config(
        FleetCA(s.key_dir), s.broker_dir, port=s.mqtt_port, server_identities=identities
    )
    broker = MosquittoProcess(files).start()
    yield broker
    broker.stop()


@pytest.fixture
def replicas(live_settings, live_server):
    """(replica A, replica B): the same data_dir (keys, repository, broker files), database and
    broker; distinct names, so distinct MQTT identities in the shared subscription group."""
    port = free_port()
    b = LiveServer(
        live_settings.model_copy(
            update={"port": port, "public_url": f"http://127.0.0.1:{port}", "mqtt_server_name": "replica-b"}
        )
    )
    b.start()
    yield live_server, b
    b.stop()


def test_two_replicas_share_the_messages_and_advance_a_rollout_once(replicas, tmp_path):
    a, b = replicas
    # each connection has an identity of its own: its certificate CN is its client id
    for replica, name in ((a, "replica-a"), (b, "replica-b")):
        ids = (replica.mqtt.link.client_id, replica.mqtt.publisher.client_id)
        assert ids == (f"fleet_server.{name}", f"fleet_server.{name}.pub")
    assert a.mqtt.link.shared
    assert b.mqtt.link.shared
    client_a, client_b = FleetClient(a.url, a.token("admin")), FleetClient(b.url, b.token("admin"))
    for v in ("1.0.0", "2.0.0"):
        push_model(a, "det", v, make_model(tmp_path / f"det-{v}.onnx", seed=int(v[0])))
    fleet = enroll_fleet(  # the simulator's bulk path (POST /api/v1/enroll/bulk)
        a.url, a.token("admin"), N, tmp_path / "sim", prefix="rep", tags={"fleet": "r"}, bulk=True
    )
    opts = SimOptions(
        processes=1, serving={"det": "1.0.0"}, health_window_s=0.5,
        profiles={"2.0.0": Profile(download_s=0.1, install_s=0.1, p95_ms=5.0)},
    )  # fmt: skip
    sim = Simulator(fleet, opts).start()
    try:
        assert sim.wait_connected(60), sim.stats()
        body = sim_rollout_body("r", stages=[{"percent": p, "soak_s": 1} for p in (20, 60, 100)])
        rid = client_b.create_rollout(body)["id"]
        state = client_a.wait_rollout(rid, poll_s=0.5, timeout_s=180)
        assert state["status"] == "completed", state
        assert state["phases"] == {"succeeded": N}, state["phases"]

        # both replicas consumed device messages through the shared subscription, which split
        # them: each report reached one replica (plain subscriptions would give both every one)
        wait_for(lambda: a.ctx.metrics.total(RECEIVED) > 0 and b.ctx.metrics.total(RECEIVED) > 0,
                 30, what="both replicas received messages")  # fmt: skip
        with a.ctx.db.session_scope() as s:
            stored = s.scalar(sa.select(sa.func.count()).select_from(DeviceEvent))
        got = [r.ctx.metrics.get(RECEIVED, kind="report") for r in (a, b)]
        assert stored >= 3 * N  # phase reports, several per device
        assert min(got) > 0
        assert sum(got) < 1.5 * stored, (got, stored)
        # both ran the engine, yet every device was notified exactly once
        assert a.app.state.engine.ticks > 0
        assert b.app.state.engine.ticks > 0
        with a.ctx.db.session_scope() as s:
            seqs = s.execute(sa.select(DesiredRecord.device_id, DesiredRecord.seq)).all()
            notified = s.scalars(sa.select(Deployment.desired_seq).where(Deployment.rollout_id == rid)).all()
        assert len(seqs) == N
        assert {seq for _, seq in seqs} == {1}
        assert notified == [1] * N
        stats = sim.stats()
        assert stats["desired_accepted"] == N
        assert stats["report_succeeded"] == N
        # two promotions and one completion in the audit log, whichever replica wrote them
        promotions = [e for e in client_b.audit(action="rollout.promote") if e["target_id"] == rid]
        completions = [e for e in client_b.audit(action="rollout.complete") if e["target_id"] == rid]
        assert (len(promotions), len(completions)) == (2, 1)
    finally:
        sim.stop()
    print(f"received: A {a.ctx.metrics.total(RECEIVED):.0f}, B {b.ctx.metrics.total(RECEIVED):.0f}")


@pytest.fixture
def live_settings(live_settings):
    """Replicas consume through the shared subscription (the default with an external broker)."""
    return live_settings.model_copy(
        update={"mqtt_shared_subscriptions": True, "mqtt_server_name": "replica-a"}
    )

