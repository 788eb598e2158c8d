"""``fleet server run`` serving the API over HTTPS itself: FLEET_TLS_CERT / FLEET_TLS_KEY go to
uvicorn's ``ssl_certfile`` / ``ssl_keyfile`` (the alternative to a TLS-terminating proxy)."""

from __future__ import annotations

import ssl

import httpx
import pytest
from pydantic import ValidationError

from server.config import Settings
from server.mqtt.broker import free_port
from server.runner import ServerThread, check_bind
from tests.helpers.pki import web_server_cert


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_the_api_serves_https_with_fleet_tls_cert_and_key(settings, tmp_path):
    ca_file, cert, key = web_server_cert(tmp_path)
    assert ca_file.exists()
    port = free_port()
    live = ServerThread(
        settings.model_copy(update={"port": port, "tls_cert": cert, "tls_key": key, "host": "127.0.0.1"})
    ).start()
    try:
        assert live.url == f"https://127.0.0.1:{port}"
        trust = ssl.create_default_context(cafile=str(ca_file))
        r = httpx.get(f"{live.url}/api/v1/pki/ca.pem", verify=trust, timeout=10)
        assert r.status_code == 200
        assert r.text.startswith("-----BEGIN CERTIFICATE-----")
        with pytest.raises(httpx.HTTPError):  # and plain HTTP gets no answer on that port
            httpx.get(f"http://127.0.0.1:{port}/api/v1/pki/ca.pem", timeout=10)
    finally:
        live.stop()


def test_tls_settings_go_together_and_make_the_default_public_url_https(tmp_path, monkeypatch):
    _, cert, key = web_server_cert(tmp_path)
    monkeypatch.setenv("FLEET_TLS_CERT", str(cert))
    monkeypatch.setenv("FLEET_TLS_KEY", str(key))
    s = Settings(data_dir=tmp_path / "data", host="0.0.0.0", port=8443, allow_insecure_bind=False)
    assert (s.tls_cert, s.tls_key) == (cert, key)
    assert s.public_url == "https://0.0.0.0:8443"
    with pytest.raises(SystemExit, match="SQLite database; embedded Mosquitto") as refused:
        check_bind(s)  # still refused for its other development defaults, but not for plain HTTP
    assert "plain-HTTP" not in str(refused.value)
    monkeypatch.delenv("FLEET_TLS_KEY")
    with pytest.raises(ValidationError, match="FLEET_TLS_CERT and FLEET_TLS_KEY go together"):
        Settings(data_dir=tmp_path / "data")


def test_fleet_server_run_takes_the_tls_files_as_options(tmp_path, monkeypatch):
    """--tls-cert/--tls-key reach the settings: one without the other is refused before anything
    starts, as with the environment variables."""
    from click.testing import CliRunner

    from server.cli import main

    _, cert, _ = web_server_cert(tmp_path)
    monkeypatch.setenv("FLEET_DATA_DIR", str(tmp_path / "data"))
    result = CliRunner().invoke(main, ["server", "run", "--tls-cert", str(cert)])
    assert result.exit_code == 2, result.output
    assert "invalid settings: FLEET_TLS_CERT and FLEET_TLS_KEY go together" in " ".join(result.output.split())
