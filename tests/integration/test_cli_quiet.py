"""The `fleet` entry point as scripts run it: stdout is the answer, stderr stays quiet unless
something is wrong; ``fleet -v`` lets the libraries' logs through."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

FLEET = Path(sys.executable).with_name("fleet")
TOKEN = re.compile(r"fa\.[0-9a-f]+\.[A-Za-z0-9_-]+\n")


def fleet(*args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    variables = {k: v for k, v in os.environ.items() if not k.startswith("FLEET_")}
    variables.update(env)
    command = [str(FLEET), *args]
    return subprocess.run(command, cwd=cwd, env=variables, capture_output=True, text=True, timeout=120)


def test_admin_token_create_prints_only_the_token(tmp_path):
    first = fleet("admin", "token", "create", "--role", "admin", cwd=tmp_path)  # creates the database too
    assert first.returncode == 0, first.stderr
    assert TOKEN.fullmatch(first.stdout), first.stdout
    assert first.stderr == ""  # no alembic, no "created TUF root" chatter

    verbose = fleet("-v", "admin", "token", "create", "--role", "viewer", cwd=tmp_path)
    assert verbose.returncode == 0, verbose.stderr
    assert TOKEN.fullmatch(verbose.stdout), verbose.stdout
    assert "alembic" in verbose.stderr


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_model_push_prints_no_request_log(live_server, onnx_model, tmp_path):
    env = {"FLEET_URL": live_server.url, "FLEET_TOKEN": live_server.token("operator")}
    pushed = fleet("model", "push", "det", "1.0.0", str(onnx_model("a.onnx")), cwd=tmp_path, **env)
    assert pushed.returncode == 0, pushed.stderr
    assert pushed.stdout.startswith("published det 1.0.0 (release 1)"), pushed.stdout
    assert pushed.stderr == ""  # no "HTTP Request: POST ..." from httpx
    listed = fleet("model", "ls", cwd=tmp_path, **env)
    assert listed.returncode == 0, listed.stderr
    assert "det" in listed.stdout
    assert listed.stderr == ""
