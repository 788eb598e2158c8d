"""One simulator worker process: many simulated devices, one selector, no thread per client.

Each :class:`SimDevice` is a paho client speaking the real protocol (presence with its will,
director-checked DesiredStates, phase reports, health windows) as its version's
:class:`~server.sim.profiles.Profile` says. :class:`Worker` drives them all through one
:class:`~server.sim.mux.Mux` (the selector), connects them on a small thread pool, and runs
``loop_misc`` for every client on a slow timer (keepalive pings).
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import ssl
import time
from collections import Counter, deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from multiprocessing.connection import Connection
from typing import Any

import paho.mqtt.client as mqtt

from device_client.protocol import DesiredState, HealthWindow, Presence, Report, validate_payload
from device_client.protocol.errors import InvalidPayload, SignatureError
from device_client.protocol.messages import DeploymentPhase as P
from device_client.protocol.messages import HardwareFacts, ServeMode
from device_client.protocol.signing import public_key_from_pem, verify_envelope
from device_client.protocol.topics import TopicKind, device_topic
from server.gctune import tune_gc
from server.sim.mux import Mux, raise_open_files
from server.sim.profiles import Profile, SimOptions

log = logging.getLogger(__name__)


@dataclass
class DeviceSpec:
    device_id: str
    cert_file: str
    key_file: str
    arch: str = "x86_64"


@dataclass
class WorkerSpec:
    """Everything a worker process needs (picklable: workers are spawned, not forked)."""

    index: int
    devices: list[DeviceSpec]
    ca_file: str
    director_pem: str
    mqtt_host: str
    mqtt_port: int
    options: SimOptions = field(default_factory=SimOptions)
    stats_interval_s: float = 0.25


def _ms() -> int:
    return int(time.time() * 1000)


class SimDevice:
    """One simulated device: protocol logic on the loop thread."""

    def __init__(self, spec: DeviceSpec, w: Worker) -> None:
        self.spec = spec
        self.id = spec.device_id
        self.w = w
        self.rng = random.Random(hash((w.spec.options.seed, spec.device_id)))
        self.serving: dict[str, str] = dict(w.spec.options.serving)
        self.shadow: dict[str, str] = {}
        self.previous: dict[str, str] = {}
        self.last_desired_seq = 0
        self.report_seq = 0
        self.health_seq = 0
        self.generation = 0
        self.updating = False
        self.connected = False
        self.connecting = False
        self.backoff = 1.0
        self.t_report = device_topic(self.id, TopicKind.report)
        self.t_health = device_topic(self.id, TopicKind.health)
        self.t_presence = device_topic(self.id, TopicKind.presence)
        self.t_desired = device_topic(self.id, TopicKind.desired)
        self.hardware = HardwareFacts(
            arch=spec.arch,
            ram_mb=2048,
            cpu_count=4,
            onnxruntime_version="sim",
            execution_providers=["CPUExecutionProvider"],
            os="fleet-simulator",
        )
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=self.id, protocol=mqtt.MQTTv5)
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=w.spec.ca_file)
        ctx.load_cert_chain(spec.cert_file, spec.key_file)
        c.tls_set_context(ctx)
        c.max_inflight_messages_set(100)
        c.will_set(self.t_presence, self.presence("offline"), qos=1, retain=True)
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_message = self._on_message
        w.mux.attach(c)
        self.client = c

    # -- connection -----------------------------------------------------------------------------
    def connect(self) -> None:
        """On a connect thread: TCP + TLS handshake + CONNECT (blocking)."""
        try:
            self.client.connect(
                self.w.spec.mqtt_host, self.w.spec.mqtt_port, keepalive=self.w.spec.options.keepalive_s
            )
        except (OSError, ssl.SSLError) as exc:
            log.debug("%s: connect failed: %s", self.id, exc)
            self.w.call_soon_threadsafe(self._retry_later)
        finally:
            self.connecting = False

    def _retry_later(self) -> None:
        self.w.counters["connect_retries"] += 1
        delay = self.backoff * (0.5 + self.rng.random())
        self.backoff = min(self.backoff * 2, 30.0)
        self.w.mux.sched.call_later(delay, self.start_connect)

    def start_connect(self) -> None:
        if self.connecting or self.connected or self.w.stopping:
            return
        self.connecting = True
        self.w.pool.submit(self.connect)

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, rc: Any, props: Any) -> None:
        if rc.is_failure:
            self.w.counters["connect_refused"] += 1
            return
        self.connected = True
        self.backoff = 1.0
        self.w.counters["connects"] += 1
        client.subscribe(self.t_desired, qos=1)
        client.publish(self.t_presence, self.presence("online"), qos=1, retain=True)
        window = self.w.spec.options.health_window_s
        if window > 0 and not getattr(self, "_health_armed", False):
            self._health_armed = True
            self.w.mux.sched.call_later(self.rng.random() * window, self._health_tick)

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, rc: Any, props: Any) -> None:
        was = self.connected
        self.connected = False
        if was:
            self.w.counters["disconnects"] += 1
        if not self.w.stopping:
            self._retry_later()

    # -- messages -------------------------------------------------------------------------------
    def presence(self, status: str) -> bytes:
        return Presence.build(
            device_id=self.id,
            status=status,
            at=datetime.now(UTC),
            hardware=self.hardware,
            serving=dict(self.serving),
        ).to_json()

    def report(self, phase: P, d: DesiredState | None, reason: str | None = None) -> None:
        self.report_seq = max(self.report_seq + 1, _ms())
        payload = Report.build(
            device_id=self.id,
            seq=self.report_seq,
            at=datetime.now(UTC),
            phase=phase,
            desired_seq=d.seq if d else None,
            rollout_id=d.rollout_id if d else None,
            model=d.model if d else None,
            version=d.version if d else None,
            reason=reason,
            serving=dict(self.serving),
        ).to_json()
        self.client.publish(self.t_report, payload, qos=1)
        self.w.counters[f"report_{phase.value}"] += 1

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        if msg.topic != self.t_desired:
            return
        self.w.counters["desired_received"] += 1
        try:
            signed = verify_envelope(json.loads(msg.payload), self.w.director)
            desired = validate_payload(signed, DesiredState)
        except (ValueError, InvalidPayload, SignatureError) as exc:
            self.w.counters["desired_rejected"] += 1
            self.report(P.failed, None, f"desired state rejected: {exc}")
            return
        if desired.device_id != self.id:
            self.w.counters["desired_rejected"] += 1
            self.report(P.failed, None, f"desired state is for {desired.device_id}")
            return
        if desired.seq <= self.last_desired_seq:
            self.w.counters["desired_duplicate"] += 1
            return
        self.last_desired_seq = desired.seq
        if desired.expires_at <= datetime.now(UTC):
            self.report(P.failed, desired, "desired state has expired")
            return
        self.w.counters["desired_accepted"] += 1
        if (
            not self.updating
            and desired.mode is ServeMode.serve
            and self.serving.get(desired.model) == desired.version
            and desired.model not in self.shadow
        ):
            self.report(P.succeeded, desired, "already serving this version")
            return
        self.generation += 1
        self.updating = True
        self.report(P.downloading, desired)
        prof = self.w.profile(desired.version)
        self._after(prof.download_s, self._verify, desired, prof)

    def _after(self, delay: float, fn: Callable[..., None], *args: Any) -> None:
        gen = self.generation

        def run() -> None:
            if gen == self.generation and self.connected:
                fn(*args)

        self.w.mux.sched.call_later(delay, run)

    def _verify(self, d: DesiredState, prof: Profile) -> None:
        self.report(P.verifying, d)
        self._after(prof.verify_s, self._install, d, prof)

    def _install(self, d: DesiredState, prof: Profile) -> None:
        self.report(P.installing, d)
        self._after(prof.install_s, self._installed, d, prof)

    def _installed(self, d: DesiredState, prof: Profile) -> None:
        if prof.fail_rate and self.rng.random() < prof.fail_rate:
            self.updating = False
            self.report(P.failed, d, "validation vectors do not match (simulated)")
            return
        if d.mode is ServeMode.shadow:
            self.shadow[d.model] = d.version
        else:
            self.shadow.pop(d.model, None)
            if self.serving.get(d.model) is not None:
                self.previous[d.model] = self.serving[d.model]
            self.serving[d.model] = d.version
        self.report(P.probation, d)
        self._after(prof.probation_for(d.probation.seconds), self._probation_done, d, prof)

    def _probation_done(self, d: DesiredState, prof: Profile) -> None:
        self.updating = False
        if d.mode is ServeMode.serve and prof.revert_rate and self.rng.random() < prof.revert_rate:
            prev = self.previous.get(d.model)
            if prev is not None:
                self.serving[d.model] = prev
            self.report(P.rolled_back, d, "probation breached: error rate (simulated)")
            return
        self.report(P.succeeded, d)

    # -- health ---------------------------------------------------------------------------------
    def _health_tick(self) -> None:
        window = self.w.spec.options.health_window_s
        if self.w.stopping:
            return
        self.w.mux.sched.call_later(window, self._health_tick)
        if not self.connected:
            return
        at = datetime.now(UTC)
        for mode, table in (("serve", self.serving), ("shadow", self.shadow)):
            for model, version in table.items():
                prof = self.w.profile(version)
                requests = max(0, round(prof.rps * window * (0.8 + 0.4 * self.rng.random())))
                exp = requests * prof.error_rate
                errors = min(requests, int(exp) + (1 if self.rng.random() < exp - int(exp) else 0))
                j = 0.9 + 0.2 * self.rng.random()
                extra: dict[str, Any] = {}
                if mode == "shadow":
                    extra = {
                        "shadow_requests": requests,
                        "agreement": prof.agreement,
                        "shadow_p95_ms": prof.p95_ms * j,
                    }
                self.health_seq = max(self.health_seq + 1, _ms())
                hw = HealthWindow.build(
                    device_id=self.id,
                    seq=self.health_seq,
                    at=at,
                    window_s=window,
                    model=model,
                    version=version,
                    mode=mode,
                    requests=requests,
                    errors=errors,
                    p50_ms=prof.p50_ms * j,
                    p95_ms=prof.p95_ms * j,
                    p99_ms=prof.p95_ms * j * 1.3,
                    **extra,
                )
                self.client.publish(self.t_health, hw.to_json(), qos=0)
                self.w.counters["health_sent"] += 1


class Worker:
    def __init__(self, spec: WorkerSpec, conn: Connection | None = None) -> None:
        self.spec = spec
        self.conn = conn
        self.mux = Mux()
        self.director = [public_key_from_pem(spec.director_pem)]
        self.counters: Counter[str] = Counter()
        self.stopping = False
        self.pool = ThreadPoolExecutor(spec.options.connect_threads, thread_name_prefix="sim-connect")
        self._soon: deque[Callable[[], None]] = deque()
        self.devices = [SimDevice(d, self) for d in spec.devices]
        self._frozen = False

    def profile(self, version: str) -> Profile:
        return self.spec.options.profiles.get(version, self.spec.options.default_profile)

    def call_soon_threadsafe(self, fn: Callable[[], None]) -> None:
        self._soon.append(fn)

    def snapshot(self) -> dict[str, Any]:
        snap = dict(self.counters)
        snap["connected"] = sum(1 for d in self.devices if d.connected)
        snap["devices"] = len(self.devices)
        return snap

    def _misc(self) -> None:
        connected = 0
        for d in self.devices:
            if d.connected and not d.connecting:
                d.client.loop_misc()
                connected += 1
        if not self._frozen and connected == len(self.devices):
            # every device's client, socket and TLS state is built: never walk them again
            self._frozen = True
            tune_gc()
        if not self.stopping:
            self.mux.sched.call_later(1.0, self._misc)

    def run(self, should_stop: Callable[[], bool] = lambda: False) -> None:
        for d in self.devices:
            d.start_connect()
        self.mux.sched.call_later(1.0, self._misc)
        last_stats = 0.0
        while not self.stopping:
            while self._soon:
                self._soon.popleft()()
            self.mux.run_once()
            now = time.monotonic()
            if now - last_stats >= self.spec.stats_interval_s:
                last_stats = now
                if self.conn is not None:
                    self.conn.send(("stats", self.snapshot()))
            if self.conn is not None and self.conn.poll():
                cmd = self.conn.recv()
                if cmd == "stop":
                    self.stopping = True
            if should_stop():
                self.stopping = True
        self.shutdown()

    def shutdown(self, grace_s: float = 3.0) -> None:
        """Publish ``offline`` presence like a daemon stopping cleanly, then disconnect."""
        self.stopping = True
        self.pool.shutdown(wait=True, cancel_futures=True)
        for d in self.devices:
            if d.connected:
                d.client.publish(d.t_presence, d.presence("offline"), qos=1, retain=True)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and any(
            d.connected and d.client.want_write() for d in self.devices
        ):
            self.mux.run_once()
        for d in self.devices:
            if d.connected:
                d.client.disconnect()
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline and any(d.client.want_write() for d in self.devices):
            self.mux.run_once()
        if self.conn is not None:
            self.conn.send(("stats", self.snapshot()))
            self.conn.send(("stopped", None))


def worker_main(spec: WorkerSpec, conn: Connection) -> None:
    """Entry point of a spawned worker process."""
    logging.basicConfig(level=logging.WARNING, format=f"sim-worker-{spec.index} %(levelname)s %(message)s")
    raise_open_files(len(spec.devices) * 2 + 256)
    tune_gc(freeze=False)  # young-generation threshold now; freeze once every device is connected
    with contextlib.suppress(KeyboardInterrupt):
        Worker(spec, conn).run()


__all__ = ["DeviceSpec", "Worker", "WorkerSpec", "worker_main"]
