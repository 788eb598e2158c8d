"""The simulator's parent process: spawns the workers, aggregates their counters, stops them."""

from __future__ import annotations

import contextlib
import logging
import math
import multiprocessing as mp
import os
import threading
import time
from collections import Counter
from typing import Any

from server.sim.mux import raise_open_files
from server.sim.profiles import SimOptions
from server.sim.provision import FleetIdentities
from server.sim.worker import DeviceSpec, WorkerSpec, worker_main

log = logging.getLogger(__name__)


def default_processes(n_devices: int) -> int:
    return max(1, min(os.cpu_count() or 1, math.ceil(n_devices / 2500)))


class Simulator:
    """N simulated devices over real MQTT, split across worker processes."""

    def __init__(self, fleet: FleetIdentities, options: SimOptions | None = None) -> None:
        self.fleet = fleet
        self.options = options or SimOptions()
        n = len(fleet.devices)
        self.n_processes = min(n, self.options.processes or default_processes(n)) or 1
        self._procs: list[Any] = []
        self._conns: list[Any] = []
        self._stats: list[dict[str, Any]] = [{} for _ in range(self.n_processes)]
        self._stopped = [False] * self.n_processes
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._running = False

    def _spec(self, i: int) -> WorkerSpec:
        f = self.fleet
        devices = [
            DeviceSpec(d.device_id, str(f.cert_file(d.device_id)), str(f.key_file(d.device_id)), d.arch)
            for d in f.devices[i :: self.n_processes]
        ]
        return WorkerSpec(
            index=i,
            devices=devices,
            ca_file=str(f.ca_file),
            director_pem=f.director_pem,
            mqtt_host=f.mqtt_host,
            mqtt_port=f.mqtt_port,
            options=self.options,
        )

    def start(self) -> Simulator:
        raise_open_files(len(self.fleet.devices) * 2 + 1024)
        ctx = mp.get_context("spawn")
        for i in range(self.n_processes):
            parent, child = ctx.Pipe()
            proc = ctx.Process(
                target=worker_main, args=(self._spec(i), child), name=f"sim-worker-{i}", daemon=True
            )
            proc.start()
            child.close()
            self._procs.append(proc)
            self._conns.append(parent)
        self._running = True
        self._thread = threading.Thread(target=self._collect, name="sim-stats", daemon=True)
        self._thread.start()
        return self

    def _collect(self) -> None:
        from multiprocessing.connection import wait

        while self._running and not all(self._stopped):
            ready = wait([c for i, c in enumerate(self._conns) if not self._stopped[i]], timeout=0.5)
            for conn in ready:
                i = self._conns.index(conn)
                try:
                    kind, payload = self._conns[i].recv()  # `conn`, which wait() types too widely
                except (EOFError, OSError):
                    self._stopped[i] = True
                    continue
                with self._lock:
                    if kind == "stats":
                        self._stats[i] = payload
                    elif kind == "stopped":
                        self._stopped[i] = True

    def stats(self) -> dict[str, int]:
        total: Counter[str] = Counter()
        with self._lock:
            for s in self._stats:
                total.update(s)
        return dict(total)

    @property
    def connected(self) -> int:
        return self.stats().get("connected", 0)

    def wait_connected(self, timeout: float, n: int | None = None) -> bool:
        want = len(self.fleet.devices) if n is None else n
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.connected >= want:
                return True
            if not any(p.is_alive() for p in self._procs):
                return False
            time.sleep(0.1)
        return False

    def stop(self, timeout: float = 20.0) -> dict[str, int]:
        for conn in self._conns:
            with contextlib.suppress(OSError, BrokenPipeError):
                conn.send("stop")
        deadline = time.monotonic() + timeout
        for p in self._procs:
            p.join(max(0.1, deadline - time.monotonic()))
            if p.is_alive():
                p.terminate()
                p.join(5)
        self._running = False
        if self._thread is not None:
            self._thread.join(2)
        return self.stats()
