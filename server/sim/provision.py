"""Identities for simulated devices, made through the real enrollment API.

Each device makes its own EC P-256 key and CSR (CN = its device id) and enrolls with one
many-use enrollment token, one request per device below :data:`BULK_FROM` devices, else
:data:`BULK_BATCH` at a time through ``POST /api/v1/enroll/bulk`` with keys made in a process pool.
Identities are kept in the work directory (``fleet.json``) and reused by a restarted simulator.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from device_client.enroll import make_csr
from device_client.protocol import HardwareFacts
from device_client.protocol.enrollment import EnrollRequest, EnrollResponse
from device_client.protocol.fsutil import atomic_write

log = logging.getLogger(__name__)

FLEET_FILE = "fleet.json"
#: enroll through ``POST /api/v1/enroll/bulk`` from this many missing devices (``bulk=None``); fewer
#: single requests stay within the server's per-address enrollment burst (FLEET_ENROLL_RATE_BURST)
BULK_FROM = 50
BULK_BATCH = 500
IDS_DIR = "ids"
ARCHES = ("x86_64", "aarch64")


@dataclass
class SimIdentity:
    device_id: str
    device_token: str
    arch: str


@dataclass
class FleetIdentities:
    """What the simulated devices need to reach the server and trust it."""

    workdir: Path
    server_url: str
    mqtt_host: str
    mqtt_port: int
    ca_pem: str
    director_pem: str
    devices: list[SimIdentity] = field(default_factory=list)

    @property
    def ca_file(self) -> Path:
        return self.workdir / "ca.crt"

    def key_file(self, device_id: str) -> Path:
        return self.workdir / IDS_DIR / f"{device_id}.key"

    def cert_file(self, device_id: str) -> Path:
        return self.workdir / IDS_DIR / f"{device_id}.crt"

    def save(self) -> None:
        atomic_write(self.ca_file, self.ca_pem.encode(), 0o644)
        doc = asdict(self)
        doc.pop("workdir")
        atomic_write(self.workdir / FLEET_FILE, json.dumps(doc).encode(), 0o600)

    @classmethod
    def load(cls, workdir: Path) -> FleetIdentities | None:
        path = workdir / FLEET_FILE
        if not path.exists():
            return None
        doc = json.loads(path.read_bytes())
        doc["devices"] = [SimIdentity(**d) for d in doc["devices"]]
        return cls(workdir=workdir, **doc)


def sim_hardware(arch: str) -> HardwareFacts:
    return HardwareFacts(
        arch=arch,
        ram_mb=2048,
        cpu_count=4,
        onnxruntime_version="sim",
        execution_providers=["CPUExecutionProvider"],
        os="fleet-simulator",
    )


def _write(path: Path, data: bytes, mode: int) -> None:
    """Plain write (no fsync: thousands of throw-away simulator files), created with ``mode``."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


