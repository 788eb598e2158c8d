"""Admin tokens may expire: an expired token is a 401 with a message and changes nothing.

protection: ``AdminService.authenticate`` refuses a token past its ``expires_at`` (set from
``ttl_s`` on ``POST /api/v1/admin/tokens`` or ``fleet admin token create --ttl``).
"""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from server.admin.schemas import MAX_TOKEN_TTL_S, parse_ttl
from server.app import create_app
from server.config import Settings
from tests.helpers.device_fleet import wait_for

FLEET = str(Path(sys.executable).parent / "fleet")


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_an_expired_token_is_401_with_a_message(app_client, make_token):
    admin = bearer(make_token("admin"))
    r = app_client.post(
        "/api/v1/admin/tokens", json={"name": "ci", "role": "operator", "ttl_s": 1}, headers=admin
    )
    assert r.status_code == 201, r.text
    short = r.json()
    expires_at = datetime.fromisoformat(short["expires_at"])
    assert expires_at - datetime.fromisoformat(short["created_at"]) == timedelta(seconds=1)
    r = app_client.post(
        "/api/v1/admin/tokens", json={"name": "day", "role": "operator", "ttl_s": 86400}, headers=admin
    )
    day = r.json()
    assert app_client.get("/api/v1/devices", headers=bearer(day["token"])).status_code == 200

    def refused() -> bool:
        return app_client.get("/api/v1/devices", headers=bearer(short["token"])).status_code == 401

    wait_for(refused, 20, interval=0.2, what="the 1 s token expires")
    r = app_client.get("/api/v1/devices", headers=bearer(short["token"]))
    assert r.json()["detail"] == f"admin token expired at {expires_at:%Y-%m-%d %H:%M:%S} UTC"
    assert r.headers["www-authenticate"] == "Bearer"
    audit_before = len(app_client.get("/api/v1/audit?limit=500", headers=admin).json()["items"])
    r = app_client.post("/api/v1/enroll-tokens", json={}, headers=bearer(short["token"]))
    assert r.status_code == 401
    assert len(app_client.get("/api/v1/audit?limit=500", headers=admin).json()["items"]) == audit_before
    assert app_client.get("/api/v1/devices", headers=bearer(day["token"])).status_code == 200

    listed = {t["id"]: t for t in app_client.get("/api/v1/admin/tokens", headers=admin).json()}
    assert listed[short["id"]]["expires_at"] == short["expires_at"]
    assert listed[day["id"]]["expires_at"] == day["expires_at"]
    assert all(t["expires_at"] is None for i, t in listed.items() if i not in (short["id"], day["id"]))


@pytest.mark.parametrize("ttl", [0, -5, MAX_TOKEN_TTL_S + 1, "30d", 1.5])
def test_an_invalid_ttl_is_422(app_client, make_token, ttl):
    body = {"name": "x", "role": "viewer", "ttl_s": ttl}
    r = app_client.post("/api/v1/admin/tokens", json=body, headers=bearer(make_token("admin")))
    assert r.status_code == 422, r.text


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("90s", 90),
        ("15m", 900),
        ("12h", 43200),
        ("30d", 2592000),
        ("3600", 3600),
        ("7D", 604800),
        (" 1h ", 3600),
    ],
)
def test_ttl_syntax(text, seconds):
    assert parse_ttl(text) == seconds


@pytest.mark.parametrize("text", ["", "0", "0d", "-1d", "1w", "1.5h", "h", "30 d", "\uff13\uff10d", "3651d"])
def test_ttl_syntax_refused(text):
    with pytest.raises(ValueError, match="invalid TTL"):
        parse_ttl(text)


def _fleet(data_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEET_")}
    env.update(FLEET_DATA_DIR=str(data_dir), COLUMNS="200")
    return subprocess.run([FLEET, *args], capture_output=True, text=True, env=env, timeout=120)


def test_cli_token_create_with_ttl_and_list(tmp_path):
    data = tmp_path / "data"
    proc = _fleet(data, "admin", "token", "create", "--role", "admin", "--name", "month", "--ttl", "30d")
    assert proc.returncode == 0, proc.stderr
    token = proc.stdout.strip()
    proc = _fleet(data, "admin", "token", "create", "--role", "viewer", "--name", "forever")
    assert proc.returncode == 0, proc.stderr
    proc = _fleet(data, "admin", "token", "create", "--role", "viewer", "--ttl", "30x")
    assert proc.returncode == 2
    assert "invalid TTL '30x'" in proc.stderr

    settings = Settings(data_dir=data, mqtt_enabled=False, rollout_engine=False, gc_tuning=False)
    with TestClient(create_app(settings)) as client:
        assert client.get("/api/v1/devices", headers=bearer(token)).status_code == 200
        listed = {t["name"]: t for t in client.get("/api/v1/admin/tokens", headers=bearer(token)).json()}
    expires = datetime.fromisoformat(listed["month"]["expires_at"])
    assert expires - datetime.fromisoformat(listed["month"]["created_at"]) == timedelta(days=30)
    assert listed["forever"]["expires_at"] is None

    proc = _fleet(data, "admin", "token", "list")
    assert proc.returncode == 0, proc.stderr
    rows = {line.split("│")[2].strip(): line for line in proc.stdout.splitlines() if line.count("│") >= 6}
    assert f"{expires:%Y-%m-%d %H:%M}" in rows["month"]
    assert "never" in rows["forever"]
