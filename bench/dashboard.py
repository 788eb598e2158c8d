"""Dashboard page latency at 10,000 devices / the JSON API for the same data (README, Dashboard).

    .venv/bin/python bench/dashboard.py [--devices 10000] [--postgres URL]

Inserts the devices, pushes a model and starts a rollout of it to every device (engine off: all
deployments pending), then times each dashboard page through the real app (signed in with the
cookie) against the JSON endpoint(s) that return its data. Target: every page within 100 ms and
within 2x of its JSON twin.
Writes bench/results/dashboard.json. Exits 0.
"""

from __future__ import annotations

import argparse
import re
import tempfile
from pathlib import Path

from benchlib import each_backend, postgres_option, ratio_line, write_result
from devices_list import insert_devices, median_ms

TARGET_MS = 100.0
TARGET_RATIO = 2.0


def run_backend(name: str, url: str, workdir: Path, n: int) -> list[dict]:
    from fastapi.testclient import TestClient

    from server.admin.service import CLI_PRINCIPAL, AdminService
    from server.admin.tables import Role
    from server.app import create_app
    from server.config import Settings
    from server.onnx_models import make_model

    settings = Settings(
        data_dir=workdir / name, database_url=url, mqtt_enabled=False, rollout_engine=False,
        metadata_refresh_interval_s=3600, health_rollup_interval_s=3600, public_url="http://testserver",
    )  # fmt: skip
    rows = []
    with TestClient(create_app(settings)) as client:
        ctx = client.app.state.ctx
        insert_devices(ctx, n)
        with ctx.db.session_scope() as s:
            token = AdminService(s).create_token("bench", Role.operator, CLI_PRINCIPAL).token
        headers = {"Authorization": f"Bearer {token}"}
        model = make_model(workdir / f"{name}-det.onnx", scale=2.0)
        with model.open("rb") as fh:
            r = client.post(
                "/api/v1/models/det/versions", data={"version": "2.0.0"},
                files={"file": ("m.onnx", fh, "application/octet-stream")}, headers=headers,
            )  # fmt: skip
        assert r.status_code == 201, r.text
        body = {
            "model": "det",
            "version": "2.0.0",
            "stages": [{"percent": 10, "soak_s": 60}, {"percent": 100}],
        }
        r = client.post("/api/v1/rollouts", json=body, headers=headers)
        assert r.status_code == 201, r.text
        rid = r.json()["id"]
        form = client.get("/ui/login").text  # the sign-in form's double-submit token
        csrf = re.search(r'name="csrf" value="([0-9a-f]{64})"', form).group(1)  # type: ignore[union-attr]
        r = client.post("/ui/login", data={"token": token, "csrf": csrf}, follow_redirects=False)
        assert r.status_code == 303, r.text
        middle = f"dev-{n // 2:06d}"  # a device of the fleet whatever its size
        pairs = {
            "overview": ("/ui/", "/api/v1/fleet/summary"),
            "rollout": (f"/ui/rollouts/{rid}", f"/api/v1/rollouts/{rid}"),
            "rollout_live": (f"/ui/rollouts/{rid}/live", f"/api/v1/rollouts/{rid}"),
            "rollout_health": (f"/ui/rollouts/{rid}/health.json", f"/api/v1/rollouts/{rid}/health"),
            "devices": ("/ui/devices?limit=100", "/api/v1/devices?limit=100"),
            # the device page shows the device and its reports: both calls
            "device": (
                f"/ui/devices/{middle}",
                f"/api/v1/devices/{middle}",
                f"/api/v1/devices/{middle}/events?limit=50",
            ),
            "rollouts": ("/ui/rollouts", "/api/v1/rollouts?limit=200"),
        }
        for page, (ui, *api) in pairs.items():

            def get_ui(ui=ui) -> None:
                r = client.get(ui)
                assert r.status_code == 200, r.text

            def get_api(api=api) -> None:
                for url in api:
                    r = client.get(url, headers=headers)
                    assert r.status_code == 200, r.text

            ui_ms, api_ms = median_ms(get_ui, 10), median_ms(get_api, 10)
            rows.append({
                "backend": name, "page": page, "devices": n, "ui_ms": round(ui_ms, 2),
                "api_ms": round(api_ms, 2), "ratio": round(ui_ms / api_ms, 2),
            })  # fmt: skip
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--devices", type=int, default=10_000)
    postgres_option(ap)
    args = ap.parse_args()
    print(f"dashboard pages at {args.devices} devices (median of 10 requests)")
    with tempfile.TemporaryDirectory(prefix="fleet-bench-ui-") as tmp:
        work = Path(tmp)
        results = each_backend(
            args.postgres, work / "ui.db", lambda name, url: run_backend(name, url, work, args.devices)
        )
    target = f"page within {TARGET_MS:.0f} ms and {TARGET_RATIO:g}x of its JSON"
    for r in results:
        verdict = "ok" if r["ui_ms"] <= TARGET_MS and r["ratio"] <= TARGET_RATIO else "OVER"
        line = f"page {r['ui_ms']:.1f} ms ({verdict}), JSON API {r['api_ms']:.1f} ms"
        print(f"  {r['backend']} {r['page']}: {line}")
        print(ratio_line(f"{r['backend']} {r['page']} page / JSON API", r["ratio"], target))
    targets = {"target_ms": TARGET_MS, "target_ratio": TARGET_RATIO}
    path = write_result("dashboard", {**targets, "results": results})
    print(f"  wrote {path}")


if __name__ == "__main__":
    main()
