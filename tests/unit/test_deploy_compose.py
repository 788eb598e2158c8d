"""docker-compose.yml and deploy/nginx.conf agree (no Docker engine runs the stack here): the cloud
tier runs as two replicas behind the load balancer's port 8600, and the servers start none of
their own."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")

ROOT = Path(__file__).resolve().parents[2]


def test_the_cloud_tier_runs_twice_behind_nginx():
    services = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    nginx = (ROOT / "deploy" / "nginx.conf").read_text()
    cloud = services["cloud"]
    assert cloud["deploy"]["replicas"] == 2
    port = cloud["environment"]["FLEET_CLOUD_PORT"]
    assert re.search(rf"upstream cloud \{{ server cloud:{port}; \}}", nginx)
    assert re.search(r"listen 8600;[^}]*location /v2/ \{\s*proxy_pass http://cloud;", nginx, re.S)
    assert "8600:8600" in services["lb"]["ports"]
    assert "cloud" in services["lb"]["depends_on"]
    for name in ("server1", "server2"):
        env = services[name]["environment"]
        assert env["FLEET_CLOUD_EMBEDDED"] == "false"
        assert env["FLEET_CLOUD_PUBLIC_URL"] == "http://lb:8600"
    assert "/shared/cloud.token" in (ROOT / "deploy" / "init.sh").read_text()
