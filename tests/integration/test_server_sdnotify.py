"""``fleet server run`` under a ``Type=notify`` unit: READY once the API serves, watchdog pings
while its event loop answers, STOPPING on SIGTERM (a real unix datagram socket as
``$NOTIFY_SOCKET``); its children (Mosquitto, an ingest process, the cloud tier) never see the
service manager's variables."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx

from server.mqtt.broker import free_port
from server.procs import SERVICE_MANAGER_VARS, take_service_manager_env
from tests.helpers.device_fleet import stop_process, wait_for
from tests.helpers.notify_socket import NotifySocket


def children(pid: int) -> dict[int, str]:
    """The live child processes of ``pid``, each with its command line."""
    found: dict[int, str] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            try:
                cmdline = Path(f"/proc/{child}/cmdline").read_bytes()
            except OSError:
                continue  # exited meanwhile
            found[int(child)] = cmdline.replace(b"\0", b" ").decode(errors="replace")
    return found


def environ_names(pid: int) -> set[str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    return {item.split(b"=", 1)[0].decode() for item in raw.split(b"\0") if item}


def kinds(pid: int) -> dict[str, int]:
    """The server's children by kind: mosquitto, an ingest process (multiprocessing's spawn),
    the cloud tier."""
    found: dict[str, int] = {}
    for child, cmdline in children(pid).items():
        if "mosquitto" in cmdline:
            found["broker"] = child
        elif "multiprocessing" in cmdline and "spawn_main" in cmdline:
            found.setdefault("ingest", child)
        elif "cloud serve" in cmdline:
            found["cloud"] = child
    return found


def test_take_service_manager_env_removes_and_returns_the_three():
    env = {"NOTIFY_SOCKET": "@n", "WATCHDOG_USEC": "5", "WATCHDOG_PID": "7", "PATH": "/bin"}
    assert take_service_manager_env(env) == {"NOTIFY_SOCKET": "@n", "WATCHDOG_USEC": "5", "WATCHDOG_PID": "7"}
    assert env == {"PATH": "/bin"}
    assert take_service_manager_env(env) == {}


def test_server_run_notifies_ready_watchdog_and_stopping(tmp_path):
    port, mqtt_port = free_port(), free_port()
    notify = NotifySocket(tmp_path / "notify")
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("FLEET_MQTT_URL", "FLEET_DATABASE_URL", "FLEET_DATA_DIR", "WATCHDOG_PID")
    }
    env.update(
        FLEET_PORT=str(port),
        FLEET_MQTT_PORT=str(mqtt_port),
        NOTIFY_SOCKET=notify.env_value,
        WATCHDOG_USEC="400000",
        FLEET_INGEST_PROCESSES="1",
    )
    with open(tmp_path / "server.log", "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "server.cli", "server", "run"],
            cwd=tmp_path,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        # (the embedded Mosquitto may send its own READY=1: systemd takes only the main process's)
        ready = notify.wait_for(f"STATUS=serving the API on 127.0.0.1:{port}", timeout=60)
        assert "READY=1" in ready
        # READY came once the API serves: it answers at once
        assert httpx.get(f"http://127.0.0.1:{port}/openapi.json", timeout=5).status_code == 200
        wait_for(lambda: notify.listen() and notify.count("WATCHDOG=1") >= 3, what="watchdog pings")
        # every child runs, and none inherited what systemd told the server alone
        spawned = wait_for(
            lambda: (
                notify.drain() is not None
                and (found := kinds(proc.pid)).keys() == {"broker", "ingest", "cloud"}
                and found
            ),
            timeout=60,
            what="the broker, an ingest process and the cloud tier",
        )
        for kind, pid in spawned.items():
            assert environ_names(pid) & set(SERVICE_MANAGER_VARS) == set(), kind
            assert "FLEET_PORT" in environ_names(pid), kind  # (the rest of the environment is kept)
        assert notify.count("STOPPING=1") == 0
        proc.send_signal(signal.SIGTERM)
        notify.wait_for("STOPPING=1", timeout=20)
        assert proc.wait(30) == 0
    finally:
        stop_process(proc)
        notify.close()
