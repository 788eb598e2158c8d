"""`fleet demo` end to end (real Mosquitto, server and device daemon processes): v1 and v2 roll out,
the bad v3 trips its canary and every device ends on v2; then the hybrid act answers from edge,
cloud and cache, and on through a cloud outage."""

from __future__ import annotations

import re

import pytest

from server.demo import demo


@pytest.mark.slow
def test_demo_runs_green(tmp_path, capsys):
    assert demo(2, workdir=tmp_path / "demo") == 0
    out = capsys.readouterr().out
    assert "rolled back automatically" in out
    assert "rolled_back" in out
    assert re.search(r"dashboard http://127\.0\.0\.1:\d+/ui/ : sign in with the viewer token fa\.", out)
    # the hybrid act: three tables (cloud up, stopped, restarted), no failed request in any
    for title in ("cloud tier up", "cloud tier stopped", "cloud tier restarted"):
        assert re.search(rf"^\s*{title}\s*$", out, re.M), title
    assert out.count("failed requests: 0") == 3
    rows = {p: re.findall(rf"│ {p}\s+│ (\d+)\s+│", out) for p in ("edge", "cloud", "cache")}
    assert all(len(r) == 3 for r in rows.values()), rows
    assert int(rows["cloud"][0]) > 0  # the cloud answered unsure digits while it was up
    assert int(rows["cache"][1]) > 0  # and cached answers stood in while it was down
    accuracy = re.search(r"hybrid accuracy (\d\.\d+) vs edge-only (\d\.\d+)", out)
    assert accuracy is not None
    assert float(accuracy[1]) > float(accuracy[2])


def test_demo_refuses_a_workdir_it_did_not_make(tmp_path, capsys):
    """--workdir DIR empties DIR first: only a new, empty or earlier demo's directory is taken."""
    precious = tmp_path / "home"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    assert demo(1, workdir=precious) == 2
    assert (precious / "notes.txt").read_text() == "keep me"
    assert "not an earlier demo's work directory" in " ".join(capsys.readouterr().out.split())


def test_a_failing_demo_stops_its_daemons_server_and_broker(tmp_path, monkeypatch):
    import server.demo as demo_module
    import server.runner as runner
    from server.client import FleetClient

    daemons, brokers = [], []
    start_daemon, start_broker = demo_module._start_daemon, runner.start_embedded_broker

    def daemon(device, logs):
        start_daemon(device, logs)
        daemons.append(device.proc)

    def broker(settings):
        brokers.append(start_broker(settings))
        return brokers[-1]

    def push_fails(*args, **kwargs):
        raise RuntimeError("the push broke")

    def summary_fails(*args, **kwargs):  # the server is in a bad way: so is the summary
        raise RuntimeError("the summary broke")

    monkeypatch.setattr(demo_module, "_start_daemon", daemon)
    monkeypatch.setattr(runner, "start_embedded_broker", broker)  # demo() imports it when it runs
    monkeypatch.setattr(FleetClient, "push_model", push_fails)
    monkeypatch.setattr(demo_module, "_summary", summary_fails)
    with pytest.raises(RuntimeError, match="broke"):
        demo(1, workdir=tmp_path / "demo")
    assert len(daemons) == 1
    assert daemons[0].poll() is not None  # the daemon was stopped
    assert len(brokers) == 1
    assert not brokers[0].running
