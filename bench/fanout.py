"""Rollout fan-out to 10,000 simulated devices over real MQTT connections (docs/benchmarks.md).

    .venv/bin/python bench/fanout.py [--devices 10000] [--processes 2] [--postgres URL] [--replicas N]
        [--download-s 5] [--install-s 0.5] [--ingest-processes 1]

Prints the time until every device acknowledged its signed DesiredState (target <= 10 s) and until
every device succeeded, and the server's publish rate / ``mosquitto_pub`` -> ``mosquitto_sub`` on the
same broker. Writes bench/results/fanout.json and fanout.png (devices per phase over time).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from benchlib import RESULTS, fresh_postgres, python_loop_s, ratio_line, write_result

ACKED_NOT = ("pending", "notified")
PHASES = (
    "pending",
    "notified",
    "downloading",
    "verifying",
    "installing",
    "probation",
    "succeeded",
    "failed",
    "rolled_back",
    "timed_out",
)


def phase_counts(ctx, rollout_id: str) -> dict[str, int]:
    import sqlalchemy as sa

    from server.rollouts.tables import Deployment

    with ctx.db.session_scope() as s:
        rows = s.execute(
            sa.select(Deployment.phase, sa.func.count())
            .where(Deployment.rollout_id == rollout_id)
            .group_by(Deployment.phase)
        )
        return {(p.value if hasattr(p, "value") else str(p)): n for p, n in rows}


def mosquitto_baseline(ca, broker_dir: Path, port: int, n: int, size: int) -> float:
    """Messages/s of ``mosquitto_pub -l`` (QoS 1) -> ``mosquitto_sub -C n`` on the same broker. The
    broker gives each client its certificate's CN as client id: the publisher is ``fleet_server``
    (the operator tools' identity), the subscriber the device ``bench-baseline``."""
    from server.mqtt.broker import issue_client_files

    def tls(cert: Path, key: Path) -> list[str]:
        return ["--cafile", str(broker_dir / "ca.crt"), "--cert", str(cert), "--key", str(key),
                "-h", "127.0.0.1", "-p", str(port)]  # fmt: skip

    sub_cert, sub_key = broker_dir / "bench-baseline.crt", broker_dir / "bench-baseline.key"
    issue_client_files(ca, "bench-baseline", sub_cert, sub_key)
    topic = "fleet/v1/d/bench-baseline/desired"
    sub = subprocess.Popen(
        ["mosquitto_sub", *tls(sub_cert, sub_key), "-q", "1", "-t", topic, "-C", str(n), "-i", "bench-sub"],
        stdout=subprocess.DEVNULL,
    )
    time.sleep(1.0)
    line = ("x" * (size - 1) + "\n").encode()
    t0 = time.monotonic()
    pub = subprocess.Popen(
        ["mosquitto_pub", *tls(broker_dir / "fleet_server.crt", broker_dir / "fleet_server.key"),
         "-q", "1", "-t", topic, "-l", "-i", "bench-pub"],
        stdin=subprocess.PIPE,
    )  # fmt: skip
    assert pub.stdin is not None
    pub.stdin.write(line * n)
    pub.stdin.close()
    sub.wait(timeout=300)
    elapsed = time.monotonic() - t0
    pub.wait(timeout=30)
    return n / elapsed


def start_replica(emb, index: int, db_url: str, env_over: dict[str, str]) -> tuple[subprocess.Popen, str]:
    """Server replica ``index`` in its own process (its own GIL): same data dir (keys, image
    repository, broker files), same database and broker, its own HTTP port and MQTT identities
    (``replica-INDEX``, which the broker ACL lists: see ``start_embedded``)."""
    import sys

    import httpx

    from server.mqtt.broker import free_port

    port = free_port()
    env = {
        **os.environ,
        "FLEET_DATA_DIR": str(emb.settings.data_dir),
        "FLEET_DATABASE_URL": db_url,
        "FLEET_PORT": str(port),
        "FLEET_PUBLIC_URL": f"http://127.0.0.1:{port}",
        "FLEET_MQTT_URL": f"mqtts://127.0.0.1:{emb.settings.mqtt_port}",
        "FLEET_MQTT_SHARED_SUBSCRIPTIONS": "true",
        "FLEET_METADATA_REFRESH_INTERVAL_S": "3600",
        "FLEET_LOG_LEVEL": "WARNING",
        "FLEET_MQTT_SERVER_NAME": f"replica-{index}",
        **env_over,
    }
    log = open(emb.settings.data_dir / f"replica-{index}.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "-c", "from server.runner import run_server; run_server()"],
        env=env, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise SystemExit(f"replica {index} did not start (see {log.name})")


def publish_rate(ctx, since) -> float | None:
    """DesiredStates published per second by all replicas (the outbox rows' published_at)."""
    import sqlalchemy as sa

    from server.rollouts.tables import OutboxMessage

    with ctx.db.session_scope() as s:
        first, last, count = s.execute(
            sa.select(
                sa.func.min(OutboxMessage.published_at),
                sa.func.max(OutboxMessage.published_at),
                sa.func.count(OutboxMessage.published_at),
            ).where(OutboxMessage.created_at >= since)
        ).one()
    if not count or first is None or last is None:
        return None
    return count / max((last - first).total_seconds(), 0.1)


def plot(timeline: list[tuple[float, dict[str, int]]], path: Path, n: int, acked_s: float | None) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("  (matplotlib not installed: no plot)")
        return False
    fig, ax = plt.subplots(figsize=(9, 5))
    ts = [t for t, _ in timeline]
    for phase in PHASES:
        ys = [c.get(phase, 0) for _, c in timeline]
        if any(ys):
            ax.plot(ts, ys, label=phase)
    acked = [sum(v for k, v in c.items() if k not in ACKED_NOT) for _, c in timeline]
    ax.plot(ts, acked, "k--", label="acknowledged (any report)")
    if acked_s is not None:
        ax.axvline(acked_s, color="grey", linestyle=":")
    ax.axvline(10.0, color="red", linestyle=":", label="target 10 s")
    ax.set_xlabel("seconds since rollout start")
    ax.set_ylabel("devices")
    ax.set_title(f"Rollout fan-out to {n:,} simulated devices (real MQTT, mTLS)")
    ax.legend(loc="center right", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--devices", type=int, default=10_000)
    ap.add_argument("--processes", type=int, default=0)
    ap.add_argument("--postgres", default=os.environ.get("FLEET_BENCH_POSTGRES_URL", ""))
    ap.add_argument("--health-window", type=float, default=60.0)
    ap.add_argument("--timeout", type=float, default=120.0)
    ap.add_argument(
        "--download-s", type=float, default=5.0,
        help="simulated bundle download time (0: every device sends all its reports at once)",
    )  # fmt: skip
    ap.add_argument("--install-s", type=float, default=0.5, help="simulated install time")
    ap.add_argument(
        "--ingest-processes", type=int, default=1,
        help="server ingest worker processes (FLEET_INGEST_PROCESSES; 0: a thread of the server process)",
    )  # fmt: skip
    ap.add_argument("--keep", action="store_true", help="keep the work directory and PostgreSQL database")
    ap.add_argument(
        "--replicas", type=int, default=1,
        help="server replicas (processes) sharing the device traffic; more than one needs --postgres",
    )  # fmt: skip
    args = ap.parse_args()
    n = args.devices
    if args.replicas > 1 and not args.postgres:
        raise SystemExit("--replicas > 1 needs --postgres (or FLEET_BENCH_POSTGRES_URL): one SQLite file")

    from server.client import FleetClient
    from server.gctune import tune_gc
    from server.onnx_models import make_model
    from server.sim.embedded import start_embedded
    from server.sim.fleet import SimOptions, Simulator
    from server.sim.profiles import Profile
    from server.sim.provision import enroll_fleet

    work = Path(tempfile.mkdtemp(prefix="fleet-bench-fanout-"))
    db_url, drop_db = fresh_postgres(args.postgres) if args.postgres else ("", None)
    print(
        f"fan-out benchmark: {n} devices, {'PostgreSQL' if db_url else 'SQLite'}, "
        f"{args.replicas} server replica(s), workdir {work}"
    )
    print(f"  this machine: {python_loop_s():.2f} s per 10**7 pure-Python loop iterations (see benchlib)")
    t = time.monotonic()
    tuning = {"rollout_tick_s": 0.25, "ingest_batch_delay_s": 0.05, "ingest_processes": args.ingest_processes}
    shared = {"mqtt_shared_subscriptions": True} if args.replicas > 1 or args.ingest_processes > 1 else {}
    replica_names = [f"replica-{i}" for i in range(1, args.replicas)]
    emb = start_embedded(work, n, database_url=db_url, replica_names=replica_names, **tuning, **shared)
    sim = None
    replicas: list[subprocess.Popen] = []
    result: dict = {
        "devices": n, "database": "postgresql" if db_url else "sqlite", "replicas": args.replicas,
    }  # fmt: skip
    try:
        env_tuning = {f"FLEET_{k.upper()}": str(v) for k, v in tuning.items()}
        for i in range(1, args.replicas):
            proc, url = start_replica(emb, i, db_url, env_tuning)
            replicas.append(proc)
            print(f"  replica {i} up at {url}")
        client = FleetClient(emb.url, emb.admin_token)
        for v, seed in (("1.0.0", 1), ("2.0.0", 2)):
            client.push_model("det", v, make_model(work / f"det-{v}.onnx", seed=seed))
        fleet = enroll_fleet(emb.url, emb.admin_token, n, work / "sim", concurrency=16)
        tune_gc()  # this process also holds the fleet's identities: freeze them with the server's state
        result["enroll_s"] = round(time.monotonic() - t, 1)
        print(f"  enrolled {n} devices in {result['enroll_s']} s")
        t = time.monotonic()
        opts = SimOptions(
            processes=args.processes,
            serving={"det": "1.0.0"},
            health_window_s=args.health_window,
            default_profile=Profile(download_s=args.download_s, install_s=args.install_s, probation_s=0.0),
        )
        sim = Simulator(fleet, opts).start()
        connected = sim.wait_connected(600)
        result["connect_s"] = round(time.monotonic() - t, 1)
        print(
            f"  {sim.connected} devices connected in {result['connect_s']} s over {sim.n_processes} processes"
        )
        if not connected:
            raise SystemExit("not every device connected")
        import sqlalchemy as sa

        from server.devices.tables import Device, DeviceStatus

        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            with emb.ctx.db.session_scope() as s:
                online = s.scalar(sa.select(sa.func.count()).where(Device.status == DeviceStatus.online))
            if online >= n:
                break
            time.sleep(0.2)
        print(f"  server sees {online} devices online")
        time.sleep(2.0)

        from server.db import utcnow

        created_since = utcnow()
        t0 = time.monotonic()
        rollout = client.create_rollout(
            {
                "model": "det",
                "version": "2.0.0",
                "stages": [{"percent": 100, "soak_s": 0}],
                "max_concurrent_downloads": n,
                "device_timeout_s": 600,
                "probation": {"seconds": 0},
                "gates": {"max_p95_ratio": None, "min_agreement": None, "max_error_rate": None},
            }
        )
        t_created = time.monotonic() - t0
        timeline: list[tuple[float, dict[str, int]]] = []
        acked_s = succeeded_s = None
        while time.monotonic() - t0 < args.timeout:
            now = time.monotonic() - t0
            counts = phase_counts(emb.ctx, rollout["id"])
            timeline.append((now, counts))
            acked = sum(v for k, v in counts.items() if k not in ACKED_NOT)
            if acked >= n and acked_s is None:
                acked_s = now
            if counts.get("succeeded", 0) >= n and succeeded_s is None:
                succeeded_s = now
            if acked_s is not None and succeeded_s is not None:
                break
            time.sleep(0.1)
        state = client.get_rollout(rollout["id"])
        stats = sim.stats()
        print(f"  rollout created (API) in {t_created:.2f} s; status now {state['status']}")
        pub_rate = publish_rate(emb.ctx, created_since)
        print(
            f"  desired states received by devices: {stats.get('desired_received', 0)}, "
            f"verified and accepted: {stats.get('desired_accepted', 0)}, "
            f"rejected: {stats.get('desired_rejected', 0)}"
        )
        print(
            f"  all {n} acknowledged after: {acked_s if acked_s is None else round(acked_s, 2)} s"
            f"   (target: <= 10 s)"
        )
        print(
            f"  all {n} succeeded after:    {succeeded_s if succeeded_s is None else round(succeeded_s, 2)} s"
        )
        base_rate = mosquitto_baseline(emb.ctx.ca, emb.settings.broker_dir, emb.settings.mqtt_port, n, 1300)
        print(f"  server publish rate {pub_rate or 0:.0f} msg/s, mosquitto_pub->sub {base_rate:.0f} msg/s")
        print(
            ratio_line(
                "server publish rate / mosquitto_pub->mosquitto_sub",
                pub_rate / base_rate if pub_rate else None,
                ">= 0.5",
            )
        )
        png = RESULTS / "fanout.png"
        RESULTS.mkdir(parents=True, exist_ok=True)
        if plot(timeline, png, n, acked_s):
            print(f"  plot: {png}")
        result.update(
            {
                "processes": sim.n_processes,
                "acked_s": acked_s,
                "succeeded_s": succeeded_s,
                "target_acked_s": 10.0,
                "server_publish_rate": pub_rate,
                "mosquitto_pub_sub_rate": base_rate,
                "publish_ratio": (pub_rate / base_rate) if pub_rate else None,
                "sim_stats": stats,
                "timeline": [(round(tt, 2), c) for tt, c in timeline],
            }
        )
        print(f"  results: {write_result('fanout', result)}")
    finally:
        if sim is not None:
            sim.stop()
        for proc in replicas:
            proc.terminate()
        for proc in replicas:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
        emb.stop()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)  # 10,000 identities and a database
            if drop_db is not None:
                drop_db()


if __name__ == "__main__":
    main()
