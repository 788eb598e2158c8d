"""MQTT ingest in worker processes of its own (``Settings.ingest_processes``, ``FLEET_INGEST_PROCESSES``).

With ``ingest_processes = 0`` (the default) the server consumes device traffic on a thread of its
own process: the paho network thread and the batched ingest writer share one GIL with the rollout
engine, the outbox publisher and the API. At thousands of devices that GIL is the server's
ceiling: a 10,000-device fan-out keeps it busy ~80% of the time, and the engine signing the next
chunk, the outbox publishing the last one and the ingest writing the reports they cause wait on
one another (``bench/fanout.py``). With ``ingest_processes = N`` each of N child processes runs
its own consuming MQTT link and :class:`~server.mqtt.handlers.IngestWorker` (parsing, dedup,
batched writes, re-signing returning devices' expiring states) against the same database, and
the server process keeps the engine, the outbox and the API.

The children are supervised here:

* each child's MQTT identity (certificate CN = client id, :mod:`server.mqtt.identity`) is stable
  across restarts (one child: the in-process link's, so switching modes keeps the broker's
  persistent session and its queued reports; several: ``fleet_server.NAME.ingest-N``), so QoS 1
  reports published while a child restarts wait in the broker for it;
* more than one child needs shared subscriptions (``$share/fleet-server/...``): with plain ones
  every child would get every message;
* a child that dies is restarted (after 1 s, doubling up to 30 s while it keeps dying young); a
  child whose parent dies exits: on Linux the kernel sends it SIGTERM (``PR_SET_PDEATHSIG``,
  :mod:`server.procs`), which stops it as the server's "stop" does, and its end of the pipe
  closes in any case;
* a child's counters (messages received, rejected, duplicates) come back over the pipe every
  ``REPORT_S`` and are merged into the server's ``/metrics``; a restarted child's counts are added
  to those of its predecessor, so counters never go down;
* re-signed DesiredStates written by a child are published by the server's outbox: the child
  kicks it over the pipe after the commit (and the outbox sweeps pending rows every second).

A child killed at any point loses nothing: its link acknowledges a message only after the batch
holding it is committed, so whatever it had received but not written is delivered again to its
successor (same client id, persistent session) and deduplicated by seq.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import signal
import threading
import time
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from types import FrameType
from typing import Any

from server.config import Settings
from server.context import ServerContext
from server.gctune import tune_gc
from server.metrics import Snapshot
from server.mqtt.bridge import MqttLink
from server.mqtt.handlers import IngestWorker
from server.mqtt.identity import ClientIdentity, ingest_id, server_name
from server.procs import set_death_signal

log = logging.getLogger(__name__)

#: how often (seconds) a child sends its counters and connection state
REPORT_S = 0.5
#: back-off before restarting a child that died; doubled for each quick death in a row (a child
#: that crashes at start, say on a bad database URL), up to RESTART_DELAY_MAX_S
RESTART_DELAY_S = 1.0
RESTART_DELAY_MAX_S = 30.0
#: a child that ran this long before dying starts the back-off again from RESTART_DELAY_S
STABLE_S = 60.0


class IngestProcesses:
    """N supervised ingest child processes (see the module docstring)."""

    def __init__(self, ctx: ServerContext, count: int) -> None:
        if count > 1 and not ctx.settings.shared_subscriptions:
            raise ValueError(
                "ingest_processes > 1 needs shared subscriptions (FLEET_MQTT_SHARED_SUBSCRIPTIONS=true): "
                "with plain ones every ingest process would get every message"
            )
        self.ctx = ctx
        self.count = count
        self._mp = multiprocessing.get_context("spawn")  # no fork of a threaded server
        self._procs: list[BaseProcess | None] = [None] * count
        self._conns: list[Connection | None] = [None] * count
        self._ready = [False] * count
        #: each child's link state and last error (``/readyz``), as the child last sent it
        self._link_status: list[dict[str, Any] | None] = [None] * count
        #: children whose pipe reached end-of-file (exited, not yet reaped)
        self._eof: set[int] = set()
        self._started = [0.0] * count
        self._delay = [RESTART_DELAY_S] * count
        self._ready_changed = threading.Condition()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.restarts = 0

    # -- lifecycle -----------------------------------------------------------------------------
    def start(self) -> IngestProcesses:
        for i in range(self.count):
            self._spawn(i)
        self._thread = threading.Thread(target=self._supervise, name="ingest-supervisor", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 15.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        for conn in self._conns:
            if conn is not None:
                with contextlib.suppress(OSError, ValueError):
                    conn.send(("stop",))
        deadline = time.monotonic() + timeout
        for i, proc in enumerate(self._procs):
            if proc is None:
                continue
            proc.join(max(0.1, deadline - time.monotonic()))
            if proc.is_alive():
                log.warning("ingest process %d did not stop; killing it", i)
                proc.kill()  # SIGTERM would only ask again (the child stops gracefully on it)
                proc.join(5)
            self._drain(i)  # its last counters
            self._retire(i)

    def wait_connected(self, timeout: float) -> bool:
        """True once every child's link is connected and subscribed."""
        deadline = time.monotonic() + timeout
        with self._ready_changed:
            while not all(self._ready):
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._ready_changed.wait(left)
        return True

    @property
    def connected(self) -> bool:
        return all(self._ready)

    def status(self) -> dict[str, dict[str, Any]]:
        """The link state of each child (``ingest-N``), or ``not running`` before it reports."""
        idle = {"state": "not running", "connected": False}
        return {f"ingest-{i}": dict(s or idle) for i, s in enumerate(self._link_status)}

    def pids(self) -> list[int | None]:
        return [p.pid if p is not None else None for p in self._procs]

    # -- supervision ---------------------------------------------------------------------------
    def _spawn(self, i: int) -> None:
        parent, child = self._mp.Pipe()
        proc = self._mp.Process(
            target=child_main,
            args=(self.ctx.settings.model_dump(), i, self.count, child),
            name=f"fleet-ingest-{i}",
            daemon=True,
        )
        proc.start()
        child.close()
        self._eof.discard(i)
        self._started[i] = time.monotonic()
        self._procs[i], self._conns[i] = proc, parent
        log.info("ingest process %d started (pid %s)", i, proc.pid)

    def _supervise(self) -> None:
        respawn_at: dict[int, float] = {}
        while not self._stop.is_set():
            live = [c for i, c in enumerate(self._conns) if c is not None and i not in self._eof]
            timeout = REPORT_S
            if respawn_at:
                timeout = max(0.0, min(timeout, min(respawn_at.values()) - time.monotonic()))
            if live:
                for conn in wait(live, timeout=timeout):
                    self._drain(self._conns.index(conn))  # type: ignore[arg-type]  # wait() returns items of `live`
            else:
                self._stop.wait(timeout)
            for i, proc in enumerate(self._procs):
                if proc is not None and not proc.is_alive() and not self._stop.is_set():
                    log.error("ingest process %d exited (code %s); restarting it", i, proc.exitcode)
                    self._drain(i)
                    self._retire(i)
                    self.restarts += 1
                    self.ctx.metrics.inc(
                        "fleet_ingest_process_restarts_total", help="ingest worker processes restarted"
                    )
                    respawn_at[i] = time.monotonic() + self._backoff(i)
            for i, due in list(respawn_at.items()):
                if due <= time.monotonic() and not self._stop.is_set():
                    try:
                        self._spawn(i)
                        del respawn_at[i]
                    except Exception:  # e.g. out of memory or processes: try again later
                        log.exception("cannot start ingest process %d; retrying", i)
                        respawn_at[i] = time.monotonic() + self._backoff(i)

    def _backoff(self, i: int) -> float:
        """Seconds to wait before restarting child ``i``: RESTART_DELAY_S after a long life,
        doubling with each quick death in a row."""
        if time.monotonic() - self._started[i] >= STABLE_S:
            self._delay[i] = RESTART_DELAY_S
        delay = self._delay[i]
        self._delay[i] = min(delay * 2, RESTART_DELAY_MAX_S)
        return delay

    def _drain(self, i: int) -> None:
        conn = self._conns[i]
        if conn is None or i in self._eof:
            return
        try:
            while conn.poll():
                self._handle(i, conn.recv())
        except (EOFError, OSError):  # the child is gone (its exit is handled by _supervise)
            self._eof.add(i)

    def _handle(self, i: int, msg: tuple[Any, ...]) -> None:
        kind = msg[0]
        if kind == "metrics":
            self.ctx.metrics.merge_source(f"ingest-{i}", msg[1])
        elif kind == "ready":
            with self._ready_changed:
                self._ready[i] = bool(msg[1])
                self._ready_changed.notify_all()
        elif kind == "link":
            self._link_status[i] = msg[1]
        elif kind == "kick" and self.ctx.db.outbox_listener is not None:
            self.ctx.db.outbox_listener()

    def _retire(self, i: int) -> None:
        """Child ``i`` is gone: keep its counts (a successor starts from zero), forget its state."""
        self.ctx.metrics.retire_source(f"ingest-{i}")
        with self._ready_changed:
            self._ready[i] = False
            self._ready_changed.notify_all()
        self._link_status[i] = None
        conn, self._conns[i], self._procs[i] = self._conns[i], None, None
        if conn is not None:
            conn.close()


