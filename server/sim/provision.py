"""Identities for simulated devices, made through the real enrollment API.

Each simulated device generates its own EC P-256 key and CSR (CN = its device id) and enrolls with
``POST /api/v1/enroll``, exactly as ``fleet device enroll`` does, so the server issues its
certificate from the fleet CA and registers it. For a large fleet the bulk path is: **one
enrollment token with many uses** (``POST /api/v1/enroll-tokens {"uses": N}``, up to 100,000),
and many enrollment requests in parallel over a shared HTTP connection pool (about 10,000 devices
in well under a minute here). The identities are kept in the work directory
(``<workdir>/fleet.json`` + one key and certificate per device), so a simulator restarted against
the same server reuses them instead of enrolling again.
"""

from __future__ import annotations

import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from device_client.enroll import make_csr
from device_client.protocol import HardwareFacts
from device_client.protocol.enrollment import EnrollRequest, EnrollResponse
from device_client.protocol.fsutil import atomic_write

log = logging.getLogger(__name__)

FLEET_FILE = "fleet.json"
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
) -> FleetIdentities:
    """Enroll ``n`` simulated devices ``{prefix}-{i:05d}`` (or reuse those enrolled before in
    ``workdir`` for the same server), each with its own key, CSR and certificate."""
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

            index = {d: i for i, d in enumerate(wanted)}
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


def raise_open_files(wanted: int) -> int:
    """Raise RLIMIT_NOFILE towards ``wanted`` (children inherit it); return the new soft limit."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= wanted:
        return soft
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if os.geteuid() == 0 and hard != resource.RLIM_INFINITY and hard < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, wanted))
            return wanted
        except (ValueError, OSError):
            pass
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError) as exc:
        log.warning("cannot raise the open-file limit to %d: %s", wanted, exc)
        return soft
    return target
