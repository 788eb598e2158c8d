"""``fleet server run`` under a ``Type=notify`` unit: READY once the API serves, watchdog pings
while its event loop answers, STOPPING on SIGTERM (a real unix datagram socket as
``$NOTIFY_SOCKET``)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import httpx

from server.mqtt.broker import free_port
from tests.helpers.device_fleet import stop_process, wait_for
from tests.helpers.notify_socket import NotifySocket


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
        assert notify.count("STOPPING=1") == 0
        proc.send_signal(signal.SIGTERM)
        notify.wait_for("STOPPING=1", timeout=20)
        assert proc.wait(30) == 0
    finally:
        stop_process(proc)
        notify.close()
