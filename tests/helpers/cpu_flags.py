"""Devices that report CPU flags, and ``det`` pushes whose variants require some: the fleet of the
hardware-variant tests (int8 on VNNI devices, previews, rollouts over devices no variant fits)."""

from __future__ import annotations

from pathlib import Path

from device_client.enroll import hardware_facts
from device_client.protocol import Presence
from device_client.protocol.messages import utcnow
from tests.helpers.fleet_sim import SimFleet
from tests.helpers.pki import HARDWARE, make_csr

#: constraints of a variant only devices with AVX-512 VNNI fit
VNNI_ONLY = '{"constraints": {"cpu_flags": "avx512_vnni"}}'


def flagged_fleet(app_client, admin_headers, ctx, flags: dict[str, str]) -> SimFleet:
    """Devices enrolled without CPU flags, then online with ``flags`` (their
    FLEET_DEVICE_CPU_FLAGS, comma-separated) in the hardware facts of their presence."""
    r = app_client.post("/api/v1/enroll-tokens", json={"uses": len(flags)}, headers=admin_headers)
    token = r.json()["token"]
    for device_id in flags:
        csr, _ = make_csr(device_id)
        r = app_client.post("/api/v1/enroll", json={"token": token, "csr_pem": csr, "hardware": HARDWARE})
        assert r.status_code == 201, r.text
    sim = SimFleet(ctx, list(flags))
    sim._send([
        (d, "presence", Presence.build(
            device_id=d, status="online", at=utcnow(), hardware=hardware_facts(f)
        ).to_json())
        for d, f in flags.items()
    ])  # fmt: skip
    return sim


def push_int8(app_client, headers, model: Path, **fields):
    """Push ``model`` as det 1.0.0 with its int8 variant (any agreement accepted)."""
    data = {"version": "1.0.0", "quantize": "int8", "min_agreement": "0"} | fields
    files = {"file": ("model.onnx", model.read_bytes(), "application/octet-stream")}
    return app_client.post("/api/v1/models/det/versions", data=data, files=files, headers=headers)


def push_variant(app_client, headers, model: Path, variant: str, metadata: str, version: str = "1.0.0"):
    """Push ``model`` as one ``variant`` of det ``version`` with ``metadata`` (its constraints)."""
    files = {"file": ("model.onnx", model.read_bytes(), "application/octet-stream")}
    return app_client.post(
        "/api/v1/models/det/versions",
        data={"version": version, "variant": variant, "metadata": metadata},
        files=files,
        headers=headers,
    )
