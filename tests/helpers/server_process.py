"""``fleet server run`` as a real process (embedded Mosquitto, free ports, a temporary data
directory), and the process tree under it read from /proc."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from server.mqtt.broker import free_port

#: FLEET_* variables of the developer's shell that would point the server elsewhere
_DROP = ("FLEET_MQTT_URL", "FLEET_DATABASE_URL", "FLEET_DATA_DIR", "FLEET_PORT", "FLEET_MQTT_PORT")


def _stat(pid: int) -> tuple[str, int] | None:
    """(state, parent pid) of ``pid``, or None if it does not exist."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()
    return fields[0], int(fields[1])


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie waiting for its new parent to reap it does not)."""
    stat = _stat(pid)
    return stat is not None and stat[0] not in ("Z", "X")


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def descendants(pid: int) -> list[int]:
    """Every living process under ``pid`` (children, their children, ...)."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            stat = _stat(int(entry.name))
            if stat is not None and stat[0] not in ("Z", "X"):
                parents.setdefault(stat[1], []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def wait_until(predicate: Callable[[], object], timeout: float, what: str | Callable[[], str]) -> None:
    """Until ``predicate()``; ``what`` (or what it returns, then) describes the failure."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what() if callable(what) else what}")
        time.sleep(0.05)


class ServerProcess:
    """``python -m server.cli server run`` in ``workdir``, output in ``workdir/server.log``; no
    embedded cloud tier unless ``FLEET_CLOUD_EMBEDDED="true"`` is given (its port is a free one)."""

    def __init__(self, workdir: Path, *, mqtt_port: int | None = None, **env: str) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.mqtt_port = mqtt_port or free_port()
        self.cloud_port = free_port()
        self.log = workdir / "server.log"
        variables = {k: v for k, v in os.environ.items() if k not in _DROP}
        variables.update(
            FLEET_PORT=str(self.port),
            FLEET_MQTT_PORT=str(self.mqtt_port),
            FLEET_CLOUD_PORT=str(self.cloud_port),
            FLEET_CLOUD_EMBEDDED="false",
        )
        variables.update(env)
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "server.cli", "server", "run"],
                cwd=workdir,
                env=variables,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        self.url = f"http://127.0.0.1:{self.port}"

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Until ``/readyz`` answers 200 (database, migrations and MQTT links up)."""

        def ready() -> bool:
            assert self.proc.poll() is None, f"the server exited:\n{self.output()}"
            try:
                return httpx.get(f"{self.url}/readyz", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(ready, timeout, "the server is ready")

    def brokers(self) -> list[int]:
        """The Mosquitto processes under the server."""
        return [p for p in descendants(self.proc.pid) if "mosquitto" in cmdline(p)]

    def clouds(self) -> list[int]:
        """The ``fleet cloud serve`` processes under the server."""
        return [p for p in descendants(self.proc.pid) if "cloud serve" in cmdline(p)]

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def kill_tree(self) -> None:
        """Teardown: whatever is left of the server and its children."""
        left = {pid: cmdline(pid) for pid in descendants(self.proc.pid)}
        self.stop(signal.SIGKILL, timeout=10)
        for pid, line in left.items():
            if alive(pid) and cmdline(pid) == line:
                os.kill(pid, signal.SIGKILL)
