"""PostgreSQL connections dropped under a live server are retried.

A live server on PostgreSQL runs a two-stage rollout to four real daemons. While the devices
update (reports being ingested, the engine ticking, the outbox publishing), every connection of the
server is terminated with ``pg_terminate_backend`` again and again. Nothing may be lost: every
report each device allocated is stored (ingest retries its batch), the rollout completes (the
engine's next tick carries on, the outbox publisher retries), and the admin API answers right after
each drop (``pool_pre_ping`` replaces dead pooled connections). Skipped without
FLEET_TEST_POSTGRES_URL.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa

from tests.helpers.chaos_rig import Fleet, chaos_rollout, running_rig
from tests.helpers.device_fleet import push_model, wait_for
from tests.helpers.onnx_models import make_model

pytestmark = [pytest.mark.mqtt, pytest.mark.postgres]

IDS = [f"edge-p{i}" for i in range(4)]
LOADER = "edge-load"
TERMINATE = sa.text(
    "SELECT count(pg_terminate_backend(pid, 5000)) FROM pg_stat_activity "
    "WHERE datname = current_database() AND pid <> pg_backend_pid() AND application_name <> 'chaos-dropper'"
)


class Dropper:
    """Terminates every other connection to the database every ``interval_s`` until stopped (and
    waits until those backends are gone, so the next request cannot get a dying one)."""

    def __init__(self, url: str, interval_s: float = 0.15) -> None:
        self.engine = sa.create_engine(
            url,
            isolation_level="AUTOCOMMIT",
            poolclass=sa.pool.NullPool,
            connect_args={"application_name": "chaos-dropper"},
        )
        self.interval_s = interval_s
        self.rounds = 0
        self.terminated = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pg-dropper", daemon=True)

    def drop_once(self) -> int:
        with self.engine.connect() as conn:
            n = int(conn.execute(TERMINATE).scalar_one())
        self.rounds += 1
        self.terminated += n
        return n

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.drop_once()

    def __enter__(self) -> Dropper:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self.engine.dispose()


class Reporter:
    """An enrolled device's MQTT identity publishing numbered ``downloading`` reports (QoS 1) as fast
    as the broker acknowledges them: a steady ingest load to drop connections under."""

    def __init__(self, rig, data_dir: Path, device_id: str) -> None:
        from tests.helpers.mosquitto import mqtt_connect

        class _Broker:  # what mqtt_connect needs of a broker
            host = "127.0.0.1"
            port = rig.live.settings.mqtt_port
            files = type("Files", (), {"ca": data_dir / "ca.crt"})

        self.device_id = device_id
        self.client = mqtt_connect(
            _Broker(),
            data_dir / "device.crt",
            data_dir / "device.key",
            client_id=device_id,  # type: ignore[arg-type]
        )
        self.sent = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="reporter", daemon=True)

    def _run(self) -> None:
        from device_client.protocol import DeploymentPhase, Report
        from device_client.protocol.messages import utcnow

        while not self._stop.is_set():
            seq = self.sent + 1
            report = Report.build(
                device_id=self.device_id, seq=seq, at=utcnow(), phase=DeploymentPhase.downloading
            )
            info = self.client.publish(f"fleet/v1/d/{self.device_id}/report", report.to_json(), qos=1)
            info.wait_for_publish(10)
            self.sent = seq
            time.sleep(0.002)

    def __enter__(self) -> Reporter:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self.client.disconnect()
        self.client.loop_stop()


@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
def test_postgres_connection_drops_lose_nothing(tmp_path: Path, database_url: str) -> None:
    with running_rig(tmp_path, database_url) as rig:
        push_model(rig.live, "clf", "1.0.0", make_model(tmp_path / "m1.onnx", out_dim=20_000))
        fleet = Fleet.on(rig, tmp_path / "devices", [*IDS, LOADER], download_rate_limit_bps=400_000)
        fleet.ids = IDS  # the loader's identity publishes raw reports, no daemon
        try:
            fleet.start()
            first_seq = {d: fleet.report_seq(d) for d in IDS}
            body = chaos_rollout(
                "1.0.0",
                [{"count": 2, "soak_s": 0.5}, {"percent": 100, "soak_s": 0}],
                probation={"seconds": 1.0, "min_requests": 0},
                selector={"device_ids": IDS},
            )
            rollout_id = fleet.client.create_rollout(body)["id"]
            headers = {"Authorization": f"Bearer {rig.token('viewer')}"}

            reporter = Reporter(rig, tmp_path / "devices" / LOADER, LOADER)
            dropper = Dropper(database_url)
            # the admin API answers right after a drop (dead pooled connections are replaced);
            # checked before the background dropper starts, so nothing kills the request itself
            for _ in range(5):
                assert dropper.drop_once() >= 1
                r = httpx.get(f"{rig.url}/api/v1/rollouts/{rollout_id}", headers=headers, timeout=10)
                assert r.status_code == 200, r.text
            with reporter, dropper:
                # keep dropping while the whole rollout runs, and for at least 20 rounds (a request
                # whose connection is killed under it may fail: only the next one must work)
                deadline = time.monotonic() + 90
                status = "running"
                while (status == "running" or dropper.rounds < 20) and time.monotonic() < deadline:
                    time.sleep(0.2)
                    r = httpx.get(f"{rig.url}/api/v1/rollouts/{rollout_id}", headers=headers, timeout=10)
                    if r.status_code == 200:
                        status = r.json()["status"]
            state = fleet.client.get_rollout(rollout_id)
            assert dropper.rounds > 10
            assert dropper.terminated > dropper.rounds
            # every report of the steady load is stored, in spite of the drops under ingest
            assert reporter.sent > 100
            wait_for(
                lambda: fleet.event_seqs(LOADER) == list(range(1, reporter.sent + 1)),
                timeout=30,
                what=f"{reporter.sent} load reports stored",
            )

            assert state["status"] == "completed", (state["status"], state["reason"], state["phases"])
            assert {p for _, p in fleet.deployments(rollout_id).values()} == {"succeeded"}
            # no report lost: every seq each device allocated is stored, none left journaled
            for d in IDS:
                wait_for(lambda d=d: fleet.unacked(d) == 0, timeout=30, what=f"{d} journal drained")
                last = fleet.report_seq(d)
                wait_for(lambda d=d, last=last: fleet.event_seqs(d)[-1:] == [last], timeout=30, what=d)
                assert fleet.event_seqs(d) == list(range(first_seq[d] + 1, last + 1)), d
            # and the outbox published everything it committed
            with rig.live.ctx.db.session_scope() as s:
                from server.rollouts.tables import OutboxMessage

                pending = s.scalar(
                    sa.select(sa.func.count())
                    .select_from(OutboxMessage)
                    .where(OutboxMessage.published_at.is_(None))
                )
            assert pending == 0
        finally:
            fleet.stop()
