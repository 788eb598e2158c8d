"""MQTT connection failures are logged with their reason and visible: a device and a server, each
a real process, pointed at a real Mosquitto whose certificate comes from another CA."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.helpers.device_fleet import DaemonProcess, enroll_device, wait_for
from tests.helpers.server_process import ServerProcess

pytestmark = pytest.mark.mqtt

FLEET = Path(sys.executable).with_name("fleet")


def status(data: Path) -> subprocess.CompletedProcess[str]:
    command = [str(FLEET), "device", "status", "--data-dir", str(data)]
    return subprocess.run(command, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_device_shows_why_it_cannot_connect(live_server, mosquitto, tmp_path):
    data = tmp_path / "dev"
    enroll_device(live_server, data, "far-dev")
    identity = json.loads((data / "identity.json").read_text())
    identity["mqtt_port"] = mosquitto.port  # a broker whose certificate another CA signed
    (data / "identity.json").write_text(json.dumps(identity))

    daemon = DaemonProcess(
        data, tmp_path / "daemon.log", command=[str(FLEET), "device", "run", "--data-dir", str(data)]
    )
    try:
        daemon.wait_api()

        def failed_twice() -> dict | None:
            mqtt = httpx.get(daemon.url + "/v1/health", timeout=5).json()["mqtt"]
            return mqtt if sum(mqtt["failures"].values()) >= 2 else None

        mqtt = wait_for(failed_twice, timeout=60, what="two failed connection attempts in /v1/health")
        assert mqtt["state"] == "disconnected"
        assert mqtt["connected"] is False
        assert mqtt["broker"] == f"{identity['mqtt_host']}:{mosquitto.port}"
        error = mqtt["last_error"]
        assert error["reason"] == "tls_verify"
        assert f"did not verify against CA file {data.absolute() / 'ca.crt'}" in error["message"]
        assert error["message"].endswith("self-signed certificate in certificate chain")  # OpenSSL's words

        # the log has the reason at WARNING, once while it repeats
        warnings = [line for line in daemon.log.read_text().splitlines() if "[tls_verify]" in line]
        assert len(warnings) == 1, warnings
        assert " WARNING device_client.mqtt: MQTT link: TLS: the broker's certificate at " in warnings[0]

        # and `fleet device status` shows the same, from the state the daemon recorded
        shown = status(data)
        assert shown.returncode == 0, shown.stderr
        status_mqtt = json.loads(shown.stdout)["mqtt"]
        assert status_mqtt["state"] == "disconnected"
        assert status_mqtt["last_error"]["reason"] == "tls_verify"
        assert status_mqtt["daemon_running"] is True
    finally:
        daemon.terminate()
    stopped = json.loads(status(data).stdout)["mqtt"]
    assert stopped["state"] == "stopped"
    assert stopped["daemon_running"] is False


def test_a_server_shows_why_it_cannot_connect(mosquitto, tmp_path):
    # the server's own CA and MQTT client identity, as `fleet broker config` writes them
    made = subprocess.run(
        [str(FLEET), "broker", "config", "fleet-data/broker", "--server-name", "failing"],
        cwd=tmp_path, capture_output=True, text=True,
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    srv = ServerProcess(
        tmp_path, FLEET_MQTT_URL=f"mqtts://127.0.0.1:{mosquitto.port}", FLEET_MQTT_SERVER_NAME="failing"
    )
    try:

        def failures() -> dict[tuple[str, str], float]:
            text = httpx.get(f"{srv.url}/metrics", timeout=5).text
            found = re.findall(r'_connection_failures_total\{link="(\w+)",reason="(\w+)"\} (\S+)', text)
            return {(link, reason): float(n) for link, reason, n in found}

        def failed_twice() -> bool:
            assert srv.proc.poll() is None, srv.output()
            try:
                return failures().get(("consume", "tls_verify"), 0) >= 2
            except httpx.HTTPError:
                return False

        wait_for(failed_twice, timeout=60, what="two counted TLS failures of the consuming link")
        assert failures().get(("publish", "tls_verify"), 0) >= 1

        assert httpx.get(f"{srv.url}/healthz").status_code == 200  # the process is up ...
        ready = httpx.get(f"{srv.url}/readyz")
        assert ready.status_code == 503  # ... but not ready, and says why
        body = ready.json()
        assert body["status"] == "not_ready"
        assert body["not_ready"] == ["mqtt"]
        assert body["checks"]["database"] == {"ok": True}
        assert body["checks"]["migrations"]["ok"] is True
        consume = body["checks"]["mqtt"]["links"]["consume"]
        assert consume["state"] == "disconnected"
        assert consume["last_error"]["reason"] == "tls_verify"
        assert "did not verify against CA file fleet-data/broker/ca.crt" in consume["last_error"]["message"]

        warnings = [line for line in srv.output().splitlines() if "MQTT consume:" in line]
        assert len(warnings) == 1, warnings  # rate-limited while it repeats
        assert " WARNING server.mqtt.bridge: MQTT consume: TLS: the broker's certificate at " in warnings[0]
        assert "[tls_verify]" in warnings[0]
    finally:
        srv.kill_tree()
