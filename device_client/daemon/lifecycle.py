"""The daemon's lifecycle (:class:`Daemon`): it builds the collaborators, recovers the state at
start-up, loads the models, starts the local API, MQTT and the worker and health threads, and
stops them again; :func:`run` is what ``fleet device run`` runs."""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..api import InferenceServer
from ..config import DeviceSettings
from ..enroll import IDENTITY_FILE, EnrollError, Identity, enroll, hardware_facts
from ..fetcher import HttpSettings, url_origin
from ..logformat import log_handler
from ..loop import BackgroundLoop
from ..mqtt import MQTT_STATUS_FILE, MqttEndpointConfig, MqttLink, ReportJournal
from ..protocol import Presence, TopicKind, device_topic
from ..protocol.messages import utcnow
from ..routing import RoutingEnvironment, RoutingTable
from ..runtime import ModelHost
from ..sdnotify import LivenessCheck, Notifier, Watchdog
from ..state import OUTCOMES, DeviceState, RecoveryKind, apply_recovery, recovery_action
from ..store import StateStore, StoreError
from ..trust import DirectorKeyring, TufVerifier
from .health_publisher import HealthPublisher
from .intake import Intake
from .models import Slots
from .persistence import StateKeeper
from .probation import Probation
from .reporting import Reporter
from .updater import Updater
from .worker import Worker

log = logging.getLogger(__name__)

JOURNAL_DIR = "outbox"


