"""The live-server fixture serves HTTP on a real socket with the MQTT bridge connected."""

from __future__ import annotations

import httpx
import pytest


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_live_server_answers_and_is_connected(live_server):
    r = httpx.get(f"{live_server.url}/healthz")
    assert r.json() == {"status": "ok"}
    assert live_server.mqtt.link.connected
    r = httpx.get(
        f"{live_server.url}/api/v1/devices", headers={"Authorization": f"Bearer {live_server.token()}"}
    )
    assert r.status_code == 200
