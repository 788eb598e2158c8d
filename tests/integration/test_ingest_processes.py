"""MQTT ingest in a supervised child process (``Settings.ingest_processes``, server/mqtt/workers.py):
a live server whose consuming link runs in one child process brings a simulated fleet online and
completes a rollout with it; the child's counters reach the server's ``/metrics``; a child killed
with SIGKILL is restarted, its counts are kept and messages published after the restart are
ingested."""

from __future__ import annotations

import itertools
import os
import re
import signal
import threading
import time

import httpx
import pytest
import sqlalchemy as sa

from server.client import FleetClient
from server.devices.tables import Device, DeviceStatus
from server.health.tables import HealthSample
from server.mqtt.handlers import RECEIVED
from server.mqtt.identity import consumer_id, ingest_id
from server.mqtt.workers import IngestProcesses
from server.rollouts.tables import Deployment
from server.sim.fleet import SimOptions, Simulator
from server.sim.profiles import Profile
from server.sim.provision import enroll_fleet
from tests.helpers.device_fleet import push_model, wait_for
from tests.helpers.onnx_models import make_model
from tests.helpers.sim_rollout import sim_rollout_body

pytestmark = pytest.mark.mqtt

N = 30
RESTARTS = "fleet_ingest_process_restarts_total"
BACKENDS = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]


@pytest.fixture
def live_settings(live_settings):
    """The live server consumes device traffic in one ingest child process."""
    return live_settings.model_copy(update={"ingest_processes": 1})


def count(live, table, *where) -> int:
    with live.ctx.db.session_scope() as s:
        return int(s.scalar(sa.select(sa.func.count()).select_from(table).where(*where)))


def scrape(live) -> dict[str, float]:
    """GET /metrics of the live server: {'name' or 'name{labels}': value}."""
    r = httpx.get(f"{live.url}/metrics", timeout=10)
    r.raise_for_status()
    values = {}
    for line in r.text.splitlines():
        if line and not line.startswith("#"):
            key, value = line.rsplit(" ", 1)
            values[key] = float(value)
    return values


def metric_total(values: dict[str, float], name: str) -> float:
    return sum(v for k, v in values.items() if re.fullmatch(rf"{name}(\{{.*\}})?", k))


