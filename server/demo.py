"""``fleet demo``: the main job on the embedded default, end to end, in a few minutes.

Starts Mosquitto and the control server, enrolls N real device daemons and sends live inference
traffic to them, then rolls out ``detector`` 1.0.0, a good 2.0.0 in three gated stages, and a bad
3.0.0 whose canary reverts in probation, so the rollout rolls back. Then the hybrid act
(server/demo_hybrid.py): the digits pair behind a ``prefer_edge`` routing policy, with the cloud
tier stopped for a while. Prints a summary and exits 0 when all of that happened as expected.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from rich.table import Table

from device_client.console import make_console, print_rule
from device_client.enroll import enroll
from server.admin.service import BOOTSTRAP_TOKEN_TTL_S, CLI_PRINCIPAL, AdminService
from server.admin.tables import Role
from server.client import FleetClient
from server.config import Settings
from server.context import ServerContext
from server.demo_hybrid import hybrid_act
from server.mqtt.broker import free_port
from server.rollouts.policy import Stage
from server.views import follow_rollout

console = make_console()
MODEL = "detector"


@dataclass
class DemoDevice:
    device_id: str
    data_dir: Path
    api_port: int
    proc: subprocess.Popen[bytes] | None = None
    sent: int = 0
    failed: int = 0
    answered_by: dict[str, int] = field(default_factory=dict)


class Traffic:
    """Live inference requests against every device's local API (some inputs negative)."""

    def __init__(self, devices: list[DemoDevice], interval_s: float = 0.02) -> None:
        self.devices = devices
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(d,), daemon=True) for d in devices]

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=5)

    def _run(self, device: DemoDevice) -> None:
        import numpy as np

        rng = np.random.default_rng(abs(hash(device.device_id)) % 2**32)
        with httpx.Client(base_url=f"http://127.0.0.1:{device.api_port}", timeout=5) as http:
            while not self._stop.wait(self.interval_s):
                x = rng.uniform(-0.15, 1.0, size=(1, 4)).round(4).tolist()
                try:
                    r = http.post("/v1/infer", json={"inputs": {"x": x}})
                except httpx.HTTPError:
                    continue  # the daemon is starting or stopping
                device.sent += 1
                if r.status_code != 200:
                    device.failed += 1
                    continue
                version = r.headers.get("x-fleet-model-version", "?")
                device.answered_by[version] = device.answered_by.get(version, 0) + 1


def _build_models(workdir: Path) -> dict[str, Path]:
    from server.onnx_models import make_model  # onnx: loaded once the demo builds its models

    return {
        "1.0.0": make_model(workdir / "detector-1.0.0.onnx", seed=1),
        "2.0.0": make_model(workdir / "detector-2.0.0.onnx", seed=2),
        # the bad one: NaN for any negative input element, which live traffic contains
        "3.0.0": make_model(workdir / "detector-3.0.0.onnx", seed=3, nan_on_negative=True),
    }


