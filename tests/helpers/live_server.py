"""Pytest plugin (registered in tests/conftest.py): a server with its MQTT bridge against a
private Mosquitto (``mqtt_settings``, ``broker_process``, ``mqtt_app``, ``mqtt_ctx``,
``mqtt_token``) and a real server on a free loopback port (``live_settings``, ``live_server``,
:class:`LiveServer`)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from server.mqtt.broker import free_port
from server.runner import ServerThread
from tests.helpers.tokens import create_admin_token


@pytest.fixture
def mqtt_settings(settings):
    """Server settings with the MQTT bridge on and an embedded-style broker on a free port. The
    server name is fixed, so the broker's ACL (written from these settings) lists the identities
    of a server on another HTTP port (``live_settings``) too."""
    return settings.model_copy(
        update={
            "mqtt_enabled": True,
            "mqtt_port": free_port(),
            "mqtt_server_name": "test-server",
            "ingest_batch_delay_s": 0.05,
            "rollout_engine": True,
            "rollout_tick_s": 0.2,
        }
    )


@pytest.fixture
def broker_process(mqtt_settings) -> Iterator[object]:
    from server.runner import start_embedded_broker

    broker = start_embedded_broker(mqtt_settings)
    yield broker
    broker.stop()


@pytest.fixture
def mqtt_app(mqtt_settings, broker_process):
    """(TestClient, ServerContext, MqttRuntime) with the bridge connected and subscribed."""
    from fastapi.testclient import TestClient

    from server.app import create_app

    with TestClient(create_app(mqtt_settings)) as client:
        runtime = client.app.state.mqtt
        assert runtime.wait_connected(10), "server did not connect to the broker"
        yield client, client.app.state.ctx, runtime


@pytest.fixture
def mqtt_ctx(mqtt_app):
    return mqtt_app[1]


@pytest.fixture
def mqtt_token(mqtt_ctx):
    """Create an admin token of the given role in the MQTT-enabled server's database."""
    return lambda role="admin": create_admin_token(mqtt_ctx, role)


class LiveServer(ServerThread):
    """The real app under uvicorn on a free loopback port (devices need real sockets)."""

    def token(self, role: str = "admin") -> str:
        return create_admin_token(self.ctx, role)


@pytest.fixture
def live_settings(mqtt_settings):
    port = free_port()
    return mqtt_settings.model_copy(update={"port": port, "public_url": f"http://127.0.0.1:{port}"})


@pytest.fixture
def live_server(live_settings, broker_process) -> Iterator[LiveServer]:
    """A real server (HTTP on a free port, MQTT bridge connected to a private Mosquitto)."""
    server = LiveServer(live_settings).start()
    yield server
    server.stop()
