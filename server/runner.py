"""``fleet server run``: the API under uvicorn, plus Mosquitto and the cloud tier as children."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import socket
import sys
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import uvicorn

from device_client.sdnotify import Notifier, Watchdog
from server.config import Settings
from server.procs import stop_on_sigterm, take_service_manager_env

if TYPE_CHECKING:
    from fastapi import FastAPI

    from server.cloud.embedded import CloudSupervisor
    from server.mqtt.broker import MosquittoProcess

log = logging.getLogger(__name__)


class InsecureBind(SystemExit):
    pass


#: how long the event loop may take to run a no-op before the watchdog pings stop
LOOP_ANSWER_S = 5.0
#: exit code when the API could not start (uvicorn's)
STARTUP_FAILURE = 3


def check_bind(settings: Settings) -> None:
    """Refuse a non-loopback bind with development defaults unless FLEET_ALLOW_INSECURE_BIND is set."""
    if settings.is_loopback or settings.allow_insecure_bind:
        return
    dev = []
    if settings.database_url.startswith("sqlite"):
        dev.append("SQLite database")
    if settings.embedded_broker:
        dev.append("embedded Mosquitto (no FLEET_MQTT_URL)")
    if settings.public_url.startswith("http://"):
        dev.append("plain-HTTP public URL (terminate TLS in front and set FLEET_PUBLIC_URL=https://...)")
    if dev:
        raise InsecureBind(
            f"refusing to listen on {settings.host} with development defaults: {'; '.join(dev)}. "
            "Configure production settings or set FLEET_ALLOW_INSECURE_BIND=1."
        )


def stored_revocations(settings: Settings) -> list[tuple[str, datetime]]:
    """The ``(serial_hex, revoked_at)`` pairs of the database's revoked certificates; none when
    the database (or its table) does not exist yet (the app's start-up creates and migrates it)."""
    import sqlalchemy as sa

    from server.db import Database
    from server.devices.repository import RevocationRepository
    from server.devices.tables import RevokedCertificate

    url = sa.engine.make_url(settings.database_url)
    if url.get_backend_name() == "sqlite" and (
        not url.database or url.database == ":memory:" or not Path(url.database).exists()
    ):
        return []
    db = Database(settings.database_url)
    try:
        if not sa.inspect(db.engine).has_table(RevokedCertificate.__tablename__):
            return []
        with db.session_scope() as session:
            return RevocationRepository(session).all()
    finally:
        db.dispose()


class BrokerPortInUse(SystemExit):
    """The embedded broker's port is held by another process (exit code 1, one line)."""


def start_embedded_broker(settings: Settings) -> MosquittoProcess:
    """Generate the broker config from the fleet CA in ``key_dir`` (created on first use), its ACL
    listing this server's MQTT identities, and start Mosquitto on ``mqtt_port`` as a child
    process. Its CRL is written afresh from the database's revocations: an old file may be near
    expiry, and a recreated ``broker_dir`` has none (an empty CRL would let decommissioned
    devices back in). Raises :class:`BrokerPortInUse` when another process holds the port (the
    child cannot listen there)."""
    from server.mqtt.broker import MosquittoProcess, PortInUse, write_broker_config
    from server.mqtt.identity import server_connection_ids
    from server.trust.pki import FleetCA

    settings.key_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    files = write_broker_config(
        FleetCA(settings.key_dir),
        settings.broker_dir,
        port=settings.mqtt_port,
        bind=settings.host,
        revoked=stored_revocations(settings),
        server_identities=server_connection_ids(settings),
    )
    try:
        broker = MosquittoProcess(files, settings.mosquitto_bin).start()
    except PortInUse as exc:
        raise BrokerPortInUse(f"{exc}; set FLEET_MQTT_PORT or stop it") from None
    log.info(
        "embedded Mosquitto listening on %s:%d (mTLS, pid %s)", settings.host, settings.mqtt_port, broker.pid
    )
    return broker


class CloudPortInUse(SystemExit):
    """The embedded cloud tier's port is held by another process (exit code 1, one line)."""


#: the name of the ``cloud`` admin tokens the server mints for its embedded cloud tier
EMBEDDED_CLOUD_NAME = "embedded-cloud"


def prepare_embedded_cloud(settings: Settings) -> None:
    """Before anything starts: :class:`CloudPortInUse` when another process holds the cloud
    port; an empty ``cloud_public_url`` (what devices are told at enrollment) becomes the
    embedded tier's URL on the host of ``public_url``, unless that would be plain HTTP beside an
    HTTPS ``public_url`` (devices refuse such an enrollment answer: the URL stays empty)."""
    from server.cloud.embedded import embedded_cloud_url, port_taken

    if port_taken(settings.cloud_host, settings.cloud_port):
        raise CloudPortInUse(
            f"port {settings.cloud_port} is in use by another process; set FLEET_CLOUD_PORT, "
            "stop it, or set FLEET_CLOUD_EMBEDDED=false"
        )
    url = embedded_cloud_url(settings, public=True)
    usable = url.startswith("https:") or settings.public_url.startswith("http:")
    if not settings.cloud_public_url and usable:
        settings.cloud_public_url = url


def embedded_cloud(settings: Settings, app: FastAPI, api_started: Callable[[], bool]) -> CloudSupervisor:
    """The supervisor of ``fleet cloud serve`` as a child (started once ``api_started()``), with
    ``cloud`` admin tokens minted for it in the app's database and revoked when it stops. The
    token is in the child's environment only, never in a log."""
    from server.admin.schemas import Principal
    from server.admin.service import AdminService
    from server.admin.tables import Role
    from server.cloud.embedded import CloudChild, CloudSupervisor

    by = Principal(actor="server", role=Role.admin)

    def mint(ttl_s: int) -> tuple[str, str]:
        with app.state.ctx.db.session_scope() as session:
            created = AdminService(session).create_token(EMBEDDED_CLOUD_NAME, Role.cloud, by, ttl_s=ttl_s)
            return created.id, created.token

    def revoke(token_id: str) -> None:
        with app.state.ctx.db.session_scope() as session:
            AdminService(session).revoke_token(token_id, by)

    return CloudSupervisor(CloudChild(settings, mint, revoke), api_started)


def uvicorn_options(settings: Settings) -> dict[str, Any]:
    """Where and how uvicorn serves the app: the bind, HTTPS when FLEET_TLS_CERT/KEY are set, and
    whose X-Forwarded-For names the client (FLEET_FORWARDED_ALLOW_IPS; rate limits key on it)."""
    allow = settings.forwarded_allow_ips.strip()
    options: dict[str, Any] = {
        "host": settings.host,
        "port": settings.port,
        "proxy_headers": bool(allow),
        "forwarded_allow_ips": allow or None,
    }
    if settings.tls_cert is not None and settings.tls_key is not None:
        options.update(ssl_certfile=str(settings.tls_cert), ssl_keyfile=str(settings.tls_key))
    return options


def configure_service_logging(settings: Settings) -> None:
    """The server's own loggers at ``FLEET_LOG_LEVEL`` (libraries stay at the CLI's level,
    WARNING unless ``fleet -v``)."""
    level = logging.getLevelName(settings.log_level.upper())
    if isinstance(level, int) and logging.getLogger().getEffectiveLevel() > level:
        logging.getLogger("server").setLevel(level)


def run_server(overrides: dict[str, Any] | None = None) -> None:
    """``fleet server run``: uvicorn in this process; Mosquitto (without FLEET_MQTT_URL) and the
    cloud tier (FLEET_CLOUD_EMBEDDED) as supervised children, none of them with systemd's
    notification variables (:func:`take_service_manager_env`). SIGTERM stops it like Ctrl-C: a
    graceful shutdown, the children stopped, exit code 0; a killed server takes its children with
    it (:mod:`server.procs`)."""
    import uvicorn

    from server.app import create_app
    from server.mqtt.broker import BrokerSupervisor

    # from here on no child inherits $NOTIFY_SOCKET/$WATCHDOG_*: only this process notifies systemd
    service_env = take_service_manager_env()
    settings = Settings(**(overrides or {}))
    check_bind(settings)
    configure_service_logging(settings)
    if settings.cloud_embedded:
        prepare_embedded_cloud(settings)
    supervisor: BrokerSupervisor | None = None
    cloud: CloudSupervisor | None = None
    with stop_on_sigterm():
        try:
            if settings.embedded_broker and settings.mqtt_enabled:
                supervisor = BrokerSupervisor(start_embedded_broker(settings)).start()
            app = create_app(settings)
            config = uvicorn.Config(app, log_level="info", **uvicorn_options(settings))
            server = NotifyingServer(
                config, f"serving the API on {settings.host}:{settings.port}", service_env
            )
            if settings.cloud_embedded:
                cloud = app.state.cloud = embedded_cloud(settings, app, lambda: server.started).start()
            with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C: a clean stop, as uvicorn.run
                server.run()
            if not server.started:
                sys.exit(STARTUP_FAILURE)  # start-up failed (uvicorn said why), as uvicorn.run exits
        finally:
            if cloud is not None:
                cloud.stop()
            if supervisor is not None:
                supervisor.stop()


class NotifyingServer(uvicorn.Server):
    """uvicorn's server telling systemd (``$NOTIFY_SOCKET``) ``READY=1`` once it serves and
    ``STOPPING=1`` when it shuts down, pinging ``WATCHDOG=1`` (``$WATCHDOG_USEC``) while its event
    loop answers within ``LOOP_ANSWER_S``."""

    def __init__(self, config: uvicorn.Config, status: str, service_env: dict[str, str]) -> None:
        super().__init__(config)
        self.status = status
        #: systemd's variables, taken from the environment before any child started
        self.service_env = service_env
        self.notifier = Notifier(service_env.get("NOTIFY_SOCKET", ""))
        self.watchdog: Watchdog | None = None
        self.loop: asyncio.AbstractEventLoop | None = None

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if not self.started:
            return
        self.loop = asyncio.get_running_loop()
        self.notifier.ready(self.status)
        self.watchdog = Watchdog.from_env(self.notifier, {"api": self.loop_answers}, self.service_env)
        if self.watchdog is not None:
            self.watchdog.start()

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self.notifier.stopping()
        if self.watchdog is not None:
            self.watchdog.stop(wait=False)  # its check may be waiting for this very loop
        await super().shutdown(sockets)

    def loop_answers(self) -> str | None:
        """None while the event loop runs a no-op within ``LOOP_ANSWER_S`` (a liveness check)."""
        if self.loop is None or self.should_exit:
            return "not serving"
        try:
            asyncio.run_coroutine_threadsafe(asyncio.sleep(0), self.loop).result(LOOP_ANSWER_S)
        except concurrent.futures.TimeoutError:
            return f"the event loop did not answer in {LOOP_ANSWER_S:g} s"
        return None


class ServerThread:
    """The app under uvicorn in a background thread (``fleet demo`` and the integration tests)."""

    def __init__(self, settings: Settings) -> None:
        import threading

        import uvicorn

        from server.app import create_app

        self.settings = settings
        self.app = create_app(settings)
        self.server = uvicorn.Server(
            uvicorn.Config(self.app, log_level="warning", lifespan="on", **uvicorn_options(settings))
        )
        self.thread = threading.Thread(target=self.server.run, name="uvicorn", daemon=True)

    @property
    def url(self) -> str:
        scheme = "https" if self.settings.tls_cert is not None else "http"
        return f"{scheme}://{self.settings.host}:{self.settings.port}"

    @property
    def ctx(self) -> Any:
        return self.app.state.ctx

    @property
    def mqtt(self) -> Any:
        return self.app.state.mqtt

    def start(self, timeout: float = 30.0) -> ServerThread:
        import time

        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        if self.mqtt is not None and not self.mqtt.wait_connected(timeout):
            raise RuntimeError("the server did not connect to the MQTT broker")
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
