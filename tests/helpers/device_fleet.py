"""Helpers for end-to-end device tests against ``live_server``: enroll real devices, push models,
assign desired states, publish crafted bundles, talk to a device's local API, poll server events."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import paho.mqtt.client as mqtt
import sqlalchemy as sa

from device_client.config import DeviceSettings
from device_client.enroll import Identity, enroll
from device_client.protocol import DesiredState
from device_client.protocol.messages import utcnow
from server.mqtt.broker import free_port


def wait_for(
    predicate: Callable[[], Any], timeout: float = 20.0, interval: float = 0.05, what: str = ""
) -> Any:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"condition not met in {timeout} s: {what} (last: {last!r})")


def auth(live, role: str = "operator") -> dict[str, str]:
    return {"Authorization": f"Bearer {live.token(role)}"}


def enroll_device(live, data_dir: Path, device_id: str) -> Identity:
    r = httpx.post(f"{live.url}/api/v1/enroll-tokens", json={}, headers=auth(live))
    r.raise_for_status()
    return enroll(live.url, r.json()["token"], data_dir, device_id=device_id, insecure_http=True)


def device_settings(data_dir: Path, **overrides: Any) -> DeviceSettings:
    """Fast, test-friendly daemon settings (free API port, short windows and ticks)."""
    values: dict[str, Any] = {
        "data_dir": data_dir,
        "api_port": 0,
        "health_window_s": 0.5,
        "probation_tick_s": 0.05,
        "load_nice": 0,
        "load_idle": False,
        "warmup_runs": 1,
        "reconnect_min_s": 1,
        "reconnect_max_s": 2,
        "download_read_timeout_s": 5,
        "min_free_bytes": 0,
    }
    values.update(overrides)
    return DeviceSettings(**values)


def daemon_env(data_dir: Path, api_port: int, **overrides: Any) -> dict[str, str]:
    """FLEET_DEVICE_* variables equivalent to :func:`device_settings` for a daemon subprocess."""
    values: dict[str, Any] = {
        "data_dir": data_dir,
        "api_port": api_port,
        "health_window_s": 0.5,
        "probation_tick_s": 0.05,
        "load_nice": 0,
        "load_idle": False,
        "warmup_runs": 1,
        "reconnect_min_s": 1,
        "reconnect_max_s": 2,
        "min_free_bytes": 0,
    }
    values.update(overrides)
    return {f"FLEET_DEVICE_{k.upper()}": str(v) for k, v in values.items()}


def push_model(live, name: str, version: str, onnx_path: Path) -> dict[str, Any]:
    with open(onnx_path, "rb") as fh:
        r = httpx.post(
            f"{live.url}/api/v1/models/{name}/versions",
            data={"version": version},
            files={"file": ("model.onnx", fh, "application/octet-stream")},
            headers=auth(live),
            timeout=60,
        )
    assert r.status_code == 201, r.text
    return r.json()


def assign(live, device_id: str, model: str, version: str, **body: Any) -> dict[str, Any]:
    r = httpx.put(
        f"{live.url}/api/v1/devices/{device_id}/desired",
        json={"model": model, "version": version, **body},
        headers=auth(live),
    )
    assert r.status_code == 200, r.text
    return r.json()


def device_record(live, device_id: str) -> dict[str, Any]:
    """The server's view of one device (``GET /api/v1/devices/{id}``: status, serving, tags, ...)."""
    r = httpx.get(f"{live.url}/api/v1/devices/{device_id}", headers=auth(live, "viewer"))
    r.raise_for_status()
    return r.json()


def events(live, device_id: str) -> list[dict[str, Any]]:
    r = httpx.get(f"{live.url}/api/v1/devices/{device_id}/events", headers=auth(live, "viewer"))
    r.raise_for_status()
    return sorted(r.json(), key=lambda e: e["seq"])


def wait_event(live, device_id: str, match: Callable[[dict[str, Any]], bool], timeout: float = 20.0) -> dict:
    def find() -> dict[str, Any] | None:
        return next((e for e in events(live, device_id) if match(e)), None)

    return wait_for(find, timeout, interval=0.1, what="device event")


def outcome_for(live, device_id: str, desired_seq: int, timeout: float = 30.0) -> dict[str, Any]:
    """The terminal report of one desired state."""
    terminal = {"succeeded", "failed", "rolled_back", "cancelled"}
    return wait_event(
        live, device_id, lambda e: e["desired_seq"] == desired_seq and e["phase"] in terminal, timeout
    )


def infer(api_url: str, x: np.ndarray, model: str | None = None) -> tuple[int, dict[str, Any]]:
    path = "/v1/infer" if model is None else f"/v1/models/{model}/infer"
    r = httpx.post(api_url + path, json={"inputs": {"x": x.tolist()}}, timeout=10)
    return r.status_code, r.json()


def serving_version(api_url: str) -> str | None:
    r = httpx.get(api_url + "/v1/health", timeout=5)
    models = r.json()["models"]
    return next(iter(models.values()))["version"] if models else None