def child_main(values: dict[str, Any], index: int, count: int, conn: Connection) -> None:
    """Entry point of one ingest process: a consuming link and an ingest worker until told to
    stop or until the server process goes away."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the parent stops us
    stopping = False

    def on_sigterm(signum: int, frame: FrameType | None) -> None:  # stop as on the parent's "stop"
        nonlocal stopping
        stopping = True  # a plain flag: a handler taking a lock can deadlock against itself

    signal.signal(signal.SIGTERM, on_sigterm)
    parent = multiprocessing.parent_process()
    set_death_signal(signal.SIGTERM, parent.pid if parent is not None else None)
    settings = Settings(**values)
    logging.basicConfig(
        level=settings.log_level.upper(),
        format=f"%(asctime)s ingest-{index} %(levelname)s %(name)s: %(message)s",
    )
    ctx = ServerContext.attach(settings)
    send_lock = threading.Lock()  # the ingest thread sends kicks, this one the rest

    def send(msg: tuple[Any, ...]) -> None:
        with send_lock:
            conn.send(msg)

    def kick() -> None:  # re-signed DesiredStates committed: the server's outbox publishes them now
        with contextlib.suppress(OSError, ValueError):
            send(("kick",))

    ctx.db.outbox_listener = kick
    ingest = IngestWorker(ctx, ctx.metrics)
    link = MqttLink(
        settings,
        ingest.submit,
        identity=ClientIdentity.issue(ctx.ca, ingest_id(server_name(settings), index, count)),
        shared=settings.shared_subscriptions,
        metrics=ctx.metrics,
        name=f"ingest-{index}",
    )
    ingest.start()
    link.start()
    if settings.gc_tuning:
        tune_gc()
    ready: bool | None = None
    last: Snapshot | None = None
    link_status: tuple[Any, ...] | None = None
    try:
        while not stopping:
            if conn.poll(REPORT_S):
                msg = conn.recv()
                if msg[0] == "stop":
                    break
            now_ready = link.connected and link.subscribed.is_set()
            status = link.status()
            key = (status["state"], status["last_error"])
            if key != link_status:  # before "ready": /readyz shows the state that made it so
                link_status = key
                send(("link", status))
            if now_ready != ready:
                ready = now_ready
                send(("ready", ready))
            snap = ctx.metrics.snapshot()
            if snap != last:
                last = snap
                send(("metrics", snap))
    except (EOFError, OSError):  # the server process is gone
        pass
    finally:
        link.stop()
        ingest.wait_idle(10)  # what the link delivered is written before we go
        ingest.stop()
        with contextlib.suppress(OSError, ValueError):
            send(("metrics", ctx.metrics.snapshot()))
        ctx.close()
