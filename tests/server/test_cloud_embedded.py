"""The embedded cloud tier's settings: the URL devices are told, the child's environment, a taken
port refused before anything starts, and its ``/readyz`` check (the processes: tests/integration)."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from server.cloud.embedded import CloudState, child_environment, embedded_cloud_url
from server.config import Settings
from server.migrate import head_revisions
from server.readiness import check_ready
from server.runner import CloudPortInUse, prepare_embedded_cloud


def make(tmp_path: Path, **values: object) -> Settings:
    return Settings(data_dir=tmp_path / "data", **values)  # type: ignore[arg-type]


def test_devices_are_told_the_embedded_tier_on_the_public_host(tmp_path):
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    s = make(tmp_path, public_url="http://fleet.lab:8080", cloud_port=port)
    prepare_embedded_cloud(s)
    assert s.cloud_public_url == f"http://fleet.lab:{port}"
    assert embedded_cloud_url(s) == f"http://127.0.0.1:{port}"
    tls = {"cloud_tls_cert": "c", "cloud_tls_key": "k"}
    s = make(tmp_path, public_url="https://fleet.example.com", cloud_port=port, **tls)
    prepare_embedded_cloud(s)
    assert s.cloud_public_url == f"https://fleet.example.com:{port}"


def test_no_plain_http_cloud_url_beside_an_https_server(tmp_path):
    """Devices refuse an enrollment answer naming a plain-HTTP cloud tier: none is handed out."""
    s = make(tmp_path, public_url="https://fleet.example.com")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        s.cloud_port = probe.getsockname()[1]
    prepare_embedded_cloud(s)
    assert s.cloud_public_url == ""


def test_an_explicit_cloud_public_url_is_kept_and_tls_makes_it_https(tmp_path):
    s = make(tmp_path, cloud_public_url="https://cloud.example.com", cloud_tls_cert="c", cloud_tls_key="k")
    prepare_embedded_cloud(s)
    assert s.cloud_public_url == "https://cloud.example.com"
    assert embedded_cloud_url(s, public=True) == "https://127.0.0.1:8600"


def test_a_taken_cloud_port_is_refused_before_anything_starts(tmp_path):
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        s = make(tmp_path, cloud_port=squatter.getsockname()[1])
        with pytest.raises(CloudPortInUse, match="stop it, or set FLEET_CLOUD_EMBEDDED"):
            prepare_embedded_cloud(s)
    assert s.cloud_public_url == ""


def test_the_child_environment_names_this_server(tmp_path):
    s = make(tmp_path, host="0.0.0.0", port=9000, database_url="sqlite:///x.db", cloud_port=8700)
    env = child_environment(s, "fa.id.secret", base={"PATH": "/bin", "FLEET_CLOUD_TOKEN": "old"})
    assert env["PATH"] == "/bin"
    assert env["FLEET_CLOUD_TOKEN"] == "fa.id.secret"
    assert env["FLEET_DATABASE_URL"] == "sqlite:///x.db"
    assert env["FLEET_REPO_DIR"] == str(tmp_path / "data" / "repository")  # the TUF root's home
    assert env["FLEET_CLOUD_SERVER_URL"] == "http://127.0.0.1:9000"  # loopback, plain HTTP
    assert env["FLEET_CLOUD_PORT"] == "8700"
    assert "FLEET_CLOUD_TUF_ROOT" not in env


def test_the_child_reads_an_https_server_at_its_public_url_or_the_given_one(tmp_path):
    s = make(tmp_path, tls_cert="c.pem", tls_key="k.pem", public_url="https://fleet.example.com")
    assert child_environment(s, "t", base={})["FLEET_CLOUD_SERVER_URL"] == "https://fleet.example.com"
    s = make(tmp_path, cloud_server_url="http://10.0.0.5:8080", cloud_tuf_root=tmp_path / "root.json")
    env = child_environment(s, "t", base={})
    assert env["FLEET_CLOUD_SERVER_URL"] == "http://10.0.0.5:8080"
    assert env["FLEET_CLOUD_TUF_ROOT"] == str(tmp_path / "root.json")


def test_readiness_fails_on_a_child_that_does_not_run_but_not_on_one_without_models(ctx):
    heads = head_revisions()
    no_models = CloudState(running=True, live=True, detail="not loaded: clf", pid=7).as_check("u", 0)
    result = check_ready(ctx.db, heads, None, no_models)
    assert result.status == "ready"
    assert result.checks["cloud"]["ready"] is False
    down = CloudState(detail="not running: restarting").as_check("u", 1)
    result = check_ready(ctx.db, heads, None, down)
    assert (result.status, result.not_ready) == ("not_ready", ["cloud"])
    assert result.checks["cloud"]["restarts"] == 1