class Daemon:
    """The device daemon; ``start()`` returns once the API serves and MQTT is connecting.

    Threads: paho's network thread only queues incoming desired states (and may flag that a newer,
    correctly signed one arrived, to interrupt a download); ONE worker thread makes every decision
    and every state transition (:class:`~.worker.Worker`); a health thread publishes a window every
    ``health_window_s``; the local inference API serves callers on its own threads and never waits
    for the worker.

    Start-up: load the state (``StateStore``: primary, ``.prev`` copy, or adopt installed slots),
    keep the report seq monotonic (:meth:`~.reporting.Reporter.seq_floor`), apply crash recovery
    (``state.recovery_action``: mid-download resumes from the ``.partial`` file, or takes the
    complete file when the kill came between its rename and the commit; mid-verify/install restarts
    verification from the complete download with bounded attempts and discards the half-extracted
    slot; mid-probation reverts to the last known good model and reports ``rolled_back``),
    garbage-collect what the state does not reference, load the models
    (:meth:`~.models.Slots.load_all`), start the local API, then connect MQTT. A save that fails at
    start-up (full disk) does not stop the daemon: the state stays in memory and the worker saves
    it (and reports an outcome the recovery left) as soon as it can."""

    def __init__(self, settings: DeviceSettings, identity: Identity | None = None) -> None:
        self.settings = settings
        self.identity = identity or Identity.load(settings.data_dir)
        self.device_id = self.identity.device_id
        self.data_dir = Path(settings.data_dir).absolute()
        self.store = StateStore(self.data_dir)
        self.journal = ReportJournal(self.data_dir / JOURNAL_DIR)
        self.keeper = StateKeeper(self.store)
        self.slots = Slots(settings, self.keeper)
        self.routing = RoutingTable(self._routing_environment(), self.slots.hosts)
        self.keeper.watchers.append(lambda state: self.routing.sync(state.routing))
        self.api = InferenceServer.from_settings(
            self.slots.hosts, settings, extra_health=lambda: {"rejected_messages": self.rejected_messages()}
        )
        self.api.routing = self.routing
        self.http = HttpSettings(
            token=self.identity.device_token,
            # the token is for the server; bundles may come from a static server or CDN
            token_origin=url_origin(self.identity.tuf_metadata_url),
            ca_cert=settings.ca_cert,
            # the server's TLS pins of enrollment (device_client/tlstrust.py)
            server_ca=self.identity.server_ca_file,
            server_fingerprint=settings.server_fingerprint or self.identity.server_fingerprint,
            connect_timeout_s=settings.download_connect_timeout_s,
            read_timeout_s=settings.download_read_timeout_s,
        )
        self.keyring = DirectorKeyring(self.identity.director_file, self.identity.director_keys_file)
        self.tuf = TufVerifier(
            self.identity.tuf_dir,
            self.identity.tuf_metadata_url,
            self.identity.tuf_targets_url,
            self.http,
            max_metadata_bytes=settings.max_metadata_bytes,
            deadline_s=settings.metadata_deadline_s,
            keyring=self.keyring,
        )
        self.link: MqttLink | None = None
        self._stop = threading.Event()
        self.reporter = Reporter(self.device_id, self.keeper, self.journal)
        self.intake = Intake(
            device_id=self.device_id,
            settings=settings,
            keyring=self.keyring,
            tuf=self.tuf,
            keeper=self.keeper,
            reporter=self.reporter,
            slots=self.slots,
        )
        self.updater = Updater(
            settings=settings,
            targets_url=self.identity.tuf_targets_url,
            http=self.http,
            keeper=self.keeper,
            reporter=self.reporter,
            slots=self.slots,
            stop=self._stop,
            supersede=self.intake.supersede,
        )
        self.probation = Probation(keeper=self.keeper, reporter=self.reporter, slots=self.slots)
        self.worker = Worker(
            settings=settings,
            keeper=self.keeper,
            intake=self.intake,
            updater=self.updater,
            probation=self.probation,
            reporter=self.reporter,
            stop=self._stop,
        )
        self.health = HealthPublisher(self.device_id, self.slots.hosts, self.routing)
        #: the worker's loop first, then the health publisher's
        self._threads: list[BackgroundLoop] = []
        self._hardware: Any = None

    def _routing_environment(self) -> RoutingEnvironment:
        """What routing policies get from this device: its credentials, and the fleet cloud tier's
        URL (``FLEET_DEVICE_CLOUD_URL``, else the enrollment answer's, else none). A plain-HTTP URL
        passed its own check already: the setting's (loopback only) or enrollment's (a lab)."""
        url = self.settings.cloud_url or self.identity.cloud_url
        return RoutingEnvironment.from_device_settings(
            self.settings,
            self.identity,
            fleet_url=url,
            insecure_http=url is not None and url.lower().startswith("http://"),
        )

    @property
    def state(self) -> DeviceState:
        return self.keeper.state

    @property
    def hosts(self) -> dict[str, ModelHost]:
        """The model hosts, one per model name (what the local API serves)."""
        return self.slots.hosts

    def rejected_messages(self) -> dict[str, int]:
        """Messages on this device's MQTT topics refused since the daemon started, per reason code
        (``malformed``, ``unsigned``, ``bad_signature``, ``wrong_device``, ``replayed``, ...)."""
        return self.intake.rejected.snapshot()

    def publish_health(self) -> None:
        """Publish one health window per hosted model (and per running shadow candidate) now."""
        self.health.publish()

    # ---------------------------------------------------------------- start and stop

    def start(self) -> Daemon:
        self._hardware = hardware_facts(self.settings.cpu_flags)
        loaded = self.store.load()
        state = loaded.state
        if loaded.problems:
            log.error("state problems at start: %s", "; ".join(loaded.problems))
        state = self.reporter.seq_floor(state, state_lost=loaded.source in ("fresh", "empty"))
        upd = state.update
        bundle_present = bool(upd and upd.bundle_path and (self.data_dir / upd.bundle_path).exists())
        if upd is not None and upd.bundle_path == "":  # a reused slot stands in for the download
            bundle_present = True
        action = recovery_action(
            state, bundle_present=bundle_present, max_attempts=self.settings.max_install_attempts
        )
        if action.kind is not RecoveryKind.nothing:
            log.warning("recovering from %s: %s %s", state.phase.value, action.kind.value, action.reason)
        state = apply_recovery(state, action, utcnow())
        self.keeper.commit_at_start(state, "the recovered state")
        with contextlib.suppress(OSError):
            self.store.gc(state)
        self.slots.load_all()
        self.api.start()
        self._start_mqtt()
        if self.state.update is not None and self.state.update.phase in OUTCOMES:
            try:
                self.reporter.finish_outcome({"recovered": action.kind.value} if action.reason else None)
            except (OSError, StoreError) as exc:  # the worker reports it once the state can be saved
                log.error("cannot report the %s outcome yet: %s", self.state.phase.value, exc)
        self._threads = [
            BackgroundLoop(
                "fleet-worker",
                self._worker_step(),
                self._stop,
                failure="update step failed; the current model keeps serving",
                error_pause_s=1.0,
            ),
            BackgroundLoop(
                "fleet-health",
                self.health.publish,
                self._stop,
                failure="health window failed",
                interval_s=self.settings.health_window_s,
            ),
        ]
        for loop in self._threads:
            loop.start()
        log.info("device %s started; serving %s", self.device_id, self.state.serving())
        return self

    def _worker_step(self) -> Callable[[], None]:
        """The worker's step; with ``test_hang_worker_after_s`` set, one that hangs (until the
        daemon stops) once that much time has passed, to test the service watchdog."""
        after = self.settings.test_hang_worker_after_s
        if after is None:
            return self.worker.run_once
        hang_at = time.monotonic() + after

        def step() -> None:
            if time.monotonic() >= hang_at:
                log.warning("test hook: the worker hangs")
                self._stop.wait()
                return
            self.worker.run_once()

        return step

    def status_line(self) -> str:
        """What the daemon serves, for the service manager's ``STATUS=``."""
        serving = self.state.serving()
        if not serving:
            return f"device {self.device_id}: no model assigned"
        models = ", ".join(f"{name} {version}" for name, version in sorted(serving.items()))
        return f"device {self.device_id}: serving {models}"

    def liveness_checks(self) -> dict[str, LivenessCheck]:
        """What must be alive for the watchdog pings to go on: the worker (not stuck in one step
        longer than ``stall_timeout_s``), the health publisher, paho's MQTT loop, the local API."""
        limit = self.settings.stall_timeout_s
        link = self.link

        def loop_check(index: int) -> LivenessCheck:
            def check() -> str | None:
                loops = self._threads
                if index >= len(loops):
                    return "not started"
                return loops[index].stalled(limit)

            return check

        return {
            "worker": loop_check(0),
            "health": loop_check(1),
            "mqtt": lambda: None if link is not None and link.loop_alive else "its network loop ended",
            "api": lambda: None if self.api.alive else "its server thread ended",
        }

    def stop(self) -> None:
        self._stop.set()
        for loop in self._threads:
            loop.join(timeout=30)
        self._threads.clear()
        if self.link is not None:
            self.link.stop(final=(self._topic(TopicKind.presence), self._presence("offline")))
        self.api.stop()
        self.routing.close()
        self.slots.close()
        log.info("device %s stopped", self.device_id)

    def _start_mqtt(self) -> None:
        ident = self.identity
        config = MqttEndpointConfig(
            host=ident.mqtt_host,
            port=ident.mqtt_port,
            ca_file=self.settings.ca_cert or ident.ca_file,
            cert_file=self.settings.client_cert or ident.cert_file,
            key_file=self.settings.client_key or ident.key_file,
            client_id=self.device_id,
            reconnect_min_s=self.settings.reconnect_min_s,
            reconnect_max_s=self.settings.reconnect_max_s,
        )
        self.link = MqttLink(
            config,
            self.journal,
            will=(self._topic(TopicKind.presence), self._presence("offline")),
            on_connected=lambda link: link.publish(
                self._topic(TopicKind.presence), self._presence("online"), qos=1, retain=True
            ),
            status_file=self.data_dir / MQTT_STATUS_FILE,
        )
        self.api.mqtt = self.link  # GET /v1/health shows its state and last error
        self.reporter.link = self.health.link = self.link
        self.link.subscribe(self._topic(TopicKind.desired), self.intake.on_desired, qos=1)
        self.link.start()

    def _topic(self, kind: TopicKind) -> str:
        return device_topic(self.device_id, kind)

    def _presence(self, status: str) -> bytes:
        if status == "online":  # on each connect: the facts as they are now
            self._hardware = hardware_facts(self.settings.cpu_flags)
        return Presence.build(
            device_id=self.device_id,
            status=status,
            at=utcnow(),
            hardware=self._hardware,
            serving=self.state.serving(),
        ).to_json()


