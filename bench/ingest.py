"""Health ingest rate through the server's real ingest path / raw batched insert (docs/benchmarks.md).

    .venv/bin/python bench/ingest.py [--devices 2000] [--messages 40000] [--postgres URL]

For SQLite, and PostgreSQL when ``--postgres``, FLEET_BENCH_POSTGRES_URL or FLEET_TEST_POSTGRES_URL
gives a server: M ``fleet.health/1`` payloads through a running ``IngestWorker`` against plain
multi-row INSERTs of the same rows. Prints ingest / raw (target >= 0.25), writes
bench/results/ingest.json. Exits 0.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from benchlib import each_backend, postgres_option, ratio_line, write_result

TARGET = ">= 0.25"


def insert_devices(ctx, n: int) -> list[str]:
    import sqlalchemy as sa

    from server.devices.tables import Device

    now = datetime.now(UTC)
    ids = [f"bench-{i:06d}" for i in range(n)]
    rows = [
        {
            "id": d, "status": "online", "hardware": {}, "arch": "x86_64", "cert_serial": f"{i:x}",
            "cert_not_after": now + timedelta(days=365), "token_hash": f"{i:064x}", "created_at": now,
            "serving": {"det": "1.0.0"}, "last_report_seq": 0, "desired_seq": 0,
        }
        for i, d in enumerate(ids)
    ]  # fmt: skip
    with ctx.db.session_scope() as s:
        for i in range(0, n, 2000):
            s.execute(sa.insert(Device.__table__), rows[i : i + 2000])
    return ids


def messages(ids: list[str], m: int) -> list[tuple[str, bytes, dict]]:
    from device_client.protocol import HealthWindow

    now = datetime.now(UTC)
    out = []
    for k in range(m):
        device = ids[k % len(ids)]
        h = HealthWindow.build(  # each device's windows: consecutive 0.1 s periods (no overlap)
            device_id=device, seq=k // len(ids) + 1, at=now + timedelta(seconds=0.1 * (k // len(ids))),
            window_s=0.1, model="det", version="1.0.0", requests=100 + k % 7, errors=k % 3,
            p50_ms=1.5, p95_ms=4.0 + (k % 5), p99_ms=9.0,
        )  # fmt: skip
        row = {
            "device_id": h.device_id, "seq": h.seq, "at": h.at, "window_s": h.window_s, "model": h.model,
            "version": h.version, "mode": h.mode.value, "requests": h.requests, "errors": h.errors,
            "p50_ms": h.p50_ms, "p95_ms": h.p95_ms, "p99_ms": h.p99_ms, "shadow_requests": None,
            "agreement": None, "shadow_p95_ms": None,
        }  # fmt: skip
        out.append((f"fleet/v1/d/{device}/health", h.to_json(), row))
    return out


def run_backend(name: str, url: str, workdir: Path, n_devices: int, n_messages: int) -> dict:
    import sqlalchemy as sa

    from server.config import Settings
    from server.context import ServerContext
    from server.health.tables import HealthSample
    from server.mqtt.handlers import IngestWorker

    settings = Settings(
        data_dir=workdir / name, database_url=url, mqtt_enabled=False, rollout_engine=False,
        metadata_refresh_interval_s=3600,
    )  # fmt: skip
    ctx = ServerContext.open(settings)
    try:
        ids = insert_devices(ctx, n_devices)
        msgs = messages(ids, n_messages)
        table = HealthSample.__table__

        worker = IngestWorker(ctx, ctx.metrics)
        now = datetime.now(UTC)
        t0 = time.perf_counter()
        for topic, payload, _ in msgs:
            worker.submit(topic, payload, now)
        worker.start()
        while not worker.wait_idle(0.05) or not worker.queue.empty():
            pass
        ingest_s = time.perf_counter() - t0
        worker.stop()
        with ctx.db.session_scope() as s:
            stored = s.scalar(sa.select(sa.func.count()).select_from(table))
            s.execute(sa.delete(table))

        rows = [r for _, _, r in msgs]
        t0 = time.perf_counter()
        with ctx.db.engine.connect() as conn:
            for i in range(0, len(rows), 2000):
                with conn.begin():
                    conn.execute(sa.insert(table), rows[i : i + 2000])
        raw_s = time.perf_counter() - t0
    finally:
        ctx.close()
    ingest_rate = n_messages / ingest_s
    raw_rate = n_messages / raw_s
    return {
        "backend": name,
        "devices": n_devices,
        "messages": n_messages,
        "stored": stored,
        "ingest_s": round(ingest_s, 3),
        "ingest_msgs_per_s": round(ingest_rate),
        "raw_s": round(raw_s, 3),
        "raw_rows_per_s": round(raw_rate),
        "ratio": round(ingest_rate / raw_rate, 3),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--devices", type=int, default=2000)
    ap.add_argument("--messages", type=int, default=40000)
    postgres_option(ap)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="fleet-bench-ingest-") as tmp:
        work = Path(tmp)
        results = each_backend(
            args.postgres,
            work / "ingest.db",
            lambda name, url: [run_backend(name, url, work, args.devices, args.messages)],
        )
    print(f"health ingest: {args.messages} windows from {args.devices} devices")
    for r in results:
        print(
            f"  {r['backend']}: ingest {r['ingest_msgs_per_s']} msg/s ({r['stored']} stored), "
            f"raw batched insert {r['raw_rows_per_s']} rows/s"
        )
        print(ratio_line(f"{r['backend']} ingest / raw insert", r["ratio"], TARGET))
    if not args.postgres:
        print("  (PostgreSQL skipped: set FLEET_BENCH_POSTGRES_URL or pass --postgres)")
    path = write_result("ingest", {"target": TARGET, "results": results})
    print(f"  wrote {path}")


if __name__ == "__main__":
    main()
