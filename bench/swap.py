"""Hot-swap benchmark of the device's ModelHost, ratios measured in one run (docs/benchmarks.md).

    .venv/bin/python bench/swap.py [--swaps 20] [--slow-factor 2]

Swaps between two real ONNX models N times under load from 2 client threads and prints: requests
failed or wrong (target 0), p99 in swap windows / steady p99 (<= 1.5), rollback / forward swap
time (<= 0.05), monitored / bare ``session.run`` throughput (>= 0.95). Exits 0 either way.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchlib import write_result  # noqa: E402

from device_client.protocol.bundle import MODEL_MEMBER, VALIDATION_MEMBER, build_bundle, extract_bundle  # noqa: E402
from device_client.runtime import ModelHost  # noqa: E402
from tests.helpers.onnx_models import make_model, reference_output  # noqa: E402

IN_DIM, OUT_DIM = 16, 8


def build_slot(work: Path, version: str, scale: float, slow_factor: int) -> Path:
    src = work / f"src-{version}"
    model = make_model(
        src / MODEL_MEMBER, in_dim=IN_DIM, out_dim=OUT_DIM, scale=scale, slow_factor=slow_factor
    )
    x = np.random.default_rng(0).random((8, IN_DIM), dtype=np.float32)
    np.savez(
        src / VALIDATION_MEMBER,
        **{"inputs/x": x, "outputs/y": reference_output(x, in_dim=IN_DIM, out_dim=OUT_DIM, scale=scale)},
    )
    tar = work / f"clf-{version}.tar"
    build_bundle(
        tar,
        {
            "name": "clf",
            "version": version,
            "release": 1,
            "inputs": [{"name": "x", "dtype": "float32", "shape": ["N", IN_DIM]}],
            "outputs": [{"name": "y", "dtype": "float32", "shape": ["N", OUT_DIM]}],
            "validation": {"rtol": 1e-4, "atol": 1e-4},
        },
        {MODEL_MEMBER: model, VALIDATION_MEMBER: src / VALIDATION_MEMBER},
    )
    slot = work / "slots" / version
    extract_bundle(tar, slot)
    return slot


def p99(values: list[float]) -> float:
    return float(np.percentile(values, 99)) if values else float("nan")


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--swaps", type=int, default=20)
    ap.add_argument("--slow-factor", type=int, default=2, help="model cost: chained 256x256 MatMuls")
    ap.add_argument("--steady-s", type=float, default=3.0)
    ap.add_argument("--load-nice", type=int, default=10, help="nice increment of the loader thread")
    ap.add_argument(
        "--load-idle",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="run the loader thread under SCHED_IDLE (the device default)",
    )
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="fleet-bench-swap-"))
    scales = {"1.0.0": 1.0, "2.0.0": 2.0}
    slots = {v: build_slot(work, v, s, args.slow_factor) for v, s in scales.items()}
    host = ModelHost(
        "clf", intra_op_threads=1, warmup_runs=3, load_nice=args.load_nice, load_idle=args.load_idle
    )
    host.install(slots["1.0.0"])

    # ------------------------------------------------------------ load + swaps
    stop = threading.Event()
    lock = threading.Lock()
    samples: list[tuple[float, float]] = []  # (start, latency_ms)
    failures: list[str] = []

    def client(seed: int) -> None:
        rng = np.random.default_rng(seed)
        xs = [rng.random((1, IN_DIM), dtype=np.float32) for _ in range(64)]
        refs = {
            v: [reference_output(x, in_dim=IN_DIM, out_dim=OUT_DIM, scale=s) for x in xs]
            for v, s in scales.items()
        }
        local: list[tuple[float, float]] = []
        i = 0
        while not stop.is_set():
            k = i % len(xs)
            i += 1
            t0 = time.perf_counter()
            try:
                res = host.infer({"x": xs[k]})
            except Exception as exc:
                failures.append(repr(exc))
                continue
            local.append((t0, (time.perf_counter() - t0) * 1000))
            if not np.allclose(res.outputs["y"], refs[res.version][k], rtol=1e-4, atol=1e-4):
                failures.append(f"answer does not match {res.version}")
        with lock:
            samples.extend(local)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    time.sleep(0.5)  # settle
    steady_from = time.perf_counter()
    time.sleep(args.steady_s)
    steady_to = time.perf_counter()
    windows: list[tuple[float, float]] = []
    flips: list[float] = []
    forward_ms: list[float] = []
    for i in range(args.swaps):
        version = "2.0.0" if i % 2 == 0 else "1.0.0"
        t0 = time.perf_counter()
        model = host.load(slots[version])
        t_flip = time.perf_counter()
        host.swap(model)
        t1 = time.perf_counter()
        forward_ms.append((t1 - t0) * 1000)
        flips.append(t_flip)
        windows.append((t0, t1 + 0.05))
        time.sleep(0.3)  # 50 ms of swap window, then 250 ms of steady state between swaps
    stop.set()
    for t in threads:
        t.join()

    # steady = the pre-swap phase plus the gaps between swap windows, so that background load on a
    # shared machine affects both sides of the ratio alike
    gaps = [(steady_from, steady_to)] + [(windows[i][1], windows[i + 1][0]) for i in range(len(windows) - 1)]
    steady = [lat for (s, lat) in samples if any(a <= s < b for a, b in gaps)]
    in_window = [lat for (s, lat) in samples if any(a <= s < b for a, b in windows)]
    near_flip = [lat for (s, lat) in samples if any(f - 0.05 <= s < f + 0.05 for f in flips)]
    swap_requests = sum(1 for (s, _) in samples if s >= steady_to)

    # ------------------------------------------------------------ rollback vs forward swap
    rollback_ms: list[float] = []
    for i in range(args.swaps):
        host.install(slots["2.0.0" if i % 2 == 0 else "1.0.0"])
        t0 = time.perf_counter()
        host.rollback()
        rollback_ms.append((time.perf_counter() - t0) * 1000)

    # ------------------------------------------------------------ monitored vs bare throughput
    serving = host.serving
    assert serving is not None
    session = serving.session
    x = np.random.default_rng(9).random((1, IN_DIM), dtype=np.float32)
    feed = {"x": x}

    def rate(fn, seconds: float = 0.8) -> float:
        n = 0
        start = time.perf_counter()
        end = start + seconds
        while time.perf_counter() < end:
            for _ in range(10):
                fn()
            n += 10
        return n / (time.perf_counter() - start)

    bare_rates, mon_rates = [], []
    for _ in range(5):
        bare_rates.append(rate(lambda: session.run(None, feed)))
        mon_rates.append(rate(lambda: host.infer(feed)))
    host.close()

    # ------------------------------------------------------------ report
    bare_us = 1e6 / statistics.median(bare_rates)
    s99, w99, f99 = p99(steady), p99(in_window), p99(near_flip)
    lat_ratio = w99 / s99
    rb_ratio = statistics.median(rollback_ms) / statistics.median(forward_ms)
    tp_ratio = statistics.median(mon_rates) / statistics.median(bare_rates)
    print(
        f"fleetota bench/swap.py: {args.swaps} hot-swaps, 2 client threads, model ~{bare_us:.0f} us/run,"
        f" loader {'SCHED_IDLE' if args.load_idle else f'nice +{args.load_nice}'}"
    )
    print(f"  requests during swaps: {swap_requests}, steady: {len(steady)}")
    print(
        f"  failed or wrong requests during hot-swaps   {len(failures):>10d}   target 0       "
        f"{verdict(not failures)}"
    )
    print(
        f"  p99 swap window / steady p99                {lat_ratio:>10.3f}   target <= 1.5  "
        f"{verdict(lat_ratio <= 1.5)}   ({w99:.3f} ms / {s99:.3f} ms)"
    )
    print(f"    (only +-50 ms around the rebind)          {f99 / s99:>10.3f}                  ({f99:.3f} ms)")
    print(
        f"  rollback / forward swap (load+validate+warm){rb_ratio:>10.4f}   target <= 0.05 "
        f"{verdict(rb_ratio <= 0.05)}   ({statistics.median(rollback_ms) * 1000:.1f} us / "
        f"{statistics.median(forward_ms):.1f} ms)"
    )
    print(
        f"  monitored / bare session.run throughput     {tp_ratio:>10.3f}   target >= 0.95 "
        f"{verdict(tp_ratio >= 0.95)}   ({statistics.median(mon_rates):.0f} / "
        f"{statistics.median(bare_rates):.0f} req/s)"
    )
    if failures:
        print("  first failures:", failures[:3])
    path = write_result(
        "swap",
        {
            "swaps": args.swaps, "loader": "SCHED_IDLE" if args.load_idle else f"nice +{args.load_nice}",
            "failed_requests": len(failures), "swap_requests": swap_requests, "steady_requests": len(steady),
            "p99_window_ms": round(w99, 3), "p99_steady_ms": round(s99, 3), "p99_ratio": round(lat_ratio, 3),
            "p99_near_flip_ratio": round(f99 / s99, 3),
            "rollback_ms": round(statistics.median(rollback_ms), 4),
            "forward_ms": round(statistics.median(forward_ms), 2), "rollback_ratio": round(rb_ratio, 5),
            "throughput_ratio": round(tp_ratio, 3),
            "targets": {
                "failed_requests": 0, "p99_ratio": 1.5, "rollback_ratio": 0.05, "throughput_ratio": 0.95
            },
        },
    )  # fmt: skip
    print(f"  wrote {path}")
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
