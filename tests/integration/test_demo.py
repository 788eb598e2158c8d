"""`fleet demo` end to end (real Mosquitto, server and device daemon processes): v1 and v2 roll out,
the bad v3 trips its canary and every device ends on v2."""

from __future__ import annotations

import pytest

from server.demo import demo


@pytest.mark.slow
def test_demo_runs_green(tmp_path, capsys):
    assert demo(2, workdir=tmp_path / "demo") == 0
    out = capsys.readouterr().out
    assert "rolled back automatically" in out
    assert "rolled_back" in out
