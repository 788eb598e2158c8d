"""``fleet model push --quantize int8`` against a live server: the numbers, and the refusal."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from server.cli import main

pytestmark = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)


def run(args, env, code=0):
    result = CliRunner().invoke(main, args, env=env, catch_exceptions=False)
    assert result.exit_code == code, result.output
    return result.output


def test_cli_push_quantize(live_server, onnx_model):
    s = live_server.settings
    local_env = {"FLEET_DATA_DIR": str(s.data_dir), "FLEET_DATABASE_URL": s.database_url}
    token = run(["admin", "token", "create", "--role", "operator"], local_env).strip()
    env = {"FLEET_URL": live_server.url, "FLEET_TOKEN": token}
    model = str(onnx_model("reg.onnx", in_dim=8, out_dim=1, seed=3))
    tight = json.dumps({"validation": {"rtol": 1e-7, "atol": 0}})

    push = ["model", "push", "reg", "1.0.0", model, "--quantize", "int8", "--metadata", tight]
    out = run(push, env, code=1)
    assert "422" in out
    assert "below min_agreement 0.99" in out
    assert "nothing was published" in out

    out = run([*push, "--min-agreement", "0", "--calibration", "static"], env)
    assert "published reg 1.0.0 (release 1)" in out
    assert "int8: " in out
    assert "latency" in out
    assert "int8" in run(["model", "ls", "reg"], env)


def test_cli_push_calibration_data(live_server, onnx_model, tmp_path):
    s = live_server.settings
    local_env = {"FLEET_DATA_DIR": str(s.data_dir), "FLEET_DATABASE_URL": s.database_url}
    token = run(["admin", "token", "create", "--role", "operator"], local_env).strip()
    env = {"FLEET_URL": live_server.url, "FLEET_TOKEN": token}
    model = str(onnx_model("clf.onnx", in_dim=8, out_dim=4, seed=5))
    calibration = tmp_path / "calibration.npz"
    rows = np.random.default_rng(1).random((50, 8), dtype=np.float32)
    np.savez(calibration, **{"inputs/x": rows})
    push = ["model", "push", "clf", "1.0.0", model, "--quantize", "int8", "--min-agreement", "0"]
    out = run([*push, "--calibration-data", str(calibration)], env)
    assert "calibration static:uploaded" in out
    versions = run(["model", "ls", "clf"], env)
    assert "int8" in versions
    bad = tmp_path / "bad.npz"
    np.savez(bad, **{"inputs/x": rows.astype(np.float64)})
    out = run(
        ["model", "push", "clf", "2.0.0", model, "--quantize", "int8", "--calibration-data", str(bad)],
        env,
        code=1,
    )
    assert "422" in out
    assert "calibration input 'x' is float64" in out
