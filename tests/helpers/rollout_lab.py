"""A rollout lab: enrolled devices on an in-memory fleet (tests/helpers/fleet_sim.py), ``det``
versions published through the API, rollout bodies, and :func:`drive`, which ticks the real engine
until a rollout stops moving. ``tests/server/conftest.py`` builds the ``lab`` fixture from it."""

from __future__ import annotations

from server.rollouts.engine import RolloutEngine
from tests.helpers.fleet_sim import Behaviour, SimFleet
from tests.helpers.pki import HARDWARE, make_csr


def enroll_many(client, headers, prefix: str, n: int, tags: dict[str, str] | None = None) -> list[str]:
    token = client.post("/api/v1/enroll-tokens", json={"uses": n, "tags": tags or {}}, headers=headers).json()
    ids = []
    for i in range(n):
        csr, _ = make_csr(f"{prefix}-{i:02d}")
        r = client.post(
            "/api/v1/enroll", json={"token": token["token"], "csr_pem": csr, "hardware": HARDWARE}
        )
        assert r.status_code == 201, r.text
        ids.append(r.json()["device_id"])
    return ids


def push(client, headers, onnx_model, version: str) -> None:
    path = onnx_model(f"det-{version}.onnx", scale=float(version.split(".")[0]))
    with open(path, "rb") as fh:
        r = client.post(
            "/api/v1/models/det/versions",
            data={"version": version},
            files={"file": ("m.onnx", fh, "application/octet-stream")},
            headers=headers,
        )
    assert r.status_code == 201, r.text


def rollout_body(version: str, **over) -> dict:
    body = {
        "model": "det", "version": version, "selector": {"tags": {"site": "lab"}},
        "stages": [{"percent": 10, "soak_s": 0}, {"percent": 50, "soak_s": 0}, {"percent": 100, "soak_s": 0}],
        "gates": {"max_failure_ratio": 0.2, "max_error_rate": 0.05, "max_p95_ratio": 1.5,
                  "min_agreement": 0.9},
        "on_failure": "rollback",
    }  # fmt: skip
    body.update(over)
    return body


def drive(
    engine: RolloutEngine, fleet: SimFleet, client, headers, rollout_id: str, max_ticks: int = 60
) -> dict:
    """Tick the engine and let the fleet act until the rollout stops moving."""
    for _ in range(max_ticks):
        engine.tick()
        fleet.step()
        fleet.health()
        state = client.get(f"/api/v1/rollouts/{rollout_id}", headers=headers).json()
        if state["status"] in ("completed", "paused", "rolled_back", "aborted"):
            return state
    raise AssertionError(f"rollout did not finish: {state['status']} {state['phases']}")


def make_lab(
    app_client,
    admin_headers,
    ctx,
    onnx_model,
    versions: tuple[str, ...] = ("1.0.0", "2.0.0"),
    *,
    behaviours: dict[str, Behaviour] | None = None,
    baseline: bool = True,
) -> SimFleet:
    """Ten simulated devices tagged site=lab serving det 1.0.0, with ``versions`` published and,
    with ``baseline``, a stored pre-rollout health baseline on 1.0.0 (the lab fixtures' setup)."""
    ids = enroll_many(app_client, admin_headers, "lab", 10, {"site": "lab"})
    for v in versions:
        push(app_client, admin_headers, onnx_model, v)
    fleet = SimFleet(ctx, ids, behaviours=behaviours)
    fleet.start(serving_version="1.0.0")
    if baseline:
        fleet.health(at_offset_s=-60)  # pre-rollout baseline on 1.0.0
    return fleet
