"""Hybrid edge/cloud inference on a real model pair, ratios measured in one run (docs/benchmarks.md).

    .venv/bin/python bench/hybrid.py [--thresholds 0.6,0.7,0.8,0.9] [--timeout-ms 250] [--sample 0]

Trains the digits pair (server/digits.py), pushes both models to a real server, serves the cloud
model with a real `fleet cloud serve` process and drives the device's routing library over the
held-out digits: edge-only, cloud-only and hybrid (prefer_edge) at each threshold, then hybrid
with the cloud process hung (SIGSTOP) and killed (SIGKILL) mid-run. Latency is measured twice:
in the library (the router's own cost) and at the device's local API (what a caller waits for,
`POST /v1/infer` over a kept-alive connection, edge-only being the API without a routing policy).
Writes bench/results/hybrid.json. Exits 0 either way.
"""

from __future__ import annotations

import argparse
import http.client
import io
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
from benchlib import ROOT, write_result

from device_client.api import NPY_TYPE, InferenceServer
from device_client.protocol.bundle import MODEL_MEMBER, VALIDATION_MEMBER, build_bundle, extract_bundle
from device_client.protocol.routing import (
    Budget,
    CacheSpec,
    CloudSpec,
    ConfidenceSpec,
    RoutingMode,
    RoutingPolicy,
)
from device_client.routing import RoutingEnvironment, RoutingTable, build_router, host_edge
from device_client.runtime import ModelHost
from server.config import Settings
from server.digits import INPUT, OUTPUT, PIXELS, build_digits_pair
from server.mqtt.broker import free_port
from tests.helpers.cloud import Fleet, start_fleet

EDGE, CLOUD = "digits-edge", "digits-cloud"
ACCURACY_TARGET, ESCALATION_TARGET, P50_TARGET = 0.99, 0.30, 1.2


@dataclass
class Run:
    """What one pass of a router over the held-out digits measured."""

    label: str
    latencies_ms: list[float] = field(default_factory=list)
    #: requests the edge answered without asking the cloud (edge_only, confident)
    local_ms: list[float] = field(default_factory=list)
    correct: int = 0
    escalated: int = 0
    failed: int = 0
    reasons: Counter[str] = field(default_factory=Counter)

    @property
    def n(self) -> int:
        return len(self.latencies_ms) + self.failed

    @property
    def accuracy(self) -> float:
        return self.correct / max(self.n, 1)

    def pct(self, q: float, local: bool = False) -> float:
        values = self.local_ms if local else self.latencies_ms
        return float(np.percentile(values, q)) if values else float("nan")

    def add(self, other: Run) -> None:
        self.latencies_ms += other.latencies_ms
        self.local_ms += other.local_ms
        self.correct += other.correct
        self.escalated += other.escalated
        self.failed += other.failed
        self.reasons.update(other.reasons)


def edge_host(work: Path, edge_onnx: Path, x_val: np.ndarray) -> ModelHost:
    """A ModelHost serving the edge model from a bundle, as the device serves it."""
    src = work / "edge-src"
    src.mkdir(parents=True)
    shutil.copy(edge_onnx, src / MODEL_MEMBER)
    sess = ort.InferenceSession(str(edge_onnx), providers=["CPUExecutionProvider"])
    ref = sess.run(None, {INPUT: x_val[:8]})[0]
    np.savez(src / VALIDATION_MEMBER, **{f"inputs/{INPUT}": x_val[:8], f"outputs/{OUTPUT}": ref})
    tar = work / "edge.tar"
    build_bundle(
        tar,
        {
            "name": EDGE,
            "version": "1.0.0",
            "release": 1,
            "inputs": [{"name": INPUT, "dtype": "float32", "shape": ["N", PIXELS]}],
            "outputs": [{"name": OUTPUT, "dtype": "float32", "shape": ["N", 10]}],
            "validation": {"rtol": 1e-4, "atol": 1e-5},
        },
        {MODEL_MEMBER: src / MODEL_MEMBER, VALIDATION_MEMBER: src / VALIDATION_MEMBER},
    )
    slot = work / "slots" / "1.0.0"
    extract_bundle(tar, slot)
    host = ModelHost(EDGE, intra_op_threads=1, warmup_runs=3)
    host.install(slot)
    return host


