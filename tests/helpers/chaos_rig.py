"""Fault-injection plumbing: a live server + Mosquitto that a whole test module shares, real device
daemons as subprocesses (so they can be killed with SIGKILL), and readers of a device's on-disk
state that never disturb it."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import sqlalchemy as sa

from device_client.state import DeviceState
from device_client.store import STATE_FILE, CorruptState, decode_state
from server.mqtt.broker import MosquittoProcess, free_port
from tests.helpers.device_fleet import stop_process, wait_for
from tests.helpers.live_server import LiveServer
from tests.helpers.tokens import create_admin_token

REPO = Path(__file__).resolve().parents[2]
TERMINAL = frozenset({"succeeded", "failed", "rolled_back", "cancelled"})


def server_settings(root: Path, database_url: str | None = None, **overrides: Any) -> Any:
    """Settings of a live server under ``root`` (MQTT bridge on, engine ticking fast)."""
    from server.config import Settings

    port = free_port()
    values: dict[str, Any] = {
        "data_dir": root / "server",
        "database_url": database_url or f"sqlite:///{root / 'fleet.db'}",
        "host": "127.0.0.1",
        "port": port,
        "public_url": f"http://127.0.0.1:{port}",
        "max_upload_bytes": 8 * 1024 * 1024,
        "metadata_refresh_interval_s": 3600,
        "mqtt_enabled": True,
        "mqtt_port": free_port(),
        "ingest_batch_delay_s": 0.05,
        "rollout_engine": True,
        "rollout_tick_s": 0.2,
    }
    values.update(overrides)
    return Settings(**values)


@dataclass
class Rig:
    """A live server (uvicorn thread) and the Mosquitto it talks to."""

    live: LiveServer
    broker: MosquittoProcess
    root: Path

    @property
    def url(self) -> str:
        return self.live.url

    def token(self, role: str = "admin") -> str:
        return create_admin_token(self.live.ctx, role)


@contextlib.contextmanager
def running_rig(root: Path, database_url: str | None = None, **overrides: Any) -> Iterator[Rig]:
    from server.runner import start_embedded_broker

    settings = server_settings(root, database_url, **overrides)
    broker = start_embedded_broker(settings)
    try:
        live = LiveServer(settings).start()
        try:
            yield Rig(live=live, broker=broker, root=root)
        finally:
            live.stop()
    finally:
        broker.stop()


def peek_state(data_dir: Path) -> DeviceState | None:
    """The daemon's primary state file as it is now, or None (being replaced, or absent).

    Read-only: the test must not repair anything the daemon's own start-up is supposed to.
    """
    try:
        return decode_state((data_dir / STATE_FILE).read_bytes())
    except (OSError, CorruptState):
        return None


# --------------------------------------------------------------------------- a fleet of daemons


class Fleet:
    """Real device daemons, in process, enrolled against a live server with tags ``site=chaos``."""

    def __init__(self, url: str, token: str, db: Any, root: Path, ids: list[str], **settings: Any) -> None:
        from device_client.enroll import enroll
        from server.client import FleetClient

        self.db = db  # server.db.Database of the server's database (read-only use)
        self.root = root
        self.ids = ids
        self.settings = settings
        self.client = FleetClient(url, token)
        token = self.client.create_enroll_token({"site": "chaos"}, uses=len(ids))["token"]
        for device_id in ids:
            enroll(url, token, root / device_id, device_id=device_id, insecure_http=True)
        self.daemons: dict[str, Any] = {}

    @classmethod
    def on(cls, rig: Rig, root: Path, ids: list[str], **settings: Any) -> Fleet:
        return cls(rig.url, rig.token(), rig.live.ctx.db, root, ids, **settings)

    def start(self) -> None:
        from device_client.daemon import Daemon
        from tests.helpers.device_fleet import device_settings

        for device_id in self.ids:
            settings = device_settings(self.root / device_id, **self.settings)
            self.daemons[device_id] = Daemon(settings).start()
        wait_for(
            lambda: all(self.client.get_device(d)["status"] == "online" for d in self.ids),
            timeout=30,
            interval=0.1,
            what="every device online",
        )

    def stop(self) -> None:
        for daemon in self.daemons.values():
            daemon.stop()
        self.daemons.clear()
        self.client.close()

    def report_seq(self, device_id: str) -> int:
        """The last report seq the device allocated (every one of them must reach the server)."""
        return self.daemons[device_id].state.report_seq

    def unacked(self, device_id: str) -> int:
        """Reports journaled on the device and not yet acknowledged by the broker."""
        return len(list((self.root / device_id / "outbox").glob("*.json")))

    def event_seqs(self, device_id: str) -> list[int]:
        from server.devices.tables import DeviceEvent

        with self.db.session_scope() as s:
            return sorted(s.scalars(sa.select(DeviceEvent.seq).where(DeviceEvent.device_id == device_id)))

    def event_desired_seqs(self, device_id: str) -> list[int | None]:
        from server.devices.tables import DeviceEvent

        with self.db.session_scope() as s:
            q = sa.select(DeviceEvent.desired_seq).where(DeviceEvent.device_id == device_id)
            return list(s.scalars(q.order_by(DeviceEvent.seq)))

    def deployments(self, rollout_id: str) -> dict[str, tuple[int, str]]:
        """device id -> (stage, phase) of a rollout, from the database."""
        from server.rollouts.tables import Deployment

        with self.db.session_scope() as s:
            rows = s.execute(
                sa.select(Deployment.device_id, Deployment.stage, Deployment.phase).where(
                    Deployment.rollout_id == rollout_id
                )
            )
            return {d: (stage, phase.value) for d, stage, phase in rows}


def chaos_rollout(version: str, stages: list[dict[str, Any]], **over: Any) -> dict[str, Any]:
    """A rollout of ``clf`` to the ``site=chaos`` devices, gated on install success only: the
    devices serve no traffic, so their health windows (which a stage still needs) hold no
    requests (``min_requests`` 0)."""
    body: dict[str, Any] = {
        "model": "clf",
        "version": version,
        "selector": {"tags": {"site": "chaos"}},
        "stages": stages,
        "gates": {"max_failure_ratio": 0.0, "max_error_rate": None, "max_p95_ratio": None, "min_requests": 0},
        "probation": {"seconds": 1.0, "min_requests": 0},
        "on_failure": "pause",
        "device_timeout_s": 120,
    }
    body.update(over)
    return body


# --------------------------------------------------------------------------- a server process


class ServerProcess:
    """``python -m server.cli server run`` with FLEET_* variables from ``settings`` (killable)."""

    def __init__(self, settings: Any, log: Path) -> None:
        self.settings = settings
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None
        host, port = "127.0.0.1", settings.mqtt_port
        env = {k: v for k, v in os.environ.items() if not k.startswith("FLEET_")}
        env.update(
            {
                "FLEET_DATA_DIR": str(settings.data_dir),
                "FLEET_DATABASE_URL": settings.database_url,
                "FLEET_PORT": str(settings.port),
                "FLEET_PUBLIC_URL": settings.public_url,
                "FLEET_MQTT_URL": f"mqtts://{host}:{port}",  # an external broker: it outlives the server
                "FLEET_MQTT_PORT": str(port),
                "FLEET_ROLLOUT_TICK_S": str(settings.rollout_tick_s),
                "FLEET_INGEST_BATCH_DELAY_S": str(settings.ingest_batch_delay_s),
                "FLEET_METADATA_REFRESH_INTERVAL_S": "3600",
                "FLEET_CLOUD_EMBEDDED": "false",
            }
        )
        self.env = env

    @property
    def url(self) -> str:
        return self.settings.public_url

    def start(self, timeout: float = 60.0) -> ServerProcess:
        with open(self.log, "ab") as fh:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "server.cli", "server", "run"],
                cwd=REPO,
                env=self.env,
                stdout=fh,
                stderr=subprocess.STDOUT,
            )

        def up() -> bool:
            assert self.proc is not None
            assert self.proc.poll() is None, f"server exited: {self.log_tail()}"
            try:
                return httpx.get(self.url + "/healthz", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(up, timeout=timeout, interval=0.1, what="server up")
        return self

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def terminate(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""
