"""CPU per request and per-variant gates end to end: a real server against a private Mosquitto and
real device daemons (real onnxruntime measuring CPU time) answering live traffic.

A version whose model costs far more CPU trips ``max_cpu_ratio`` in its canary; with devices on
two variants of a version (fp32 and the int8 build of ``quantize: int8``, picked by the CPU flags
each device reports), the variant whose devices fail is the one the pause names.
"""

from __future__ import annotations

import httpx
import pytest
import sqlalchemy as sa
from click.testing import CliRunner

from server.cli import main
from server.health.tables import HealthSample
from tests.helpers.dashboard import login
from tests.helpers.device_fleet import auth, push_model
from tests.helpers.onnx_models import make_model
from tests.helpers.rollout_e2e import MODEL, Fleet, Traffic, follow, rollout_body, wait_requests

pytestmark = [
    pytest.mark.mqtt,
    pytest.mark.parametrize(
        "database_url", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)], indirect=True
    ),
]


@pytest.fixture
def fleet_of(live_server, tmp_path):
    """``fleet_of(n, prefix, **daemon settings)``: n enrolled devices; all stopped after."""
    fleets: list[Fleet] = []

    def make(n: int, prefix: str = "edge", **overrides) -> Fleet:
        fleets.append(Fleet(live_server, tmp_path / "devices", n, prefix=prefix, **overrides))
        return fleets[-1]

    yield make
    for f in fleets:
        f.close()


def stored(live, version: str) -> list[tuple[str, str | None, float | None, int | None]]:
    """(device, variant, cpu_ms_per_request, rss_bytes) of the stored serve windows of ``version``
    with requests."""
    h = HealthSample
    with live.ctx.db.session_scope() as s:
        q = sa.select(h.device_id, h.variant, h.cpu_ms_per_request, h.rss_bytes).where(
            h.model == MODEL, h.version == version, h.mode == "serve", h.requests > 0
        )
        return [tuple(r) for r in s.execute(q)]


def test_a_version_that_costs_more_cpu_trips_max_cpu_ratio_in_its_canary(fleet_of, live_server, tmp_path):
    push_model(live_server, MODEL, "1.0.0", make_model(tmp_path / "1.onnx", seed=1))
    # the same answers behind a chain of 256x256 MatMuls: far more CPU per request
    push_model(live_server, MODEL, "2.0.0", make_model(tmp_path / "2.onnx", seed=2, slow_factor=4))
    fleet = fleet_of(4)
    fleet.start()
    fleet.install("1.0.0")
    with Traffic(fleet) as traffic:
        wait_requests(traffic, fleet.ids, 5)
        fleet.wait_health("1.0.0")
        body = rollout_body(
            "2.0.0",
            [{"count": 2, "soak_s": 1}, {"percent": 100, "soak_s": 1}],
            gates={"max_cpu_ratio": 2.0},
            on_failure="pause",
        )
        rid = fleet.client.create_rollout(body)["id"]
        final = follow(fleet.client, rid, timeout=60)
    assert final["status"] == "paused", (final["status"], final["reason"])
    assert final["reason"].startswith("stage 1 gates failed: CPU per request "), final["reason"]
    assert final["reason"].endswith("x the same devices' baseline > 2.0x"), final["reason"]
    numbers = final["verdict"]["numbers"]
    assert numbers["cpu_ratio"] > 2.0, numbers
    assert numbers["cpu_ms_per_request"] > numbers["baseline_cpu_ms_per_request"] > 0, numbers
    assert final["current_stage"] == 0
    assert final["baseline"]["cpu_ms_per_request"] > 0
    assert final["stage_views"][0]["health"]["cpu_ms_per_request"] > 0

    # the windows the devices sent: variant, CPU time and resident memory of a running daemon
    rows = stored(live_server, "2.0.0")
    assert rows
    for _, variant, cpu, rss in rows:
        assert variant == "default"
        assert cpu is not None
        assert cpu > 0
        assert rss is not None
        assert 1 << 20 < rss < 1 << 40
    # and the rollout's health series carries CPU per request
    r = httpx.get(f"{live_server.url}/api/v1/rollouts/{rid}/health", headers=auth(live_server, "viewer"))
    assert r.status_code == 200, r.text
    series = {(s["version"], s["mode"]): s["points"] for s in r.json()["series"]}
    assert any(p["cpu_ms_per_request"] for p in series[("2.0.0", "serve")])
    assert r.json()["baseline"]["cpu_ms_per_request"] > 0
    # and a canary's page on the dashboard: CPU per request and resident memory per bucket
    canary = next(d for d, (stage, _, _) in fleet.deployments(rid).items() if stage == 0)
    with httpx.Client(base_url=live_server.url) as ui:
        assert login(ui, live_server.token("viewer")).status_code == 303
        device = ui.get(f"/ui/devices/{canary}/health.json").json()
    points = [p for s in device["series"] if s["version"] == "2.0.0" for p in s["points"]]
    assert any(p["cpu_ms_per_request"] and p["rss_bytes"] for p in points), device