def _new_key() -> tuple[ec.EllipticCurvePrivateKey, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return key, pem


def _keys_and_csrs(ids: list[str]) -> list[tuple[str, bytes, str]]:
    """(device id, key PEM, CSR PEM) for each id (runs in a worker process)."""
    out = []
    for device_id in ids:
        key, key_pem = _new_key()
        out.append((device_id, key_pem, make_csr(device_id, key)))
    return out


def _enroll_bulk(
    http: httpx.Client, admin_token: str, token: str, workdir: Path, wanted_index: dict[str, int],
    missing: list[str], concurrency: int,
) -> tuple[list[SimIdentity], dict[str, Any]]:  # fmt: skip
    chunks = [missing[i : i + BULK_BATCH] for i in range(0, len(missing), BULK_BATCH)]
    workers = max(1, min(os.cpu_count() or 1, len(chunks)))
    if workers > 1:
        # spawn, not fork: the caller may run a server's threads in this process
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            made = list(pool.map(_keys_and_csrs, chunks))
    else:
        made = [_keys_and_csrs(c) for c in chunks]

    def send(batch: list[tuple[str, bytes, str]]) -> tuple[list[SimIdentity], dict[str, Any]]:
        arch = {d: ARCHES[wanted_index[d] % len(ARCHES)] for d, _, _ in batch}
        body = {
            "token": token,
            "devices": [
                {"csr_pem": csr, "hardware": sim_hardware(arch[d]).model_dump(mode="json")}
                for d, _, csr in batch
            ],
        }
        r = http.post("/api/v1/enroll/bulk", json=body, headers={"Authorization": f"Bearer {admin_token}"})
        if r.status_code != 201:
            raise RuntimeError(f"bulk enrollment failed ({r.status_code}): {r.text[:500]}")
        doc = r.json()
        keys = {d: key_pem for d, key_pem, _ in batch}
        idents = []
        for item in doc.pop("devices"):
            d = item["device_id"]
            _write(workdir / IDS_DIR / f"{d}.key", keys[d], 0o600)
            _write(workdir / IDS_DIR / f"{d}.crt", item["certificate_pem"].encode(), 0o644)
            idents.append(SimIdentity(d, item["device_token"], arch[d]))
        return idents, doc

    with ThreadPoolExecutor(max(1, min(concurrency, 2))) as senders:
        results = list(senders.map(send, made))
    return [i for idents, _ in results for i in idents], results[0][1]


def enroll_fleet(
    server_url: str,
    admin_token: str,
    n: int,
    workdir: Path,
    *,
    prefix: str = "sim",
    tags: dict[str, str] | None = None,
    concurrency: int = 16,
    timeout_s: float = 60.0,
    bulk: bool | None = None,
) -> FleetIdentities:
    """Enroll ``n`` simulated devices ``{prefix}-{i:05d}`` (or reuse those enrolled before in
    ``workdir`` for the same server), each with its own key, CSR and certificate. ``bulk``: use
    ``POST /api/v1/enroll/bulk`` (None: when at least :data:`BULK_FROM` devices are missing)."""
    workdir = Path(workdir).absolute()
    (workdir / IDS_DIR).mkdir(parents=True, exist_ok=True, mode=0o700)
    fleet = FleetIdentities.load(workdir)
    if fleet is not None and fleet.server_url != server_url.rstrip("/"):
        raise ValueError(f"{workdir} holds identities for {fleet.server_url}; use another --workdir")
    have = {d.device_id: d for d in (fleet.devices if fleet else [])}
    wanted = [f"{prefix}-{i:05d}" for i in range(n)]
    missing = [d for d in wanted if d not in have]
    base = server_url.rstrip("/")
    with httpx.Client(
        base_url=base,
        timeout=timeout_s,
        limits=httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency),
    ) as http:
        if missing:
            r = http.post(
                "/api/v1/enroll-tokens",
                json={"uses": len(missing), "tags": tags or {}},
                headers={"Authorization": f"Bearer {admin_token}"},
            )
            r.raise_for_status()
            token = r.json()["token"]
            index = {d: i for i, d in enumerate(wanted)}
            if bulk or (bulk is None and len(missing) >= BULK_FROM):
                idents, shared = _enroll_bulk(http, admin_token, token, workdir, index, missing, concurrency)
                if fleet is None:
                    fleet = FleetIdentities(
                        workdir=workdir, server_url=base, mqtt_host=shared["mqtt"]["host"],
                        mqtt_port=shared["mqtt"]["port"], ca_pem=shared["ca_certificate_pem"],
                        director_pem=shared["director_public_key_pem"],
                    )  # fmt: skip
                fleet.devices.extend(idents)
                fleet.save()
                missing = []

        if missing:

            def one(i_device: tuple[int, str]) -> tuple[SimIdentity, EnrollResponse]:
                i, device_id = i_device
                key, key_pem = _new_key()
                arch = ARCHES[i % len(ARCHES)]
                req = EnrollRequest(
                    token=token, csr_pem=make_csr(device_id, key), hardware=sim_hardware(arch)
                )
                resp = http.post("/api/v1/enroll", json=req.model_dump(mode="json"))
                if resp.status_code != 201:
                    raise RuntimeError(f"enrolling {device_id} failed ({resp.status_code}): {resp.text}")
                body = EnrollResponse.model_validate(resp.json())
                _write(workdir / IDS_DIR / f"{device_id}.key", key_pem, 0o600)
                _write(workdir / IDS_DIR / f"{device_id}.crt", body.certificate_pem.encode(), 0o644)
                return SimIdentity(device_id, body.device_token, arch), body

            with ThreadPoolExecutor(concurrency) as pool:
                results = list(pool.map(one, [(index[d], d) for d in missing]))
            first = results[0][1]
            if fleet is None:
                fleet = FleetIdentities(
                    workdir=workdir,
                    server_url=base,
                    mqtt_host=first.mqtt.host,
                    mqtt_port=first.mqtt.port,
                    ca_pem=first.ca_certificate_pem,
                    director_pem=first.director_public_key_pem,
                )
            fleet.devices.extend(ident for ident, _ in results)
            fleet.save()
    assert fleet is not None
    chosen = dict.fromkeys(wanted)
    fleet.devices = [d for d in fleet.devices if d.device_id in chosen]
    return fleet