@pytest.mark.parametrize("database_url", BACKENDS, indirect=True)
def test_ingest_child_process_serves_a_fleet_and_survives_sigkill(live_server, tmp_path):
    live = live_server
    runtime = live.mqtt
    # -- a) the consuming link runs in the child, not in this process ---------------------------
    assert runtime.link is None
    assert runtime.ingest is None
    workers = runtime.workers
    assert workers is not None
    assert workers.count == 1
    assert runtime.wait_connected(10)
    assert runtime.connected
    [pid] = workers.pids()
    assert pid is not None
    assert pid != os.getpid()
    # one child keeps the client id (and so the broker session) of the in-process link
    assert ingest_id("test-server", 0, 1) == consumer_id("test-server")

    client = FleetClient(live.url, live.token("admin"))
    for v in ("1.0.0", "2.0.0"):
        push_model(live, "det", v, make_model(tmp_path / f"det-{v}.onnx", seed=int(v[0])))
    fleet = enroll_fleet(live.url, live.token("admin"), N, tmp_path / "sim", prefix="ip",
                         tags={"fleet": "ip"}, bulk=True)  # fmt: skip
    opts = SimOptions(
        processes=1, serving={"det": "1.0.0"}, health_window_s=0.5,
        profiles={"2.0.0": Profile(download_s=0.1, install_s=0.1, p95_ms=5.0)},
    )  # fmt: skip
    sim = Simulator(fleet, opts).start()
    try:
        assert sim.wait_connected(30), sim.stats()
        # the devices' presence was written by the child (this process has no consuming link)
        wait_for(lambda: count(live, Device, Device.status == DeviceStatus.online) == N, 20,
                 interval=0.1, what=f"{N} online")  # fmt: skip

        body = sim_rollout_body("ip", stages=[{"percent": 100, "soak_s": 0.5}])
        rid = client.create_rollout(body)["id"]
        state = client.wait_rollout(rid, poll_s=0.3, timeout_s=60)
        assert state["status"] == "completed", state
        assert state["phases"] == {"succeeded": N}, state["phases"]
        with live.ctx.db.session_scope() as s:
            phases = s.scalars(sa.select(Deployment.phase).where(Deployment.rollout_id == rid)).all()
        assert len(phases) == N
        assert {getattr(p, "value", p) for p in phases} == {"succeeded"}
        stats = sim.stats()
        assert stats["report_succeeded"] == N

        # the child's counters reach the server's /metrics (merged from its snapshots)
        def received_reports() -> float:
            return scrape(live).get(f'{RECEIVED}{{kind="report"}}', 0.0)

        wait_for(lambda: received_reports() >= stats["report_succeeded"], 10, interval=0.1,
                 what="reports counted in /metrics")  # fmt: skip
        values = scrape(live)
        assert metric_total(values, RECEIVED) >= N  # presence, reports, health windows
        assert values.get(f'{RECEIVED}{{kind="presence"}}', 0) >= N
        assert metric_total(values, RESTARTS) == 0
        assert workers.restarts == 0

        # -- b) SIGKILL the child: the supervisor restarts it, counters never go down ------------
        before_kill = live.ctx.metrics.total(RECEIVED)
        assert before_kill > 0
        samples: list[float] = [before_kill]
        sampling = threading.Event()

        def sample() -> None:
            while not sampling.is_set():
                samples.append(live.ctx.metrics.total(RECEIVED))
                sampling.wait(0.01)

        sampler = threading.Thread(target=sample, name="sample-received", daemon=True)
        sampler.start()
        try:
            os.kill(pid, signal.SIGKILL)
            new_pid = wait_for(lambda: (p := workers.pids()[0]) not in (None, pid) and p, 15,
                               interval=0.05, what="a new ingest process")  # fmt: skip
            assert workers.restarts == 1
            assert runtime.wait_connected(20), "the restarted ingest process did not subscribe"
            windows_after_restart = count(live, HealthSample)
            # health windows published after the restart are ingested by the new child
            wait_for(lambda: count(live, HealthSample) >= windows_after_restart + 2 * N, 15,
                     interval=0.1, what="health windows after the restart")  # fmt: skip
            # ... and its counts are added to those of its predecessor
            wait_for(lambda: live.ctx.metrics.total(RECEIVED) >= before_kill + 2 * N, 10,
                     interval=0.05, what="received counter growing after the restart")  # fmt: skip
        finally:
            sampling.set()
            sampler.join(5)
        assert new_pid != pid
        assert all(a <= b for a, b in itertools.pairwise(samples)), "a counter went down"
        assert min(samples) >= before_kill
        assert workers.restarts == 1
        values = scrape(live)
        assert metric_total(values, RESTARTS) == 1
        assert metric_total(values, RECEIVED) >= before_kill + 2 * N
        assert "# HELP fleet_ingest_process_restarts_total " in httpx.get(f"{live.url}/metrics").text
        assert sim.stats().get("desired_rejected", 0) == 0
    finally:
        sim.stop()


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_several_ingest_processes_need_shared_subscriptions(mqtt_settings):
    """No process is started: the constructor refuses N > 1 with plain subscriptions."""

    class Ctx:  # IngestProcesses reads nothing but the settings before it refuses
        settings = mqtt_settings.model_copy(update={"mqtt_shared_subscriptions": False})

    assert not Ctx.settings.shared_subscriptions
    with pytest.raises(ValueError, match="shared subscriptions"):
        IngestProcesses(Ctx(), 2)  # type: ignore[arg-type]
    # one process, or several with shared subscriptions, is accepted (not started)
    assert IngestProcesses(Ctx(), 1).count == 1  # type: ignore[arg-type]
    Ctx.settings = mqtt_settings.model_copy(update={"mqtt_shared_subscriptions": True})
    workers = IngestProcesses(Ctx(), 2)  # type: ignore[arg-type]
    assert workers.count == 2
    assert workers.pids() == [None, None]


