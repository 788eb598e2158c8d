"""bench/hybrid.py end to end on a small sample: a real server, a real `fleet cloud serve` process
hung then killed mid-run, the device's routing library; every request is answered and the table
printed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_bench_hybrid_runs_on_a_sample_and_loses_no_request_when_the_cloud_dies():
    out = subprocess.run(
        [sys.executable, "bench/hybrid.py", "--sample", "40", "--rounds", "1", "--thresholds", "0.8",
         "--no-write"],
        cwd=ROOT, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    for mode in ("edge-only", "cloud-only", "hybrid@0.8"):
        assert f"  {mode} " in out.stdout
    assert "recommended threshold: 0.8" in out.stdout
    assert "cloud killed after 13 of 40 requests: failed 0 (target 0) PASS" in out.stdout
    assert "cloud hung (SIGSTOP) after 13 of 40 requests: failed 0 (target 0) PASS" in out.stdout
    # the kill was seen: escalations after it fell back to the edge
    assert "cloud_failed:unreachable" in out.stdout or "breaker_open" in out.stdout
