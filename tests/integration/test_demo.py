"""`fleet demo` end to end (real Mosquitto, server and device daemon processes): v1 and v2 roll out,
the bad v3 trips its canary and every device ends on v2."""

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