def _start_daemon(device: DemoDevice, logs: Path) -> None:
    env = {
        **os.environ,
        "FLEET_DEVICE_DATA_DIR": str(device.data_dir),
        "FLEET_DEVICE_API_PORT": str(device.api_port),
        "FLEET_DEVICE_HEALTH_WINDOW_S": "1",
        "FLEET_DEVICE_PROBATION_TICK_S": "0.2",
        "FLEET_DEVICE_LOAD_NICE": "5",
        "FLEET_DEVICE_LOAD_IDLE": "false",  # four daemons and the server share two cores: keep loads moving
    }
    log = open(logs / f"{device.device_id}.log", "ab")  # noqa: SIM115 - owned by the child
    device.proc = subprocess.Popen(
        [sys.executable, "-m", "server.cli", "device", "run", "--data-dir", str(device.data_dir)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    log.close()


def _growing(stages: list[dict[str, Any]], n_devices: int) -> list[dict[str, Any]]:
    """Drop stages that would not add a device on a fleet this small (the API refuses them)."""
    kept: list[dict[str, Any]] = []
    last = 0
    for stage in stages:
        size = Stage.model_validate(stage).size(n_devices)
        if size > last:
            kept.append(stage)
            last = size
    return kept


def _wait(predicate: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise TimeoutError(f"timed out waiting for {what}")


def _rollout(
    client: FleetClient,
    version: str,
    stages: list[float],
    soak_s: float,
    min_requests: int = 20,
    model: str = MODEL,
    routing: dict[str, Any] | None = None,
    probation_s: float = 4,
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": model,
        "version": version,
        "selector": {"tags": {"fleet": "demo"}},
        "stages": [{"percent": p, "soak_s": soak_s} for p in stages],
        "gates": {
            "max_failure_ratio": 0.0,
            "max_error_rate": 0.02,
            "max_p95_ratio": 5.0,
            "min_requests": min_requests,
        },
        "probation": {"seconds": probation_s, "min_requests": min_requests, "max_error_rate": 0.05},
        "on_failure": "rollback",
        "max_concurrent_downloads": 2,
        "device_timeout_s": 120,
    }
    body["stages"] = _growing(body["stages"], len(list(client.iter_devices(tags={"fleet": "demo"}))))
    created = client.create_rollout(body, routing=routing)
    console.print(
        f"\n[bold]rollout {created['id']}[/bold]: {model} {version} to {created['devices']} devices, "
        f"stages {', '.join(str(s['percent']) + '%' for s in body['stages'])}"
    )
    return follow_rollout(console, client, created["id"], poll_s=0.5)


def _admin_token(ctx: ServerContext, role: Role = Role.admin) -> str:
    with ctx.db.session_scope() as session:
        service = AdminService(session)
        name = f"demo-{role.value}"
        return service.create_token(name, role, CLI_PRINCIPAL, ttl_s=BOOTSTRAP_TOKEN_TTL_S).token


#: marks a directory as a demo's work directory, which a later ``--workdir`` run may replace
WORKDIR_MARKER = ".fleetota-demo"


def demo(n_devices: int = 4, workdir: Path | None = None, keep: bool = False) -> int:
    """Run the demo; return the process exit code (0 when everything went as designed)."""
    from server.runner import ServerThread, start_embedded_broker  # looked up per run: tests wrap it

    root = workdir or Path(tempfile.mkdtemp(prefix="fleetota-demo-"))
    if workdir is not None and workdir.is_dir() and any(workdir.iterdir()):
        if not (workdir / WORKDIR_MARKER).exists():
            console.print(
                f"[red]error:[/red] {workdir} is not empty and not an earlier demo's work directory; "
                "give a new or empty directory"
            )
            return 2
        shutil.rmtree(workdir)  # an earlier demo's: start afresh
    root.mkdir(parents=True, exist_ok=True)
    (root / WORKDIR_MARKER).touch()
    logs = root / "logs"
    logs.mkdir()
    port, cloud_port = free_port(), free_port()
    settings = Settings(
        data_dir=root / "server",
        port=port,
        mqtt_port=free_port(),
        public_url=f"http://127.0.0.1:{port}",
        rollout_tick_s=0.5,
        ingest_batch_delay_s=0.1,
        # the hybrid act's cloud tier: devices learn its URL at enrollment (plain HTTP on loopback)
        cloud_port=cloud_port,
        cloud_public_url=f"http://127.0.0.1:{cloud_port}",
        cloud_rate_per_s=0,  # the demo's traffic is faster than a device's: no per-device limit
    )
    print_rule(console, "[bold]fleetota demo")
    console.print(f"work directory {root}")
    broker = start_embedded_broker(settings)
    server = ServerThread(settings).start()
    console.print(f"control server {server.url} (SQLite), Mosquitto 127.0.0.1:{settings.mqtt_port} (mTLS)")
    devices: list[DemoDevice] = []
    traffic: Traffic | None = None
    results: list[dict[str, Any]] = []
    client: FleetClient | None = None
    summary_ok = False
    hybrid_ok = False
    try:
        client = FleetClient(server.url, _admin_token(server.ctx))
        console.print(
            f"dashboard {server.url}/ui/ : sign in with the viewer token "
            f"{_admin_token(server.ctx, Role.viewer)}"
        )
        models = _build_models(root)
        enroll_token = client.create_enroll_token({"fleet": "demo"}, uses=n_devices)["token"]
        for i in range(n_devices):
            device = DemoDevice(f"edge-{i + 1:02d}", root / f"edge-{i + 1:02d}", free_port())
            # the demo's server speaks plain HTTP on loopback: a lab, as --insecure-http says
            enroll(server.url, enroll_token, device.data_dir, device_id=device.device_id, insecure_http=True)
            _start_daemon(device, logs)
            devices.append(device)
        console.print(
            f"enrolled and started {n_devices} device daemons (real onnxruntime): "
            + ", ".join(d.device_id for d in devices)
        )
        _wait(
            lambda: all(d["status"] == "online" for d in client.iter_devices(tags={"fleet": "demo"})),
            60,
            "devices online",
        )

        for version, path in models.items():
            pushed = client.push_model(MODEL, version, path)
            console.print(f"published {MODEL} {version} (release {pushed['release']}, signed TUF target)")

        # the first install: no traffic yet (nothing serves), so no request count is demanded
        results.append(_rollout(client, "1.0.0", [50, 100], soak_s=2, min_requests=0))
        traffic = Traffic(devices)
        traffic.start()
        time.sleep(4)  # a health baseline on 1.0.0
        results.append(_rollout(client, "2.0.0", [25, 50, 100], soak_s=4))
        time.sleep(3)  # a health baseline on 2.0.0
        results.append(_rollout(client, "3.0.0", [25, 100], soak_s=4))
        time.sleep(2)
        traffic.stop()  # /v1/infer names no model once two are hosted

        print_rule(console, "[bold]hybrid edge/cloud")
        hybrid_ok = hybrid_act(
            console,
            settings,
            root,
            [d.api_port for d in devices],
            _admin_token(server.ctx, Role.cloud),
            client.push_model,
            lambda model, routing: _rollout(
                client, "1.0.0", [100], soak_s=1, min_requests=0, model=model, routing=routing, probation_s=1
            ),
            _wait,
        )
    finally:
        try:
            if traffic is not None:
                traffic.stop()
            summary_ok = _summary(client if devices else None, devices, results)
        finally:  # whatever failed above: no daemon, server or broker outlives the demo
            for d in devices:
                if d.proc is not None:
                    d.proc.send_signal(signal.SIGTERM)
            for d in devices:
                if d.proc is not None:
                    try:
                        d.proc.wait(15)
                    except subprocess.TimeoutExpired:
                        d.proc.kill()
            server.stop()
            broker.stop()
            if not keep and workdir is None:
                shutil.rmtree(root, ignore_errors=True)
    return 0 if summary_ok and hybrid_ok else 1


def _summary(client: FleetClient | None, devices: list[DemoDevice], results: list[dict[str, Any]]) -> bool:
    print_rule(console, "[bold]summary")
    table = Table("rollout", "version", "outcome", "devices", "why")
    for r in results:
        table.add_row(
            r["id"], r["version"], r["status"], str(r["devices"]), r.get("reason") or "all gates held"
        )
    console.print(table)
    if client is not None:
        dev_table = Table("device", "status", "serving", "requests sent", "failed", "answered by")
        for d in devices:
            info = client.get_device(d.device_id)
            answered = ", ".join(f"{v}: {n}" for v, n in sorted(d.answered_by.items()))
            dev_table.add_row(
                d.device_id,
                info["status"],
                info["serving"].get(MODEL, "-"),
                str(d.sent),
                str(d.failed),
                answered,
            )
        console.print(dev_table)
    statuses = [r["status"] for r in results]
    expected = ["completed", "completed", "rolled_back"]
    ok = statuses == expected
    if client is not None and ok:
        ok = all(client.get_device(d.device_id)["serving"].get(MODEL) == "2.0.0" for d in devices)
    if ok:
        console.print(
            "[green]3.0.0 tripped the canary's gates and was rolled back automatically; "
            "every device serves 2.0.0.[/green]"
        )
    else:
        console.print(f"[red]unexpected outcome: {statuses} (expected {expected})[/red]")
    return ok
