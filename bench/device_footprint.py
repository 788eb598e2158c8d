"""The device daemon's footprint, measured on real processes, against a stored baseline.

    .venv/bin/python bench/device_footprint.py [--idle-s 20] [--starts 5] [--skip-install-size]
        [--update-baseline] [--baseline PATH] [--no-write]

Measures: the size of a fresh venv's site-packages with ``pip install .[device]``; the resident
memory (VmRSS, and PSS from smaps_rollup) of a real ``fleet device run`` daemon idle with no
model, with a small MLP, and with the cloud digits model (v2) serving and v1 kept warm; its CPU
seconds per hour idle (heartbeats, health windows); and its start-up time from process start to
``READY=1`` on a ``$NOTIFY_SOCKET`` bound here (median of ``--starts``). Writes
bench/results/device_footprint.json and exits 1 when an RSS figure or the start-up time is more
than 20% above bench/baselines/device_footprint.json (``--update-baseline`` rewrites it).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import venv
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnx
from benchlib import ROOT, cpu_model, write_result
from onnx import TensorProto, helper, numpy_helper

from server.config import Settings
from server.digits import build_digits_pair
from server.mqtt.broker import free_port
from server.runner import start_embedded_broker
from tests.helpers.device_fleet import assign, enroll_device, push_model, wait_for
from tests.helpers.live_server import LiveServer
from tests.helpers.notify_socket import NotifySocket

BASELINE = ROOT / "bench" / "baselines" / "device_footprint.json"
RESULT = "bench/results/device_footprint.json"
#: a figure more than this much above the baseline fails the run
TOLERANCE = 0.20
#: the figures compared with the baseline (lower is better)
GATED = ("idle_rss_kb", "small_rss_kb", "real_rss_kb", "startup_s")
CLK_TCK = os.sysconf("SC_CLK_TCK")


def tiny_mlp(path: Path, in_dim: int = 16, hidden: int = 32, out_dim: int = 4) -> Path:
    """A two-layer MLP (MatMul, Add, Relu, MatMul, Add) built with onnx's helpers."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.standard_normal((in_dim, hidden)).astype(np.float32), "W1"),
        numpy_helper.from_array(np.zeros(hidden, np.float32), "b1"),
        numpy_helper.from_array(rng.standard_normal((hidden, out_dim)).astype(np.float32), "W2"),
        numpy_helper.from_array(np.zeros(out_dim, np.float32), "b2"),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["h0"]),
        helper.make_node("Add", ["h0", "b1"], ["h1"]),
        helper.make_node("Relu", ["h1"], ["h2"]),
        helper.make_node("MatMul", ["h2", "W2"], ["y0"]),
        helper.make_node("Add", ["y0", "b2"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny_mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", in_dim])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", out_dim])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


# ---------------------------------------------------------------------------- install size
def dir_bytes(path: Path) -> int:
    return sum(p.lstat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def install_size(work: Path) -> dict[str, Any]:
    """site-packages of a fresh venv after ``pip install <repo>[device]``; not measured (with
    pip's last words) when pip fails, e.g. without an index."""
    env_dir = work / "device-venv"
    venv.create(env_dir, with_pip=True)
    py = env_dir / "bin" / "python"
    t0 = time.perf_counter()
    proc = subprocess.run(
        [str(py), "-m", "pip", "install", "--quiet", f"{ROOT}[device]"],
        capture_output=True,
        text=True,
        timeout=900,
    )
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["?"]
        return {"measured": False, "why": f"pip install failed: {tail[0]}"}
    site = next((env_dir / "lib").glob("python*/site-packages"))
    sizes: dict[str, int] = {}
    for entry in site.iterdir():
        if entry.name.endswith((".dist-info", ".pth")) or entry.name == "__pycache__":
            continue
        sizes[entry.name] = dir_bytes(entry) if entry.is_dir() else entry.stat().st_size
    largest = sorted(sizes.items(), key=lambda kv: -kv[1])[:5]
    return {
        "measured": True,
        "site_packages_mb": round(dir_bytes(site) / 1e6, 1),
        "largest_mb": {name: round(size / 1e6, 1) for name, size in largest},
        "install_s": round(time.perf_counter() - t0, 1),
    }


# ---------------------------------------------------------------------------- one daemon
def proc_memory(pid: int) -> dict[str, int | None]:
    """VmRSS (/proc/PID/status) and Pss (/proc/PID/smaps_rollup, None when unreadable), in kB."""
    rss = pss = None
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1])
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                pss = int(line.split()[1])
    except OSError:
        pass
    return {"rss_kb": rss, "pss_kb": pss}