def first_boot(settings: DeviceSettings) -> Identity | None:
    """Enroll with ``token_file`` and ``enroll_server`` when the data directory has no identity yet
    (a factory image's first boot); the token is read once and the file deleted after a successful
    enrollment. An enrolled device ignores the file. EnrollError when enrollment fails."""
    token_file = settings.token_file
    data_dir = Path(settings.data_dir)
    if token_file is None or (data_dir / IDENTITY_FILE).exists():
        return None
    if not settings.enroll_server:
        raise EnrollError("a token file needs the server URL (--server, FLEET_DEVICE_ENROLL_SERVER)")
    try:
        token = token_file.read_text().strip()
    except OSError as exc:
        raise EnrollError(f"cannot read the enrollment token file {token_file}: {exc}") from None
    identity = enroll(
        settings.enroll_server,
        token,
        data_dir,
        insecure_http=settings.enroll_insecure_http,
        ca_file=settings.ca_cert,
        server_fingerprint=settings.server_fingerprint,
    )
    log.info("first boot: enrolled as %s", identity.device_id)
    try:
        token_file.unlink()
    except OSError as exc:  # enrolled all the same; the token is spent on the server
        log.warning("enrolled, but cannot delete the token file %s: %s", token_file, exc)
    return identity


def run(settings: DeviceSettings) -> None:
    """Run the daemon until SIGTERM or SIGINT."""
    done = threading.Event()

    def on_signal(signum: int, frame: Any) -> None:
        log.info("signal %d: stopping", signum)
        done.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    notifier = Notifier()
    first_boot(settings)
    daemon = Daemon(settings).start()
    watchdog = Watchdog.from_env(notifier, daemon.liveness_checks())
    status = daemon.status_line()
    notifier.ready(status)
    if watchdog is not None:
        watchdog.start()
    try:
        while not done.wait(1.0):
            if daemon.status_line() != status:
                status = daemon.status_line()
                notifier.status(status)
    finally:
        notifier.stopping()
        if watchdog is not None:
            watchdog.stop()
        daemon.stop()


def configure_logging(verbose: bool = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, handlers=[log_handler()])
