"""A real control server with models pushed and a device enrolled, for the cloud tier's tests.

Everything goes through the server's API: `fleet model push`'s endpoint (real onnxruntime
validation, real TUF publish), enrollment with a real CSR, decommissioning, revocation.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnxruntime as ort

from server.mqtt.broker import free_port
from server.runner import ServerThread
from tests.helpers.pki import HARDWARE, key_pem, make_csr
from tests.helpers.tokens import create_admin_token


@dataclass
class Device:
    device_id: str
    token: str
    cert_pem: str
    key_pem: bytes

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def write_identity(self, directory: Path) -> tuple[Path, Path]:
        """Its certificate and key as files (for an mTLS client)."""
        directory.mkdir(parents=True, exist_ok=True)
        cert, key = directory / f"{self.device_id}.crt", directory / f"{self.device_id}.key"
        cert.write_text(self.cert_pem)
        key.write_bytes(self.key_pem)
        return cert, key


@dataclass
class Fleet:
    """A running control server (no MQTT) and an admin client of it."""

    server: ServerThread
    admin: httpx.Client
    models: dict[tuple[str, str], Path] = field(default_factory=dict)

    @property
    def ctx(self) -> Any:
        return self.server.ctx

    @property
    def settings(self) -> Any:
        return self.server.settings

    def push(self, name: str, version: str, path: Path) -> None:
        files = {"file": ("model.onnx", path.read_bytes(), "application/octet-stream")}
        r = self.admin.post(f"/api/v1/models/{name}/versions", data={"version": version}, files=files)
        assert r.status_code == 201, r.text
        self.models[(name, version)] = path

    def revoke(self, name: str, version: str) -> None:
        r = self.admin.delete(f"/api/v1/models/{name}/versions/{version}")
        assert r.status_code == 200, r.text

    def enroll(self, device_id: str) -> Device:
        r = self.admin.post("/api/v1/enroll-tokens", json={})
        assert r.status_code == 201, r.text
        csr, key = make_csr(device_id)
        r = self.admin.post(
            "/api/v1/enroll", json={"token": r.json()["token"], "csr_pem": csr, "hardware": HARDWARE}
        )
        assert r.status_code == 201, r.text
        body = r.json()
        return Device(device_id, body["device_token"], body["certificate_pem"], key_pem(key))

    def decommission(self, device_id: str) -> None:
        r = self.admin.post(f"/api/v1/devices/{device_id}/decommission")
        assert r.status_code == 200, r.text

    def cloud_token(self) -> str:
        return create_admin_token(self.ctx, "cloud")

    def cloud_settings(self, models: str, **over: Any) -> Any:
        """Settings of a cloud tier on a free port reading this server's repository (validated, as
        `fleet cloud serve` would read them from the environment)."""
        port = free_port()
        values = {
            "cloud_port": port,
            "cloud_models": models,
            "cloud_token": self.cloud_token(),
            "cloud_data_dir": self.settings.data_dir / "cloud" / str(port),
            "cloud_refresh_s": 0.3,
            "cloud_auth_cache_s": 0.0,
            **over,
        }
        return type(self.settings)(**{**self.settings.model_dump(), **values})

    def close(self) -> None:
        self.admin.close()
        self.server.stop()


def start_fleet(settings: Any) -> Fleet:
    port = free_port()
    live = settings.model_copy(update={"port": port, "public_url": f"http://127.0.0.1:{port}"})
    server = ServerThread(live).start()
    token = create_admin_token(server.ctx, "admin")
    admin = httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {token}"}, timeout=60)
    return Fleet(server, admin)


def reference(path: Path, x: np.ndarray) -> np.ndarray:
    """What onnxruntime itself answers for ``x`` on the model file ``path`` (first output)."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def infer_body(x: np.ndarray, name: str = "x", datatype: str = "FP32", **extra: Any) -> dict[str, Any]:
    return {
        "inputs": [{"name": name, "shape": list(x.shape), "datatype": datatype, "data": x.ravel().tolist()}],
        **extra,
    }


def wait_for(condition: Any, timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def metric(text: str, name: str, **labels: str) -> float | None:
    """The value of one sample in Prometheus text, or None."""
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    prefix = f"{name}{{{want}}} " if want else f"{name} "
    for line in text.splitlines():
        if line.startswith(prefix):
            return float(line[len(prefix) :])
    return None