def cpu_s(pid: int) -> float:
    """utime + stime of the process (all its threads), in seconds (/proc/PID/stat)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # fields 14 and 15 of proc(5)


class Daemon:
    """``fleet device run`` with the daemon's default settings (a free API port), notifying a
    socket bound here."""

    def __init__(self, data_dir: Path, log: Path) -> None:
        self.data_dir, self.log = data_dir, log
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> float:
        """Start it; seconds from process start to ``READY=1``."""
        notify = NotifySocket(self.data_dir.parent / f"{self.data_dir.name}.notify")
        env = {k: v for k, v in os.environ.items() if not k.startswith(("FLEET_", "WATCHDOG_"))}
        env.update(
            NOTIFY_SOCKET=notify.env_value,
            FLEET_DEVICE_DATA_DIR=str(self.data_dir),
            FLEET_DEVICE_API_PORT=str(self.port),
        )
        try:
            with open(self.log, "ab") as fh:
                t0 = time.monotonic()
                self.proc = subprocess.Popen(
                    [sys.executable, "-m", "server.cli", "device", "run", "--data-dir", str(self.data_dir)],
                    cwd=ROOT,
                    env=env,
                    stdout=fh,
                    stderr=subprocess.STDOUT,
                )
            notify.wait_for("READY=1", timeout=120)
            return time.monotonic() - t0
        finally:
            notify.close()
            Path(notify.env_value).unlink(missing_ok=True)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def models(self) -> dict[str, Any]:
        return httpx.get(self.url + "/v1/health", timeout=5).json()["models"]

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


def settled_memory(daemon: Daemon, settle_s: float) -> dict[str, int | None]:
    time.sleep(settle_s)
    return proc_memory(daemon.pid)


def serves(daemon: Daemon, model: str, version: str, previous: str | None = None) -> bool:
    status = daemon.models().get(model) or {}
    return status.get("version") == version and (previous is None or status.get("previous_warm") is True)


# ---------------------------------------------------------------------------- the run
def measure_daemons(work: Path, args: argparse.Namespace) -> dict[str, Any]:
    pair_v1 = build_digits_pair(work / "digits-v1", seed=0)
    pair_v2 = build_digits_pair(work / "digits-v2", seed=1)
    settings = Settings(
        data_dir=work / "server",
        database_url=f"sqlite:///{work / 'fleet.db'}",
        public_url="http://127.0.0.1",
        mqtt_enabled=True,
        mqtt_port=free_port(),
        mqtt_server_name="bench-server",
        rollout_engine=False,
        gc_tuning=False,
    )
    port = free_port()
    settings = settings.model_copy(update={"port": port, "public_url": f"http://127.0.0.1:{port}"})
    broker = start_embedded_broker(settings)
    live = LiveServer(settings).start()
    daemons: list[Daemon] = []
    probation = {"seconds": 1, "min_requests": 0}
    try:
        push_model(live, "tiny", "1.0.0", tiny_mlp(work / "tiny.onnx"))
        push_model(live, "digits", "1.0.0", pair_v1.cloud)
        push_model(live, "digits", "2.0.0", pair_v2.cloud)

        def daemon(name: str) -> Daemon:
            enroll_device(live, work / name, f"bench-{name}")
            d = Daemon(work / name, work / f"{name}.log")
            daemons.append(d)
            return d

        out: dict[str, Any] = {}
        idle = daemon("idle")
        out["idle_first_start_s"] = round(idle.start(), 3)
        out["idle"] = settled_memory(idle, args.settle_s)
        idle.stop()

        small = daemon("small")
        small.start()
        assign(live, "bench-small", "tiny", "1.0.0", probation=probation)
        wait_for(lambda: serves(small, "tiny", "1.0.0"), timeout=120, what="tiny 1.0.0 serves")
        out["small"] = settled_memory(small, args.settle_s)
        small.stop()

        real = daemon("real")
        real.start()
        assign(live, "bench-real", "digits", "1.0.0", probation=probation)
        wait_for(lambda: serves(real, "digits", "1.0.0"), timeout=120, what="digits 1.0.0 serves")
        assign(live, "bench-real", "digits", "2.0.0", probation=probation)
        wait_for(lambda: serves(real, "digits", "2.0.0", "1.0.0"), timeout=120, what="2.0.0, 1.0.0 warm")
        out["real"] = settled_memory(real, args.settle_s)
        # idle CPU: heartbeats, health windows (no requests) over a measured interval
        c0, t0 = cpu_s(real.pid), time.monotonic()
        time.sleep(args.idle_s)
        c1, t1 = cpu_s(real.pid), time.monotonic()
        out["cpu_idle_s_per_h"] = round((c1 - c0) / (t1 - t0) * 3600, 2)
        out["cpu_idle_interval_s"] = round(t1 - t0, 1)
        real.stop()
        starts = []
        for _ in range(args.starts):  # restarts into the same state: both versions load again
            starts.append(real.start())
            wait_for(lambda: serves(real, "digits", "2.0.0"), timeout=60, what="2.0.0 after a restart")
            real.stop()
        out["startup_s_each"] = [round(s, 3) for s in starts]
        out["startup_s"] = round(statistics.median(starts), 3)
        out["model_bytes"] = {
            "tiny": (work / "tiny.onnx").stat().st_size,
            "digits_cloud": pair_v2.cloud.stat().st_size,
        }
        return out
    finally:
        for d in daemons:
            d.stop()
        live.stop()
        broker.stop()


def figures(daemons: dict[str, Any]) -> dict[str, float]:
    return {
        "idle_rss_kb": daemons["idle"]["rss_kb"],
        "small_rss_kb": daemons["small"]["rss_kb"],
        "real_rss_kb": daemons["real"]["rss_kb"],
        "startup_s": daemons["startup_s"],
    }


def regressions(now: dict[str, float], base: dict[str, float]) -> list[str]:
    """Each gated figure more than :data:`TOLERANCE` above its baseline, as a sentence."""
    worse = []
    for key in GATED:
        if key in base and base[key] and now[key] > base[key] * (1 + TOLERANCE):
            worse.append(
                f"{key} {now[key]:g} is {now[key] / base[key] - 1:+.0%} over the baseline's {base[key]:g}"
            )
    return worse


def mb(kb: int | None) -> str:
    return "n/a" if kb is None else f"{kb / 1024:.0f}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--idle-s", type=float, default=20.0, help="the idle CPU interval")
    ap.add_argument("--settle-s", type=float, default=3.0, help="wait before reading memory")
    ap.add_argument("--starts", type=int, default=5, help="restarts timed to READY=1 (median)")
    ap.add_argument("--skip-install-size", action="store_true", help="no fresh venv (quick runs)")
    ap.add_argument("--update-baseline", action="store_true", help="rewrite the baseline")
    ap.add_argument("--baseline", type=Path, default=BASELINE, help="the stored baseline")
    ap.add_argument("--no-write", action="store_true", help=f"print only (no {RESULT})")
    args = ap.parse_args()
    baseline: Path = args.baseline

    work = Path(tempfile.mkdtemp(prefix="fleet-bench-footprint-"))
    try:
        size = {"measured": False, "why": "--skip-install-size"}
        if not args.skip_install_size:
            size = install_size(work)
        daemons = measure_daemons(work, args)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    now = figures(daemons)
    print(f"fleetota bench/device_footprint.py: {os.cpu_count()} cores, {cpu_model()}")
    print(f"  {'state':<44}{'VmRSS MB':>10}{'PSS MB':>8}")
    rows = [
        ("idle, no model", daemons["idle"]),
        ("small MLP (tiny 1.0.0)", daemons["small"]),
        ("digits cloud model 2.0.0 + 1.0.0 kept warm", daemons["real"]),
    ]
    for label, mem in rows:
        print(f"  {label:<44}{mb(mem['rss_kb']):>10}{mb(mem['pss_kb']):>8}")
    print(
        f"  idle CPU: {daemons['cpu_idle_s_per_h']:g} CPU s per hour "
        f"(over {daemons['cpu_idle_interval_s']:g} s, digits served, no requests)"
    )
    print(f"  start-up to READY=1: {now['startup_s']:g} s median of {daemons['startup_s_each']}")
    if size["measured"]:
        largest = ", ".join(f"{k} {v:g}" for k, v in size["largest_mb"].items())
        print(f"  install size of .[device]: {size['site_packages_mb']:g} MB site-packages ({largest})")
    else:
        print(f"  install size of .[device]: not measured ({size['why']})")

    base: dict[str, float] = {}
    if baseline.exists() and not args.update_baseline:
        stored = json.loads(baseline.read_text())
        base = stored["figures"]
        if (stored.get("cpus"), stored.get("cpu_model")) != (os.cpu_count(), cpu_model()):
            print(f"  (the baseline was measured on {stored.get('cpus')} cores, {stored.get('cpu_model')})")
    worse = regressions(now, base)
    if not args.no_write:
        write_result(
            "device_footprint",
            {"install": size, "daemons": daemons, "figures": now, "baseline": base, "regressions": worse},
        )
    if args.update_baseline:
        baseline.parent.mkdir(parents=True, exist_ok=True)
        doc = {
            "at": time.strftime("%Y-%m-%d", time.gmtime()),
            "cpus": os.cpu_count(),
            "cpu_model": cpu_model(),
            "figures": now,
            "install_site_packages_mb": size.get("site_packages_mb"),
        }
        baseline.write_text(json.dumps(doc, indent=1) + "\n")
        print(f"  baseline rewritten: {baseline}")
        return 0
    if not base:
        print(f"  no baseline at {baseline}: run with --update-baseline to store one")
        return 0
    for key in GATED:
        print(f"  {key}: {now[key]:g} (baseline {base.get(key, 'n/a')}, limit +{TOLERANCE:.0%})")
    if worse:
        print(
            f"REGRESSION (more than {TOLERANCE:.0%} over {baseline}): "
            + "; ".join(worse)
            + "\n  if it is expected, store a new baseline: bench/device_footprint.py --update-baseline",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
