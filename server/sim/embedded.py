"""A throw-away server + Mosquitto for the simulator (``fleet simulate`` without ``--server``) and
the benchmarks: the generated mTLS broker config with ``max_connections`` sized for the fleet, the
open-file limit raised for the broker (a child inherits it), and the control server in this
process."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from server.admin.service import BOOTSTRAP_TOKEN_TTL_S, CLI_PRINCIPAL, AdminService
from server.admin.tables import Role
from server.config import Settings
from server.mqtt.broker import MosquittoProcess, free_port, write_broker_config
from server.mqtt.identity import connection_ids, server_connection_ids
from server.runner import ServerThread
from server.sim.mux import raise_open_files
from server.trust.pki import FleetCA

log = logging.getLogger(__name__)


@dataclass
class Embedded:
    settings: Settings
    broker: MosquittoProcess
    server: ServerThread
    admin_token: str

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def ctx(self) -> Any:
        return self.server.ctx

    def stop(self) -> None:
        self.server.stop()
        self.broker.stop()


def start_embedded(
    workdir: Path,
    n_devices: int,
    *,
    database_url: str = "",
    replica_names: Sequence[str] = (),
    **overrides: Any,
) -> Embedded:
    """Mosquitto (for ``n_devices`` connections) and a server on free loopback ports. The broker
    ACL also admits the servers named ``replica_names`` (replicas started later, with the same
    ``ingest_processes``)."""
    raise_open_files(2 * n_devices + 4096)
    port, mqtt_port = free_port(), free_port()
    values: dict[str, Any] = {
        "data_dir": workdir / "server",
        "database_url": database_url,
        "port": port,
        "public_url": f"http://127.0.0.1:{port}",
        "mqtt_port": mqtt_port,
        "mqtt_enabled": True,
        "rollout_engine": True,
        "rollout_tick_s": 0.5,
        "metadata_refresh_interval_s": 3600,
        "log_level": "WARNING",
        # a fleet in the thousands keeps one GIL busy: consume it in a process of its own
        "ingest_processes": 1 if n_devices >= 1000 else 0,
    }
    values.update(overrides)
    settings = Settings(**values)
    settings.key_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    files = write_broker_config(
        FleetCA(settings.key_dir),
        settings.broker_dir,
        port=mqtt_port,
        max_connections=n_devices + 1000,
        server_identities=[
            *server_connection_ids(settings),
            *(i for name in replica_names for i in connection_ids(name, settings.ingest_processes)),
        ],
    )
    broker = MosquittoProcess(files, settings.mosquitto_bin).start()
    try:
        server = ServerThread(settings).start()
    except BaseException:
        broker.stop()
        raise
    with server.ctx.db.session_scope() as session:
        created = AdminService(session).create_token(
            "simulator", Role.admin, CLI_PRINCIPAL, ttl_s=BOOTSTRAP_TOKEN_TTL_S
        )
    token = created.token
    return Embedded(settings=settings, broker=broker, server=server, admin_token=token)
