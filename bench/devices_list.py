"""Device list API latency at 100,000 devices / the bare SQL query (docs/benchmarks.md).

    .venv/bin/python bench/devices_list.py [--devices 100000] [--postgres URL]

Times ``GET /api/v1/devices`` through the real app against the bare keyset query for four shapes
(first page, deep page, tag filter, status filter; 100 devices each), SQLite and optionally
PostgreSQL. No ratio target: both latencies are printed and written to
bench/results/devices_list.json. Exits 0.
"""

from __future__ import annotations

import argparse
import re
import statistics
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from benchlib import each_backend, postgres_option, ratio_line, write_result

REPEAT = 30
TARGET = "none set; API overhead per page (the query itself must stay index-bound)"


def insert_devices(ctx, n: int) -> None:
    import sqlalchemy as sa

    from server.devices.tables import Device, DeviceTag

    now = datetime.now(UTC)
    with ctx.db.session_scope() as s:
        for start in range(0, n, 5000):
            chunk = range(start, min(n, start + 5000))
            s.execute(sa.insert(Device.__table__), [
                {"id": f"dev-{i:06d}", "status": "offline" if i % 10 == 3 else "online",
                 "hardware": {"ram_mb": 2048, "execution_providers": ["CPUExecutionProvider"]},
                 "arch": "aarch64" if i % 2 else "x86_64", "cert_serial": f"{i:x}",
                 "cert_not_after": now + timedelta(days=365), "token_hash": f"{i:064x}", "created_at": now,
                 "last_seen_at": now, "serving": {"det": "1.0.0"}, "last_report_seq": 0, "desired_seq": 0}
                for i in chunk
            ])  # fmt: skip
            s.execute(sa.insert(DeviceTag.__table__), [
                {"device_id": f"dev-{i:06d}", "key": "site", "value": f"site-{i % 50}"} for i in chunk
            ])  # fmt: skip


def bare_sql(shape: str, after: str | None) -> tuple[str, dict]:
    """The SQL one page needs, as the repository issues it (devices page, then their tags)."""
    where, params = [], {}
    if after:
        where.append("d.id > :after")
        params["after"] = after
    if shape == "tag":
        where.append(
            "EXISTS (SELECT 1 FROM device_tags t WHERE t.device_id = d.id AND t.key = :k AND t.value = :v)"
        )
        params.update(k="site", v="site-7")
    if shape == "status":
        where.append("d.status = :status")
        params["status"] = "offline"
    sql = "SELECT d.* FROM devices d" + (" WHERE " + " AND ".join(where) if where else "")
    sql += " ORDER BY d.id LIMIT 100"
    return sql, params


def median_ms(fn, repeat: int = REPEAT) -> float:
    fn()  # warm up (statement caches, pages in memory)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000


def run_backend(name: str, url: str, workdir: Path, n: int) -> list[dict]:
    from fastapi.testclient import TestClient

    from server.admin.service import CLI_PRINCIPAL, AdminService
    from server.admin.tables import Role
    from server.app import create_app
    from server.config import Settings
    from server.devices.service import encode_cursor

    settings = Settings(
        data_dir=workdir / name, database_url=url, mqtt_enabled=False, rollout_engine=False,
        metadata_refresh_interval_s=3600, health_rollup_interval_s=3600,
    )  # fmt: skip
    rows = []
    with TestClient(create_app(settings)) as client:
        ctx = client.app.state.ctx
        t0 = time.perf_counter()
        insert_devices(ctx, n)
        print(f"  {name}: {n} devices inserted in {time.perf_counter() - t0:.1f} s")
        with ctx.db.session_scope() as s:
            token = AdminService(s).create_token("bench", Role.viewer, CLI_PRINCIPAL).token
        headers = {"Authorization": f"Bearer {token}"}
        deep = f"dev-{int(n * 0.9):06d}"
        shapes = {
            "first_page": ({}, None),
            "deep_page": ({"cursor": encode_cursor(deep)}, deep),
            "tag_filter": ({"tag": "site:site-7"}, None),
            "status_filter": ({"status": "offline"}, None),
        }
        raw = ctx.db.engine.raw_connection()
        try:
            for shape, (params, after) in shapes.items():

                def api(params=params) -> None:
                    r = client.get("/api/v1/devices", params={**params, "limit": 100}, headers=headers)
                    assert r.status_code == 200, r.text
                    assert len(r.json()["items"]) == 100

                sql, binds = bare_sql(shape.split("_")[0], after)
                if name != "sqlite":  # sqlite3 takes :name, psycopg %(name)s
                    sql = re.sub(r":(\w+)", r"%(\1)s", sql)
                mark = "?" if name == "sqlite" else "%s"

                def bare(sql=sql, binds=binds, mark=mark) -> None:
                    cur = raw.cursor()
                    cur.execute(sql, binds)
                    ids = [r[0] for r in cur.fetchall()]
                    marks = ",".join([mark] * len(ids))
                    tags = f"SELECT device_id, key, value FROM device_tags WHERE device_id IN ({marks})"
                    cur.execute(tags, ids)
                    cur.fetchall()
                    cur.close()

                api_ms, bare_ms = median_ms(api), median_ms(bare)
                rows.append({
                    "backend": name, "shape": shape, "devices": n, "api_ms": round(api_ms, 3),
                    "bare_sql_ms": round(bare_ms, 3), "ratio": round(api_ms / bare_ms, 2),
                })  # fmt: skip
        finally:
            raw.close()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--devices", type=int, default=100_000)
    postgres_option(ap)
    args = ap.parse_args()
    print(f"device list at {args.devices} devices (median of {REPEAT} requests of 100 devices)")
    with tempfile.TemporaryDirectory(prefix="fleet-bench-list-") as tmp:
        work = Path(tmp)
        results = each_backend(
            args.postgres, work / "list.db", lambda name, url: run_backend(name, url, work, args.devices)
        )
    for r in results:
        print(f"  {r['backend']} {r['shape']}: API {r['api_ms']:.2f} ms, bare SQL {r['bare_sql_ms']:.2f} ms")
        print(ratio_line(f"{r['backend']} {r['shape']} API / bare SQL", r["ratio"], TARGET))
    path = write_result("devices_list", {"target": TARGET, "results": results})
    print(f"  wrote {path}")


if __name__ == "__main__":
    main()
