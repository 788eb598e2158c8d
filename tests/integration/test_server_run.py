"""`fleet server run` on the embedded default: nothing configured but a data directory and ports."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import httpx

from server.mqtt.broker import free_port


def test_server_run_embedded_default_serves_docs_and_starts_mosquitto(tmp_path):
    port, mqtt_port, cloud_port = free_port(), free_port(), free_port()
    env = {**os.environ, "FLEET_PORT": str(port), "FLEET_MQTT_PORT": str(mqtt_port)}
    env["FLEET_CLOUD_PORT"] = str(cloud_port)
    env = {
        k: v for k, v in env.items() if k not in ("FLEET_MQTT_URL", "FLEET_DATABASE_URL", "FLEET_DATA_DIR")
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "server.cli", "server", "run"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 60
        docs = None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                docs = httpx.get(f"http://127.0.0.1:{port}/docs", timeout=1)
                break
            except httpx.HTTPError:
                time.sleep(0.2)
        assert docs is not None, proc.stdout.read().decode() if proc.poll() is not None else "no answer"
        assert docs.status_code == 200
        assert "swagger" in docs.text.lower()
        spec = httpx.get(f"http://127.0.0.1:{port}/openapi.json").json()
        assert "/api/v1/rollouts" in spec["paths"]
        assert "/api/v1/enroll" in spec["paths"]
        data = tmp_path / "fleet-data"
        assert (data / "fleet.db").exists()
        assert (data / "broker" / "mosquitto.conf").exists()
        assert (data / "repository" / "metadata" / "1.root.json").exists()
        assert oct((data / "keys" / "director.key").stat().st_mode & 0o777) == "0o600"
        # the embedded Mosquitto listens with TLS on its port, and the server's bridge is connected
        with httpx.Client() as client:
            metrics = client.get(f"http://127.0.0.1:{port}/metrics")
        assert metrics.status_code == 200
        import socket

        with socket.create_connection(("127.0.0.1", mqtt_port), timeout=2):
            pass
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
    assert proc.returncode == 0


def test_server_refuses_public_bind_with_development_defaults(tmp_path):
    env = {**os.environ, "FLEET_PORT": str(free_port())}
    result = subprocess.run(
        [sys.executable, "-m", "server.cli", "server", "run", "--host", "0.0.0.0"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert "refusing to listen on 0.0.0.0 with development defaults" in result.stdout + result.stderr
    assert not (tmp_path / "fleet-data" / "fleet.db").exists()


def test_broker_config_command_writes_a_working_broker(tmp_path):
    from click.testing import CliRunner

    from server.cli import main
    from server.mqtt.broker import BrokerFiles, MosquittoProcess
    from server.trust.pki import FleetCA
    from tests.helpers.mosquitto import Broker, mqtt_connect

    port = free_port()
    env = {"FLEET_DATA_DIR": str(tmp_path / "data")}
    out = CliRunner().invoke(
        main,
        ["broker", "config", str(tmp_path / "b"), "--port", str(port), "--hostname", "mqtt.example",
         "--server-name", "web1", "--server-name", "web2"],
        env={**env, "FLEET_INGEST_PROCESSES": "2"},
        catch_exceptions=False,
    )  # fmt: skip
    assert out.exit_code == 0, out.output
    conf = (tmp_path / "b" / "mosquitto.conf").read_text()
    assert "require_certificate true" in conf
    assert "use_identity_as_username true" in conf
    assert "use_username_as_clientid true" in conf
    # every connection of each replica (consuming, publishing, 2 ingest processes) is admitted
    acl_lines = (tmp_path / "b" / "acl").read_text().splitlines()
    roles = ("", ".pub", ".ingest-0", ".ingest-1")
    assert {line[5:] for line in acl_lines if line.startswith("user ")} == {"fleet_server"} | {
        f"fleet_server.{name}{role}" for name in ("web1", "web2") for role in roles
    }
    bad = CliRunner().invoke(main, ["broker", "config", str(tmp_path / "c"), "--server-name", "a.b"], env=env)
    assert bad.exit_code == 1
    assert "--server-name 'a.b': use letters, digits and '-' (at most 40)" in bad.output
    assert f"listener {port} 127.0.0.1" in conf
    acl = (tmp_path / "b" / "acl").read_text()
    assert "pattern read fleet/v1/d/%u/desired" in acl
    assert oct((tmp_path / "b" / "fleet_server.key").stat().st_mode & 0o777) == "0o600"
    files = BrokerFiles(tmp_path / "b", port)
    process = MosquittoProcess(files).start()
    try:
        ca = FleetCA(tmp_path / "data" / "keys")  # the server's CA, which the config trusts
        client = mqtt_connect(
            Broker(ca=ca, files=files, process=process, workdir=tmp_path), files.server_cert, files.server_key
        )
        client.disconnect()
        client.loop_stop()
    finally:
        process.stop()
