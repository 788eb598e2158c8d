"""The rollout engine's tick counts deployments in SQL and notifies in bulk: no tick materialises
the rollout's deployments as ORM objects (that would cost time and memory in proportion to the fleet
on every tick)."""

from __future__ import annotations

from sqlalchemy import event

from server.rollouts.engine import RolloutEngine
from server.rollouts.tables import Deployment
from tests.helpers.fleet_sim import SimFleet
from tests.helpers.rollout_lab import enroll_many, push


class Loads:
    """Counts Deployment rows materialised as ORM objects."""

    def __init__(self) -> None:
        self.n = 0

    def __call__(self, *_args) -> None:
        self.n += 1

    def during(self, fn) -> int:
        self.n = 0
        event.listen(Deployment, "load", self)
        try:
            fn()
        finally:
            event.remove(Deployment, "load", self)
        return self.n


def test_ticks_load_no_deployment_objects_and_respect_the_download_budget(
    app_client, admin_headers, ctx, onnx_model
):
    ids = enroll_many(app_client, admin_headers, "tick", 10, {"site": "tick"})
    for v in ("1.0.0", "2.0.0"):
        push(app_client, admin_headers, onnx_model, v)
    fleet = SimFleet(ctx, ids)
    fleet.start(serving_version="1.0.0")
    body = {
        "model": "det", "version": "2.0.0", "selector": {"tags": {"site": "tick"}},
        "stages": [{"percent": 100, "soak_s": 0}], "max_concurrent_downloads": 3,
    }  # fmt: skip
    r = app_client.post("/api/v1/rollouts", json=body, headers=admin_headers)
    assert r.status_code == 201, r.text
    rid = r.json()["id"]
    engine = RolloutEngine(ctx)
    loads = Loads()

    def phases() -> dict[str, int]:
        return app_client.get(f"/api/v1/rollouts/{rid}", headers=admin_headers).json()["phases"]

    assert loads.during(engine.tick) == 0
    assert phases() == {"notified": 3, "pending": 7}  # the first three online devices: the budget
    assert loads.during(engine.tick) == 0  # budget used up: nothing to do, nothing loaded
    assert loads.during(engine.tick) == 0
    assert phases() == {"notified": 3, "pending": 7}

    assert fleet.step() == 3
    assert loads.during(engine.tick) == 0
    assert phases() == {"succeeded": 3, "notified": 3, "pending": 4}
    for _ in range(6):
        fleet.step()
        fleet.health()  # the evidence a stage needs before its gates are judged
        engine.tick()
    assert app_client.get(f"/api/v1/rollouts/{rid}", headers=admin_headers).json()["status"] == "completed"