def replace_bundle(live, model: str, version: str, bundle_tar: Path) -> None:
    """Publish ``bundle_tar`` as the signed target of an already pushed ``model`` ``version``.

    The registry refuses a model whose validation vectors do not match it, so a bad bundle cannot be
    *pushed*; but a compromised or buggy publishing pipeline with the targets key can still list
    one. This stands for that: the real push creates the catalog rows and target, then the target
    is re-published (signed by the repository's targets key) with the crafted bundle, and the
    artifact row is pointed at its new length and hash, exactly as a push would have written it.
    """
    from server.catalog.tables import CatalogModel, ModelArtifact, ModelVersion

    ctx = live.ctx
    with ctx.db.session_scope() as s:
        art = s.scalars(
            sa.select(ModelArtifact)
            .join(ModelVersion, ModelArtifact.version_id == ModelVersion.id)
            .join(CatalogModel, ModelVersion.model_id == CatalogModel.id)
            .where(CatalogModel.name == model, ModelVersion.version == version)
        ).one()
        custom = dict(ctx.repo.get_target(art.target_path).custom)
        info = ctx.repo.add_target(art.target_path, bundle_tar, custom, replace=True)
        art.length = info.length
        art.sha256 = info.hashes["sha256"]


def target_file(live, model: str, version: str) -> Path:
    """The stored file of the (default variant) target of ``model`` ``version`` on the server."""
    from device_client.trust import target_url

    for path, info in live.ctx.repo.list_targets().items():
        if path.startswith(f"{model}/{version}/"):
            rel = target_url("", path, info.hashes["sha256"]).lstrip("/")
            return live.ctx.repo.targets_dir / rel
    raise AssertionError(f"no target for {model} {version}")


def desired_for(live, device_id: str, seq: int, version: str = "3.0.0", **overrides) -> dict:
    """The signed part of a DesiredState for the listed clf ``version`` (a 0.2 s probation), with
    overrides: to sign with any key and inject (``ServerPublisher``)."""
    path, info = next(
        (p, i) for p, i in live.ctx.repo.list_targets().items() if p.startswith(f"clf/{version}/")
    )
    now = utcnow()
    fields = {
        "device_id": device_id,
        "seq": seq,
        "issued_at": now,
        "expires_at": now + timedelta(hours=1),
        "model": "clf",
        "version": version,
        "release": info.custom["release"],
        "target": path,
        "length": info.length,
        "hashes": {"sha256": info.hashes["sha256"]},
        "probation": {"seconds": 0.2, "min_requests": 0},
    }
    fields.update(overrides)
    return DesiredState.build(**fields).to_dict()


class ServerPublisher:
    """An MQTT client with the server's own identity (broker_dir), to inject desired messages."""

    def __init__(self, live) -> None:
        broker_dir = live.settings.broker_dir
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id="test-injector", protocol=mqtt.MQTTv5
        )
        self.client.tls_set(
            ca_certs=str(broker_dir / "ca.crt"),
            certfile=str(broker_dir / "fleet_server.crt"),
            keyfile=str(broker_dir / "fleet_server.key"),
        )
        self.client.connect("127.0.0.1", live.settings.mqtt_port)
        self.client.loop_start()

    def publish(self, device_id: str, payload: bytes | dict[str, Any], retain: bool = False) -> None:
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        info = self.client.publish(f"fleet/v1/d/{device_id}/desired", data, qos=1, retain=retain)
        info.wait_for_publish(5)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


REPO = Path(__file__).resolve().parents[2]


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM, and SIGKILL if it has not exited within 20 s."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class DaemonProcess:
    """``fleet device run`` on an enrolled data directory, killable with SIGKILL.

    ``command`` runs another command line instead, with the same ``FLEET_DEVICE_*`` environment."""

    def __init__(
        self, data_dir: Path, log: Path, *, command: Sequence[str] | None = None, **overrides: Any
    ) -> None:
        self.data_dir = data_dir
        self.port = free_port()
        self.log = log
        env = {**os.environ, **daemon_env(data_dir, self.port, **overrides)}
        if command is None:
            command = [sys.executable, "-m", "server.cli", "device", "run", "--data-dir", str(data_dir)]
        with open(log, "ab") as fh:
            self.proc = subprocess.Popen(
                list(command),
                cwd=REPO,
                env=env,
                stdout=fh,
                stderr=subprocess.STDOUT,
            )
        self.url = f"http://127.0.0.1:{self.port}"

    def wait_api(self, timeout: float = 30.0) -> None:
        def up() -> bool:
            assert self.proc.poll() is None, f"daemon exited: {self.log_tail()}"
            try:
                return httpx.get(self.url + "/v1/health", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(up, timeout=timeout, interval=0.05, what="daemon API up")

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill9(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def terminate(self) -> None:
        stop_process(self.proc)

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""
