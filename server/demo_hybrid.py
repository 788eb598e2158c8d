"""The demo's hybrid act: the digits pair deployed with a ``prefer_edge`` routing policy.

Pushes ``digits`` (edge) and ``digits-cloud``, serves the cloud model with a ``fleet cloud serve``
child, rolls ``digits`` out with the policy, sends the held-out digits with their true labels to
the devices' local APIs and tabulates who answered and how accurately; then stops the cloud tier
for a few seconds while traffic goes on, restarts it, and tabulates again.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnxruntime as ort
from rich.console import Console
from rich.table import Table

from server.cloud.embedded import child_environment
from server.config import Settings
from server.digits import INPUT, OUTPUT, build_digits_pair
from server.procs import death_signal_preexec

EDGE_MODEL = "digits"
CLOUD_MODEL = "digits-cloud"
THRESHOLD = 0.8
PATHS = ("edge", "cloud", "cache")

#: the policy the ``digits`` rollout carries: unsure edge answers (max_prob < 0.8) go to the
#: fleet's cloud tier; a short breaker, so the cloud is asked again soon after it is back
ROUTING: dict[str, Any] = {
    "mode": "prefer_edge",
    "confidence": {"output": OUTPUT, "kind": "max_prob", "threshold": THRESHOLD},
    "cloud": {"endpoint": "fleet", "model": CLOUD_MODEL, "timeout_ms": 500},
    "budget": {"per_minute": 60_000, "burst": 1000},
    "breaker": {"failures": 3, "open_s": 1.0, "probes": 1},
}


@dataclass
class Tally:
    """Answers of one period: per path requests and correct ones, and the edge model's own score."""

    requests: dict[str, int] = field(default_factory=lambda: dict.fromkeys(PATHS, 0))
    correct: dict[str, int] = field(default_factory=lambda: dict.fromkeys(PATHS, 0))
    edge_correct: int = 0
    failed: int = 0

    @property
    def answered(self) -> int:
        return sum(self.requests.values())

    def accuracy(self) -> float:
        return sum(self.correct.values()) / max(self.answered, 1)

    def edge_only_accuracy(self) -> float:
        return self.edge_correct / max(self.answered, 1)


class DigitsTraffic:
    """One thread per device's local API, looping over its share of the held-out digits (so inputs
    repeat and the cache has answers), counting into the current :class:`Tally`."""

    def __init__(
        self,
        api_ports: list[int],
        x: np.ndarray,
        y: np.ndarray,
        edge_pred: np.ndarray,
        interval_s: float = 0.01,
    ) -> None:
        self.x, self.y, self.edge_pred = x, y, edge_pred
        self.interval_s = interval_s
        self.tally = Tally()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        n = len(api_ports)
        self._passes = [0] * n
        self._threads = [
            threading.Thread(target=self._run, args=(i, port, range(i, len(x), n)), daemon=True)
            for i, port in enumerate(api_ports)
        ]

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def one_pass_each(self) -> bool:
        """Whether every device has answered each of its digits once (so escalated ones are cached)."""
        return all(self._passes)

    def cut(self) -> Tally:
        """The tally so far; counting starts afresh."""
        with self._lock:
            tally, self.tally = self.tally, Tally()
        return tally

    def stop(self) -> Tally:
        """Stop the threads (also before :meth:`start`, or twice) and return the last tally."""
        self._stop.set()
        for t in self._threads:
            if t.is_alive():
                t.join(timeout=10)
        return self.cut()

    def _run(self, n: int, port: int, indices: range) -> None:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as http:
            while not self._stop.is_set():
                for i in indices:
                    if self._stop.wait(self.interval_s):
                        return
                    self._one(http, i)
                self._passes[n] += 1

    def _one(self, http: httpx.Client, i: int) -> None:
        try:
            r = http.post(
                f"/v1/models/{EDGE_MODEL}/infer", json={"inputs": {INPUT: self.x[i : i + 1].tolist()}}
            )
            path = r.headers.get("x-fleet-answered-by", "")
            pred = int(np.argmax(r.json()["outputs"][OUTPUT][0])) if r.status_code == 200 else -1
        except (httpx.HTTPError, ValueError, KeyError, IndexError, TypeError):
            r, path, pred = None, "", -1
        with self._lock:
            if r is None or r.status_code != 200 or path not in PATHS:
                self.tally.failed += 1
                return
            self.tally.requests[path] += 1
            self.tally.correct[path] += int(pred == self.y[i])
            self.tally.edge_correct += int(self.edge_pred[i] == self.y[i])