@pytest.mark.parametrize("database_url", BACKENDS, indirect=True)
def test_messages_a_killed_ingest_process_had_not_written_are_delivered_again(
    live_settings, broker_process, tmp_path
):
    """The consuming link acknowledges a message only after its batch is committed. A device
    publishes 200 health windows (QoS 1); the ingest child receives them and waits out a long
    batch delay (3 s) before writing; it is killed half a second in; 200 more follow. Every one of
    the 400 windows is stored: the broker delivered the unwritten ones again to the restarted child
    (acknowledging on receipt, as paho does by default, loses the first 200)."""
    import ssl
    from datetime import UTC, datetime, timedelta

    import paho.mqtt.client as mqtt

    from device_client.protocol import HealthWindow
    from tests.helpers.live_server import LiveServer

    live = LiveServer(live_settings.model_copy(update={"ingest_batch_delay_s": 3.0})).start()
    try:
        workers = live.mqtt.workers
        assert workers is not None
        assert live.mqtt.wait_connected(10)
        [pid] = workers.pids()
        fleet = enroll_fleet(live.url, live.token("admin"), 1, tmp_path / "sim", prefix="ack", bulk=True)
        dev = fleet.devices[0]
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(fleet.ca_file))
        ctx.load_cert_chain(fleet.cert_file(dev.device_id), fleet.key_file(dev.device_id))
        device = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=dev.device_id, protocol=mqtt.MQTTv5)
        device.tls_set_context(ctx)
        device.max_inflight_messages_set(1000)
        device.connect(fleet.mqtt_host, fleet.mqtt_port)
        device.loop_start()

        start = datetime.now(UTC) - timedelta(seconds=5)

        def publish(seqs: range) -> None:
            # consecutive 10 ms windows (a window overlapping another of the device is refused)
            infos = [
                device.publish(f"fleet/v1/d/{dev.device_id}/health", HealthWindow.build(
                    device_id=dev.device_id, seq=seq, at=start + timedelta(seconds=seq / 100), window_s=0.01,
                    model="det", version="1.0.0",
                    requests=10, errors=0, p50_ms=1.0, p95_ms=2.0, p99_ms=3.0,
                ).to_json(), qos=1)
                for seq in seqs
            ]  # fmt: skip
            for info in infos:
                info.wait_for_publish(10)

        def stored() -> int:
            return count(live, HealthSample, HealthSample.device_id == dev.device_id)

        try:
            publish(range(1, 201))  # the broker has them (PUBACKed to the device)
            # the broker hands them to the child at once; it holds them for its 3 s batch delay
            # (nothing the parent can observe: the child counts a message when it parses the batch)
            time.sleep(0.5)
            assert stored() == 0
            os.kill(pid, signal.SIGKILL)
            wait_for(lambda: (p := workers.pids()[0]) not in (None, pid) and p, 15, interval=0.05,
                     what="a new ingest process")  # fmt: skip
            publish(range(201, 401))
            wait_for(lambda: stored() == 400, 20, interval=0.1, what="all 400 health windows stored")
            with live.ctx.db.session_scope() as s:
                q = sa.select(HealthSample.seq).where(HealthSample.device_id == dev.device_id)
                seqs = set(s.scalars(q))
            assert seqs == set(range(1, 401))
        finally:
            device.loop_stop()
            device.disconnect()
    finally:
        live.stop()


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_several_ingest_processes_connect_with_identities_of_their_own(mqtt_settings, tmp_path):
    """The broker binds client ids to certificates, so each of two ingest processes connects with
    a certificate of its own (CN = client id = ``fleet_server.NAME.ingest-I``), which the ACL the
    embedded broker was started with lists; they share the device traffic and store all of it."""
    from datetime import UTC, datetime, timedelta

    from device_client.protocol import HealthWindow
    from server.mqtt.broker import ACL_FILE, BrokerFiles, acl_users, free_port
    from server.runner import start_embedded_broker
    from tests.helpers.device_fleet import enroll_device
    from tests.helpers.live_server import LiveServer
    from tests.helpers.mosquitto import Broker, mqtt_connect

    port = free_port()
    s = mqtt_settings.model_copy(update={
        "ingest_processes": 2, "mqtt_shared_subscriptions": True, "port": port,
        "public_url": f"http://127.0.0.1:{port}",
    })  # fmt: skip
    process = start_embedded_broker(s)
    try:
        ids = ["fleet_server.test-server.ingest-0", "fleet_server.test-server.ingest-1"]
        assert set(ids) <= (acl_users(s.broker_dir / ACL_FILE) or set())
        live = LiveServer(s).start()
        try:
            assert live.mqtt.workers.count == 2
            dev = enroll_device(live, tmp_path / "dev", "dev-split")
            broker = Broker(ca=live.ctx.ca, files=BrokerFiles(s.broker_dir, s.mqtt_port), process=process,
                            workdir=s.broker_dir)  # fmt: skip
            device = mqtt_connect(broker, dev.cert_file, dev.key_file)
            try:
                now = datetime.now(UTC)
                infos = [
                    device.publish("fleet/v1/d/dev-split/health", HealthWindow.build(
                        device_id="dev-split", seq=seq, at=now - timedelta(seconds=41 - seq), window_s=1,
                        model="det", version="1.0.0",
                        requests=10, errors=0, p50_ms=1.0, p95_ms=2.0, p99_ms=3.0,
                    ).to_json(), qos=1)
                    for seq in range(1, 41)
                ]  # fmt: skip
                for info in infos:
                    info.wait_for_publish(10)
                wait_for(lambda: count(live, HealthSample) == 40, 20, interval=0.1, what="40 windows stored")
            finally:
                device.disconnect()
                device.loop_stop()
            assert live.mqtt.workers.connected
            assert live.mqtt.workers.restarts == 0
        finally:
            live.stop()
    finally:
        process.stop()
