"""Shared helpers of the benchmarks (a package, so `make bench`'s bench/*.py loop skips it)."""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.helpers.databases import fresh_postgres_database  # noqa: E402  (ROOT on sys.path first)

RESULTS = ROOT / "bench" / "results"


def python_loop_s(n: int = 2_000_000) -> float:
    """Seconds per 10**7 iterations of a pure-Python add loop on this machine (best of 3 of ``n``).

    A yardstick for comparing runs across machines: the simulator, the ingest and the engine are
    mostly Python, so their times scale with it far more than with the hashing speed openssl
    shows (the 2-core VMs of docs/benchmarks.md measured 0.27-0.71 s)."""
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        total = 0
        for i in range(n):
            total += i
        best = min(best, time.perf_counter() - t0)
    return best * 10_000_000 / n


def cpu_model() -> str:
    """The CPU model name of this machine (``/proc/cpuinfo``), or what :mod:`platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def write_result(name: str, data: dict[str, Any]) -> Path:
    """bench/results/<name>.json (gitignored), with when and where it ran (cores, CPU model, and how
    fast Python is there: :func:`python_loop_s`)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    doc = {
        "bench": name,
        "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "host": {
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "cpu_model": cpu_model(),
            "python_loop_1e7_s": round(python_loop_s(), 3),
        },
        **data,
    }
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(doc, indent=1, default=str))
    return path


def ratio_line(label: str, value: float | None, target: str) -> str:
    shown = "n/a" if value is None else f"{value:.3f}"
    return f"  {label}: {shown}   (target: {target})"


def postgres_option(ap: argparse.ArgumentParser) -> None:
    """``--postgres URL``: also run on a scratch database next to URL's (default from
    FLEET_BENCH_POSTGRES_URL or FLEET_TEST_POSTGRES_URL; empty: SQLite only)."""
    ap.add_argument(
        "--postgres",
        default=os.environ.get("FLEET_BENCH_POSTGRES_URL") or os.environ.get("FLEET_TEST_POSTGRES_URL", ""),
    )


def fresh_postgres(base_url: str) -> tuple[str, Callable[[], None]]:
    """A new empty database next to ``base_url``'s: its URL and a function that drops it."""
    return fresh_postgres_database(base_url, prefix="fleet_bench")


def each_backend(
    postgres: str, sqlite_path: Path, run: Callable[[str, str], list[dict[str, Any]]]
) -> list[dict[str, Any]]:
    """``run(backend, database_url)`` on SQLite at ``sqlite_path``, then on a scratch PostgreSQL
    database when ``postgres`` is set (dropped afterwards); their rows, in that order."""
    rows = run("sqlite", f"sqlite:///{sqlite_path}")
    if postgres:
        url, drop = fresh_postgres(postgres)
        try:
            rows += run("postgres", url)
        finally:
            drop()
    return rows