def start_cloud(fleet: Fleet, log: Path) -> tuple[subprocess.Popen[bytes], str]:
    """`fleet cloud serve` in a process of its own, serving the cloud model from the repository."""
    port = free_port()
    s = fleet.settings
    env = {
        **os.environ,
        "FLEET_DATA_DIR": str(s.data_dir),
        "FLEET_DATABASE_URL": s.database_url,
        "FLEET_CLOUD_SERVER_URL": s.public_url,
        "FLEET_CLOUD_TOKEN": fleet.cloud_token(),
        "FLEET_CLOUD_RATE_PER_S": "0",  # one device asking as fast as it can: no per-device limit
        "FLEET_CLOUD_INTRA_OP_THREADS": "1",
    }
    cmd = [sys.executable, "-m", "server.cli", "cloud", "serve", "--port", str(port), "--models", CLOUD]
    proc = subprocess.Popen(cmd, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT, cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"fleet cloud serve exited: {log.read_text()[-2000:]}")
        try:
            if httpx.get(f"{url}/v2/health/ready", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise SystemExit("fleet cloud serve did not become ready")


def policy(mode: RoutingMode, threshold: float | None, timeout_ms: int) -> RoutingPolicy:
    conf = None if threshold is None else ConfidenceSpec(output=OUTPUT, threshold=threshold)
    cloud = None if mode is RoutingMode.edge_only else CloudSpec(model=CLOUD, timeout_ms=timeout_ms)
    return RoutingPolicy(
        mode=mode,
        confidence=conf,
        cloud=cloud,
        budget=Budget(per_minute=60_000, burst=10_000),  # the budget is not what is measured
        cache=CacheSpec(max_bytes=0),  # no cached answers: every escalation asks the cloud
    )


def drive(label: str, router, xs: np.ndarray, ys: np.ndarray, on_request=None) -> Run:
    """Answer every digit once, one request at a time, as a device's caller would."""
    run = Run(label)
    for i in range(len(xs)):
        if on_request is not None:
            on_request(i)
        t0 = time.perf_counter()
        try:
            ans = router.answer({INPUT: xs[i : i + 1]})
        except Exception as exc:
            run.failed += 1
            run.reasons[f"error:{type(exc).__name__}"] += 1
            continue
        ms = (time.perf_counter() - t0) * 1000
        run.latencies_ms.append(ms)
        if ans.reason in ("edge_only", "confident"):
            run.local_ms.append(ms)
        run.correct += int(np.argmax(ans.outputs[OUTPUT][0]) == ys[i])
        run.escalated += int(ans.reason in ("escalated", "cloud_first") or ans.fallback)
        run.reasons[ans.reason] += 1
    return run


def ask_api(run: Run, conn: http.client.HTTPConnection, body: bytes, label: int) -> None:
    """One request through the local API (npy in, the first output's npy back), into ``run``."""
    t0 = time.perf_counter()
    conn.request("POST", "/v1/infer", body, {"Content-Type": NPY_TYPE})
    resp = conn.getresponse()
    data = resp.read()
    ms = (time.perf_counter() - t0) * 1000
    if resp.status != 200:
        run.failed += 1
        run.reasons[f"http:{resp.status}"] += 1
        return
    run.latencies_ms.append(ms)
    who = resp.getheader("X-Fleet-Answered-By", "")
    if who == "edge":
        run.local_ms.append(ms)
    run.escalated += int(who != "edge")
    run.correct += int(np.argmax(np.load(io.BytesIO(data))[0]) == label)
    run.reasons[who] += 1


def api_runs(
    host: ModelHost, env: RoutingEnvironment, hybrid: RoutingPolicy, xs: np.ndarray, ys: np.ndarray, n: int
) -> dict[str, Run]:
    """Edge-only (the API without a routing policy) and hybrid at the local API, each digit asked
    of both in turn, so that the machine's load at any moment weighs on both alike."""
    plain = InferenceServer({EDGE: host}, port=0)
    routed = InferenceServer({EDGE: host}, port=0)
    table = RoutingTable(env, {EDGE: host})
    table.sync({EDGE: hybrid.model_dump(mode="json")})
    routed.routing = table
    servers = {"edge-only": plain, "hybrid": routed}
    conns: dict[str, http.client.HTTPConnection] = {}
    bodies = []
    for i in range(len(xs)):
        buf = io.BytesIO()
        np.save(buf, xs[i : i + 1], allow_pickle=False)
        bodies.append(buf.getvalue())
    try:
        for label, server in servers.items():
            server.start()
            conns[label] = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        totals = {label: Run(label) for label in servers}
        warm = {label: Run("warm-up") for label in servers}
        for rnd in range(n + 1):  # the first pass warms connections, sessions and caches
            for i, body in enumerate(bodies):
                for label, conn in conns.items():
                    ask_api((warm if rnd == 0 else totals)[label], conn, body, int(ys[i]))
        return totals
    finally:
        for conn in conns.values():
            conn.close()
        for server in servers.values():
            server.stop()
        table.close()


def recommend(hybrid: dict[float, Run], cloud: Run) -> float:
    """The threshold escalating least among those meeting the accuracy target within the escalation
    cap; else the most accurate within the cap; else the most accurate."""
    ok = [t for t, r in hybrid.items() if r.accuracy >= ACCURACY_TARGET * cloud.accuracy]
    capped = [t for t, r in hybrid.items() if r.escalated / r.n <= ESCALATION_TARGET]
    both = [t for t in ok if t in capped]
    if both:
        return min(both, key=lambda t: hybrid[t].escalated)
    return max(capped or hybrid, key=lambda t: hybrid[t].accuracy)


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--thresholds", default="0.6,0.7,0.8,0.9", help="max_prob thresholds of the hybrid")
    ap.add_argument("--timeout-ms", type=int, default=250, help="the policy's cloud timeout")
    ap.add_argument("--rounds", type=int, default=3, help="passes over the held-out split per mode")
    ap.add_argument("--sample", type=int, default=0, help="use only the first N held-out digits (0: all)")
    ap.add_argument("--no-write", action="store_true", help="print only (no bench/results/hybrid.json)")
    args = ap.parse_args()
    thresholds = [float(t) for t in args.thresholds.split(",")]

    work = Path(tempfile.mkdtemp(prefix="fleet-bench-hybrid-"))
    t_build = time.perf_counter()
    pair = build_digits_pair(work / "models")
    build_s = time.perf_counter() - t_build
    xs, ys = pair.x_val, pair.y_val
    if args.sample:
        xs, ys = xs[: args.sample], ys[: args.sample]

    settings = Settings(
        data_dir=work / "server",
        database_url=f"sqlite:///{work / 'fleet.db'}",
        public_url="http://127.0.0.1",
        mqtt_enabled=False,
        rollout_engine=False,
        gc_tuning=False,
    )
    host = edge_host(work, pair.edge, xs)
    fleet = start_fleet(settings)
    cloud_proc: subprocess.Popen[bytes] | None = None
    routers = []
    try:
        fleet.push(EDGE, "1.0.0", pair.edge)
        fleet.push(CLOUD, "1.0.0", pair.cloud)
        device = fleet.enroll("bench-hybrid-1")
        cloud_proc, url = start_cloud(fleet, work / "cloud.log")
        env = RoutingEnvironment(
            data_dir=work / "device", fleet_url=url, device_token=device.token, insecure_http=True
        )
        edge_fn = host_edge(host)

        def router(mode: RoutingMode, threshold: float | None = None):
            r = build_router(policy(mode, threshold, args.timeout_ms), env, edge_fn, model=EDGE)
            routers.append(r)
            return r

        modes = {
            "edge-only": router(RoutingMode.edge_only),
            "cloud-only": router(RoutingMode.cloud_only),
            **{f"hybrid@{t:g}": router(RoutingMode.prefer_edge, t) for t in thresholds},
        }
        for r in modes.values():  # warm connections and sessions
            drive("warm-up", r, xs[:20], ys[:20])
        totals = {label: Run(label) for label in modes}
        for _ in range(args.rounds):  # interleaved, so machine noise hits every mode alike
            for label, r in modes.items():
                totals[label].add(drive(label, r, xs, ys))
        edge, cloud = totals["edge-only"], totals["cloud-only"]
        hybrid = {t: totals[f"hybrid@{t:g}"] for t in thresholds}
        best = recommend(hybrid, cloud)
        at_api = api_runs(
            host, env, policy(RoutingMode.prefer_edge, best, args.timeout_ms), xs, ys, args.rounds
        )

        # ---------------------------------------------------------------- cloud hung, then killed
        kill_at = len(xs) // 3

        def signal_at(sig: signal.Signals):
            def hook(i: int) -> None:
                if i == kill_at and cloud_proc is not None:
                    cloud_proc.send_signal(sig)

            return hook

        # SIGSTOP: connections hang until the policy's timeout (the slow way for a cloud to fail)
        hung_router = router(RoutingMode.prefer_edge, best)
        drive("warm-up", hung_router, xs[:20], ys[:20])
        hung = drive("cloud-hung", hung_router, xs, ys, on_request=signal_at(signal.SIGSTOP))
        cloud_proc.send_signal(signal.SIGCONT)
        down_router = router(RoutingMode.prefer_edge, best)
        drive("warm-up", down_router, xs[:20], ys[:20])
        down = drive("cloud-down", down_router, xs, ys, on_request=signal_at(signal.SIGKILL))
        after_kill = Run("after-kill", down.latencies_ms[kill_at:])
    finally:
        for r in routers:
            r.close()
        host.close()
        if cloud_proc is not None and cloud_proc.poll() is None:
            cloud_proc.kill()
            cloud_proc.wait()
        fleet.close()

    # ---------------------------------------------------------------- report
    h = hybrid[best]
    acc_ratio = h.accuracy / cloud.accuracy
    share = h.escalated / h.n
    p50_ratio = h.pct(50) / edge.pct(50)
    api_edge, api_hybrid = at_api["edge-only"], at_api["hybrid"]
    api_p50_ratio = api_hybrid.pct(50) / api_edge.pct(50)
    down_p99 = down.pct(99)
    down_limit = edge.pct(99) + args.timeout_ms
    print(
        f"fleetota bench/hybrid.py: digits pair (built in {build_s:.1f} s), {len(xs)} held-out digits"
        f" x {args.rounds} rounds per mode, timeout {args.timeout_ms} ms"
    )
    head = f"{'mode':<14}{'accuracy':>9}{'escalated':>11}{'p50 ms':>9}{'p99 ms':>9}{'edge-answered p50':>19}"
    print(f"  {head}")
    for label, r in totals.items():
        print(
            f"  {label:<14}{r.accuracy:>9.4f}{r.escalated / r.n:>11.3f}{r.pct(50):>9.3f}{r.pct(99):>9.3f}"
            f"{r.pct(50, local=True):>19.3f}"
        )
    print(f"  recommended threshold: {best:g} (max_prob of the edge's {OUTPUT})")
    ok_acc, ok_share = acc_ratio >= ACCURACY_TARGET, share <= ESCALATION_TARGET
    print(
        f"  hybrid / cloud-only accuracy  {acc_ratio:>8.4f}   target >= {ACCURACY_TARGET}   {verdict(ok_acc)}"
    )
    print(
        f"  escalated share               {share:>8.3f}   target <= {ESCALATION_TARGET}   {verdict(ok_share)}"
    )
    print(
        f"  hybrid / edge-only p50        {api_p50_ratio:>8.3f}   target <= {P50_TARGET}    "
        f"{verdict(api_p50_ratio <= P50_TARGET)}   at the local API ({api_hybrid.pct(50):.3f} / "
        f"{api_edge.pct(50):.3f} ms; edge answers {api_hybrid.pct(50, local=True):.3f} ms; "
        f"hybrid accuracy {api_hybrid.accuracy:.4f}, escalated {api_hybrid.escalated / api_hybrid.n:.3f})"
    )
    print(
        f"    in the library              {p50_ratio:>8.3f}   ({h.pct(50):.3f} / {edge.pct(50):.3f} ms: "
        f"routing adds {(h.pct(50) - edge.pct(50)) * 1000:.0f} us to a {edge.pct(50) * 1000:.0f} us model)"
    )
    print(
        f"  cloud killed after {kill_at} of {down.n} requests: failed {down.failed} (target 0) "
        f"{verdict(down.failed == 0)}; p99 {down_p99:.3f} ms (after the kill {after_kill.pct(99):.3f} ms),"
        f" target <= edge p99 + timeout = {down_limit:.3f} ms {verdict(down_p99 <= down_limit)}"
    )
    print(f"    answers of the cloud-down run: {dict(down.reasons)}")
    print(
        f"  cloud hung (SIGSTOP) after {kill_at} of {hung.n} requests: failed {hung.failed} (target 0) "
        f"{verdict(hung.failed == 0)}; p99 {hung.pct(99):.3f} ms, max {max(hung.latencies_ms):.3f} ms,"
        f" target <= {down_limit:.3f} ms {verdict(hung.pct(99) <= down_limit)}"
    )
    print(f"    answers of the cloud-hung run: {dict(hung.reasons)}")

    def row(r: Run) -> dict[str, float | int]:
        return {
            "accuracy": round(r.accuracy, 4),
            "escalated_share": round(r.escalated / max(r.n, 1), 4),
            "p50_ms": round(r.pct(50), 3),
            "p99_ms": round(r.pct(99), 3),
            "edge_answered_p50_ms": round(r.pct(50, local=True), 3),
            "requests": r.n,
        }

    if args.no_write:
        shutil.rmtree(work, ignore_errors=True)
        return 0
    path = write_result(
        "hybrid",
        {
            "dataset": "sklearn digits, 40 % held out", "held_out": len(xs), "rounds": args.rounds,
            "build_s": round(build_s, 1), "threshold": best, "timeout_ms": args.timeout_ms,
            "accuracy_ratio": round(acc_ratio, 4), "escalated_share": round(share, 4),
            "p50_ratio": round(api_p50_ratio, 3),
            "api_edge_p50_ms": round(api_edge.pct(50), 3), "api_hybrid_p50_ms": round(api_hybrid.pct(50), 3),
            "api_hybrid_edge_answered_p50_ms": round(api_hybrid.pct(50, local=True), 3),
            "library_p50_ratio": round(p50_ratio, 3),
            "library_overhead_p50_us": round((h.pct(50) - edge.pct(50)) * 1000, 1),
            "edge_p50_ms": round(edge.pct(50), 3), "edge_p99_ms": round(edge.pct(99), 3),
            "cloud_down_failed": down.failed, "cloud_down_p99_ms": round(down_p99, 3),
            "cloud_down_after_kill_p99_ms": round(after_kill.pct(99), 3),
            "cloud_down_reasons": dict(down.reasons),
            "cloud_hung_failed": hung.failed, "cloud_hung_p99_ms": round(hung.pct(99), 3),
            "cloud_hung_max_ms": round(max(hung.latencies_ms), 3),
            "cloud_hung_reasons": dict(hung.reasons),
            "modes": {label: row(r) for label, r in totals.items()},
            "targets": {
                "accuracy_ratio": ACCURACY_TARGET, "escalated_share": ESCALATION_TARGET,
                "p50_ratio": P50_TARGET, "cloud_down_failed": 0,
                "cloud_down_p99_ms": "edge_p99_ms + timeout_ms",
            },
        },
    )  # fmt: skip
    print(f"  wrote {path}")
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
