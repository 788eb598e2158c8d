"""What a script (or ``| tee``) reads from the real ``fleet`` entry point: output that is not a terminal
keeps every error on one line, however long the path or URL in it, and tables at their full width."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

FLEET = Path(sys.executable).with_name("fleet")
LONG = "/".join(["a-rather-long-directory-name"] * 8)  # ~230 characters: wrapped at 80 without care


def run_piped(args: list[str], stdin: str = "") -> subprocess.CompletedProcess[str]:
    """Run with stdin, stdout and stderr all pipes and no COLUMNS, as in a pipeline."""
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "FORCE_COLOR", "TTY_COMPATIBLE")}
    return subprocess.run(args, input=stdin, capture_output=True, text=True, timeout=120, env=env)


def test_a_long_missing_path_is_one_error_line(tmp_path):
    missing = tmp_path / LONG / "device"
    result = run_piped([str(FLEET), "device", "status", "--data-dir", str(missing)])
    assert result.returncode == 1, result.stderr
    assert result.stderr.splitlines() == [f"error: {missing} does not exist"]


def test_a_long_url_in_a_server_error_is_one_line():
    with socket.socket() as s:  # a port nothing listens on: connection refused
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}/{LONG}"
    result = run_piped([str(FLEET), "rollout", "ls", "--url", url, "--token", "fa.x.y"])
    assert result.returncode == 1, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: request failed (GET ")
    assert f"{url}/api/v1/rollouts" in lines[0]


def test_a_piped_rollout_table_is_not_truncated():
    state = {
        "id": "r-0123456789", "model": "detector", "version": "2.0.0", "status": "running",
        "current_stage": 0, "reason": None,
        "stage_views": [
            {"index": 0, "shadow": True, "devices": 3, "phases": {"succeeded": 2, "downloading": 1},
             "health": {"error_rate": 0.0123, "p95_ms": 3.25, "agreement": 0.987}},
            {"index": 1, "shadow": False, "devices": 1000, "phases": {"pending": 1000},
             "health": {"error_rate": None, "p95_ms": None, "agreement": None}},
        ],
    }  # fmt: skip
    script = "import json, sys; from server.cli.common import console; "
    script += "from server.views import rollout_table; "
    script += "console.print(rollout_table(json.load(sys.stdin)))"
    result = run_piped([sys.executable, "-c", script], stdin=json.dumps(state))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "…" not in out
    header = next(line for line in out.splitlines() if "stage" in line and "devices" in line)
    for name in ("stage", "devices", "succeeded", "failed", "in progress", "errors", "p95 ms", "agreement"):
        assert name in header, header
    assert "1 (shadow) <" in out
    assert "0.987" in out
