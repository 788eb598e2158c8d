"""bench/device_footprint.py end to end on a short run: real daemons against a real server and
broker, READY=1 on a real notification socket, and the exit code of the baseline comparison."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_device_footprint_measures_and_fails_on_a_regression(tmp_path):
    # a baseline the idle daemon cannot meet (1 MB) and the rest easily can
    baseline = tmp_path / "baseline.json"
    figures = {"idle_rss_kb": 1024, "small_rss_kb": 10**8, "real_rss_kb": 10**8, "startup_s": 10**4}
    baseline.write_text(json.dumps({"figures": figures}))
    out = subprocess.run(
        [sys.executable, "bench/device_footprint.py", "--skip-install-size", "--idle-s", "2",
         "--settle-s", "0.5", "--starts", "1", "--baseline", str(baseline), "--no-write"],
        cwd=ROOT, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert out.returncode == 1, out.stdout + out.stderr
    for row in ("idle, no model", "small MLP (tiny 1.0.0)", "digits cloud model 2.0.0 + 1.0.0 kept warm"):
        assert f"  {row} " in out.stdout
    assert "CPU s per hour" in out.stdout
    assert "start-up to READY=1:" in out.stdout
    assert "install size of .[device]: not measured (--skip-install-size)" in out.stdout
    assert "REGRESSION (more than 20% over" in out.stderr
    assert "idle_rss_kb" in out.stderr
    for fine in ("small_rss_kb", "real_rss_kb", "startup_s"):
        assert fine not in out.stderr
    assert "--update-baseline" in out.stderr
    assert json.loads(baseline.read_text())["figures"] == figures  # left as it was