class CloudProcess:
    """``fleet cloud serve`` as a child of the demo (its log in ``log``), stoppable and restartable;
    the kernel sends it SIGTERM if the demo dies."""

    def __init__(self, settings: Settings, token: str, log: Path) -> None:
        self.env = {**child_environment(settings, token), "FLEET_CLOUD_MODELS": CLOUD_MODEL}
        self.url = f"http://127.0.0.1:{settings.cloud_port}"
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "server.cli", "cloud", "serve"],
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                preexec_fn=death_signal_preexec(signal.SIGTERM),  # a demo killed -9 leaves no cloud tier
            )

    def ready(self) -> bool:
        if self.proc is None or self.proc.poll() is not None:
            raise RuntimeError(f"fleet cloud serve exited; see {self.log}")
        try:
            return httpx.get(f"{self.url}/v2/health/ready", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


def print_tally(console: Console, title: str, tally: Tally) -> None:
    table = Table("answered by", "requests", "share", "accuracy", title=title)
    for path in PATHS:
        n = tally.requests[path]
        acc = f"{tally.correct[path] / n:.3f}" if n else "-"
        table.add_row(path, str(n), f"{n / max(tally.answered, 1):.0%}", acc)
    table.add_row("[bold]hybrid (all)", str(tally.answered), "100%", f"[bold]{tally.accuracy():.3f}")
    table.add_row("edge-only (same inputs)", str(tally.answered), "", f"{tally.edge_only_accuracy():.3f}")
    console.print(table)
    console.print(f"failed requests: {tally.failed}")


def hybrid_act(
    console: Console,
    settings: Settings,
    workdir: Path,
    api_ports: list[int],
    cloud_token: str,
    push: Callable[[str, str, Path], Any],
    roll_out: Callable[[str, dict[str, Any]], dict[str, Any]],
    wait: Callable[[Callable[[], Any], float, str], Any],
    outage_s: float = 4.0,
) -> bool:
    """Run the act; True when no request failed and the hybrid beat the edge alone."""
    pair = build_digits_pair(workdir / "digits")
    edge = ort.InferenceSession(str(pair.edge), providers=["CPUExecutionProvider"])
    edge_pred = np.argmax(edge.run([OUTPUT], {INPUT: pair.x_val})[0], axis=1)
    for name, path in ((EDGE_MODEL, pair.edge), (CLOUD_MODEL, pair.cloud)):
        pushed = push(name, "1.0.0", path)
        console.print(f"published {name} 1.0.0 (release {pushed['release']})")
    cloud = CloudProcess(settings, cloud_token, workdir / "logs" / "cloud.log")
    traffic = DigitsTraffic(api_ports, pair.x_val, pair.y_val, edge_pred)
    try:
        cloud.start()  # it starts while the rollout installs the edge model
        result = roll_out(EDGE_MODEL, ROUTING)
        wait(cloud.ready, 60, "the cloud tier to serve digits-cloud")
        console.print(
            f"cloud tier {cloud.url} serves {CLOUD_MODEL}; {len(pair.y_val)} held-out digits with their "
            f"labels go to the devices, unsure edge answers (max_prob < {THRESHOLD}) to the cloud"
        )
        traffic.start()
        wait(traffic.one_pass_each, 120, "a pass over the held-out digits")
        before = traffic.cut()
        print_tally(console, "cloud tier up", before)
        cloud.stop()
        console.print(f"[yellow]cloud tier stopped for {outage_s:g} s; traffic goes on[/yellow]")
        time.sleep(outage_s)
        down = traffic.cut()
        print_tally(console, "cloud tier stopped", down)
        cloud.start()
        wait(cloud.ready, 60, "the cloud tier to come back")
        console.print("cloud tier restarted")
        time.sleep(3)
        after = traffic.stop()
        print_tally(console, "cloud tier restarted", after)
    finally:
        traffic.stop()
        cloud.stop()
    failed = before.failed + down.failed + after.failed
    ok = (
        result["status"] == "completed"
        and failed == 0
        and down.answered > 0
        and before.accuracy() > before.edge_only_accuracy()
    )
    if ok:
        console.print(
            f"[green]hybrid accuracy {before.accuracy():.3f} vs edge-only {before.edge_only_accuracy():.3f}; "
            "no request failed while the cloud tier was away.[/green]"
        )
    else:
        console.print(
            f"[red]the hybrid act did not go as designed: rollout {result['status']}, {failed} failed "
            f"requests, hybrid accuracy {before.accuracy():.3f} vs edge-only "
            f"{before.edge_only_accuracy():.3f}[/red]"
        )
    return ok