def push_quantized(live, version: str, model) -> dict:
    """Push ``version`` with an int8 build for devices with ``avx512_vnni``."""
    data = {"version": version, "quantize": "int8", "min_agreement": "0", "int8_cpu_flags": "avx512_vnni"}
    with open(model, "rb") as fh:
        files = {"file": ("model.onnx", fh, "application/octet-stream")}
        r = httpx.post(f"{live.url}/api/v1/models/{MODEL}/versions", data=data, files=files,
                       headers=auth(live), timeout=120)  # fmt: skip
    assert r.status_code == 201, r.text
    return r.json()


def test_a_breach_in_one_variant_pauses_the_rollout_naming_it(fleet_of, live_server, tmp_path):
    push_model(live_server, MODEL, "1.0.0", make_model(tmp_path / "1.onnx", seed=1))
    # fp32 2.0.0 answers NaN for a negative input; its int8 build (dynamic quantization) does not
    out = push_quantized(live_server, "2.0.0", make_model(tmp_path / "2.onnx", seed=2, nan_on_negative=True))
    assert {v["variant"] for v in out["variants"]} == {"default", "int8"}
    vnni = fleet_of(2, "vnni", cpu_flags="avx512_vnni,avx2")
    plain = fleet_of(2, "plain", cpu_flags="avx2")
    for fleet in (vnni, plain):
        fleet.start()
        fleet.install("1.0.0")
    with Traffic(vnni, negative_share=0.3, seed=1) as t1, Traffic(plain, negative_share=0.3, seed=2) as t2:
        wait_requests(t1, vnni.ids, 5)
        wait_requests(t2, plain.ids, 5)
        for fleet in (vnni, plain):
            fleet.wait_health("1.0.0")
        body = rollout_body(
            "2.0.0",
            [{"percent": 100, "soak_s": 1}],
            # lenient on the device (each keeps 2.0.0 after its probation): the server's gates decide
            probation={"seconds": 0.5, "min_requests": 3, "max_error_rate": 1.0},
            on_failure="pause",
        )
        rid = vnni.client.create_rollout(body)["id"]
        final = follow(vnni.client, rid, timeout=60)
    assert final["status"] == "paused", (final["status"], final["reason"])
    assert final["reason"].startswith("stage 1 gates failed: variant default: error rate "), final["reason"]
    assert "variant int8" not in final["reason"]
    variants = final["verdict"]["variants"]
    assert variants["default"]["error_rate"] > 0.05, variants
    assert variants["int8"]["error_rate"] == 0, variants
    assert variants["int8"]["devices_reporting"] == variants["default"]["devices_reporting"] == 2
    # the rollout's detail shows the same per variant, live
    live_view = final["stage_views"][0]["health"]["variants"]
    assert set(live_view) == {"default", "int8"}
    assert live_view["int8"]["error_rate"] == 0
    assert live_view["default"]["p95_ms"] is not None
    # and fleet rollout status prints them: one row per variant
    env = {"FLEET_URL": live_server.url, "FLEET_TOKEN": live_server.token("viewer"), "COLUMNS": "200"}
    result = CliRunner().invoke(main, ["rollout", "status", rid], env=env, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "stage 1 per variant" in result.output
    rows = {
        line.split()[1]: line
        for line in result.output.splitlines()
        if " int8 " in line or " default " in line
    }
    assert set(rows) == {"default", "int8"}, result.output
    assert "0.00%" in rows["int8"]
    # and the rollout page: a row per variant
    with httpx.Client(base_url=live_server.url) as ui:
        r = login(ui, live_server.token("viewer"))
        assert r.status_code == 303, r.text
        page = ui.get(f"/ui/rollouts/{rid}/live").text
    assert 'id="variants"' in page
    assert 'data-variant="int8"' in page
    assert 'data-variant="default"' in page
    assert {d: v for d, v, _, _ in stored(live_server, "2.0.0")} == {
        **dict.fromkeys(vnni.ids, "int8"),
        **dict.fromkeys(plain.ids, "default"),
    }
