"""The cloud tier's URL in the enrollment answer: the device token goes there with every
escalation, so a plain-HTTP one is refused like a plain-HTTP metadata URL, and an https one is kept
in ``identity.json`` for the daemon's routing policies.

protection: ``device_client.enroll.enroll`` (``require_https`` on ``EnrollResponse.cloud_url``
unless ``--insecure-http``), against the real app under uvicorn serving HTTPS itself.
"""

from __future__ import annotations

import json
import ssl
from pathlib import Path

import httpx
import pytest

from device_client.enroll import EnrollError, enroll
from server.mqtt.broker import free_port
from server.runner import ServerThread
from tests.helpers.pki import web_server_cert
from tests.helpers.tokens import create_admin_token


class TlsServer(ServerThread):
    """The app serving HTTPS itself, with a certificate of a private CA (``ca_file``)."""

    ca_file: Path

    def enroll_token(self) -> str:
        r = httpx.post(
            f"{self.url}/api/v1/enroll-tokens",
            json={},
            headers={"Authorization": f"Bearer {create_admin_token(self.ctx, 'operator')}"},
            verify=ssl.create_default_context(cafile=str(self.ca_file)),
            timeout=10,
        )
        r.raise_for_status()
        return r.json()["token"]


def test_a_plain_http_cloud_url_is_refused_and_an_https_one_kept(settings, tmp_path):
    (tmp_path / "web").mkdir()
    ca_file, cert, key = web_server_cert(tmp_path / "web")
    port = free_port()
    server = TlsServer(
        settings.model_copy(
            update={
                "host": "127.0.0.1",
                "port": port,
                "tls_cert": cert,
                "tls_key": key,
                "public_url": f"https://127.0.0.1:{port}",
                "cloud_public_url": "http://cloud.example.com:8600",
            }
        )
    )
    server.ca_file = ca_file
    server.start()
    try:
        with pytest.raises(
            EnrollError, match="unusable cloud tier URL in the enrollment answer: refusing plain"
        ):
            enroll(server.url, server.enroll_token(), tmp_path / "dev", device_id="dev-a", ca_file=ca_file)
        assert not (tmp_path / "dev" / "identity.json").exists()
        assert not (tmp_path / "dev" / "device.key").exists()

        server.ctx.settings.cloud_public_url = "https://cloud.example.com:8600/"
        identity = enroll(
            server.url, server.enroll_token(), tmp_path / "dev", device_id="dev-b", ca_file=ca_file
        )
        assert identity.cloud_url == "https://cloud.example.com:8600"
        stored = json.loads((tmp_path / "dev" / "identity.json").read_text())
        assert stored["cloud_url"] == "https://cloud.example.com:8600"
    finally:
        server.stop()
