"""A man in the middle at enrollment: the answer carries the TUF root, the director key, the fleet CA
and the MQTT endpoint, so whoever forges it owns the device for good.

protection: ``device_client.tlstrust`` and ``device_client.enroll.enroll`` (plain ``http://``
refused without ``--insecure-http``; the server's TLS verified against the system's CAs, a pinned
CA file or a pinned certificate fingerprint; an answer pointing the device token at a plain-HTTP
metadata URL refused), and the daemon's ``HttpSettings`` carrying the same pins for its later
requests to the server. The server is the real app under uvicorn serving HTTPS itself
(``FLEET_TLS_CERT`` / ``FLEET_TLS_KEY``).
"""

from __future__ import annotations

import hashlib
import json
import re
import ssl
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from tuf.api.exceptions import DownloadError

from device_client.daemon import Daemon
from device_client.enroll import EnrollError, enroll
from device_client.fetcher import download_resumable
from server.cli import main
from server.mqtt.broker import free_port
from server.runner import ServerThread
from tests.helpers.device_fleet import device_settings
from tests.helpers.pki import web_server_cert
from tests.helpers.tokens import create_admin_token

PLAIN_HTTP_REFUSED = "refusing plain HTTP to http://127.0.0.1:9: whoever sits on the path could hand"


class TlsServer(ServerThread):
    ca_file: Path
    cert_file: Path
    trust: ssl.SSLContext

    def enroll_token(self, uses: int = 1) -> str:
        r = httpx.post(
            f"{self.url}/api/v1/enroll-tokens", json={"uses": uses}, verify=self.trust, timeout=10,
            headers={"Authorization": f"Bearer {create_admin_token(self.ctx, 'operator')}"},
        )  # fmt: skip
        r.raise_for_status()
        return r.json()["token"]

    def fingerprint(self) -> str:
        der = x509.load_pem_x509_certificate(self.cert_file.read_bytes()).public_bytes(Encoding.DER)
        return hashlib.sha256(der).hexdigest()


def _tls_server(settings, tmp_path: Path, public_url: str | None = None) -> TlsServer:
    ca_file, cert, key = web_server_cert(tmp_path / "web")
    port = free_port()
    server = TlsServer(
        settings.model_copy(update={
            "host": "127.0.0.1", "port": port, "tls_cert": cert, "tls_key": key,
            "public_url": public_url or f"https://127.0.0.1:{port}",
        })
    )  # fmt: skip
    server.ca_file, server.cert_file = ca_file, cert
    server.trust = ssl.create_default_context(cafile=str(ca_file))
    return server.start()


@pytest.fixture
def tls_server(settings, tmp_path) -> Iterator[TlsServer]:
    (tmp_path / "web").mkdir()
    server = _tls_server(settings, tmp_path)
    yield server
    server.stop()


def test_plain_http_enrollment_is_refused_unless_allowed(tmp_path):
    """Refused before a key is made or a byte is sent: the data directory is not even created."""
    data = tmp_path / "dev"
    with pytest.raises(EnrollError, match=re.escape(PLAIN_HTTP_REFUSED)):
        enroll("http://127.0.0.1:9", "fe.x.AAAAAAAAAAAAAAAAAAAAAAAA", data, device_id="dev-a")
    assert not data.exists()
    result = CliRunner().invoke(
        main, ["device", "enroll", "--server", "http://127.0.0.1:9", "--token", "fe.x.AAAAAAAAAAAA",
               "--data-dir", str(data)],
    )  # fmt: skip
    assert result.exit_code == 1, result.output
    assert "refusing plain HTTP" in " ".join(result.output.split())
    assert not data.exists()
    # pins make no sense without TLS, even in a lab
    with pytest.raises(EnrollError, match="need an https:// server URL"):
        enroll("http://127.0.0.1:9", "fe.x.AAAAAAAAAAAAAAAAAAAAAAAA", data, insecure_http=True,
               server_fingerprint="00" * 32)  # fmt: skip
    # with --insecure-http the request is made (here: nobody listens)
    with pytest.raises(EnrollError, match=re.escape("cannot reach http://127.0.0.1:9/api/v1/enroll")):
        enroll("http://127.0.0.1:9", "fe.x.AAAAAAAAAAAAAAAAAAAAAAAA", data, insecure_http=True)


def test_a_private_certificate_is_refused_without_a_pin(tls_server, tmp_path):
    with pytest.raises(EnrollError, match="CERTIFICATE_VERIFY_FAILED"):
        enroll(tls_server.url, tls_server.enroll_token(), tmp_path / "dev", device_id="dev-a")


def test_the_pinned_fingerprint_decides(tls_server, tmp_path):
    """A wrong pin is refused in the handshake (the token is not even sent, so it stays usable);
    the right one, written as ``openssl x509 -fingerprint -sha256`` prints it, enrolls."""
    token = tls_server.enroll_token(uses=1)
    right = tls_server.fingerprint()
    wrong = hashlib.sha256(b"another certificate").hexdigest()
    refused = f"server certificate fingerprint {right} is not the pinned {wrong}"
    with pytest.raises(EnrollError, match=refused):
        enroll(tls_server.url, token, tmp_path / "dev", device_id="dev-a", server_fingerprint=wrong)
    assert not (tmp_path / "dev" / "identity.json").exists()
    openssl_style = "SHA256 Fingerprint=" + ":".join(right[i : i + 2] for i in range(0, 64, 2)).upper()
    identity = enroll(
        tls_server.url, token, tmp_path / "dev", device_id="dev-a", server_fingerprint=openssl_style
    )
    stored = json.loads((tmp_path / "dev" / "identity.json").read_text())
    assert identity.server_fingerprint == stored["server_fingerprint"] == right


def test_the_pinned_ca_file_decides(tls_server, tmp_path):
    (tmp_path / "other").mkdir()
    other_ca, _, _ = web_server_cert(tmp_path / "other")
    token = tls_server.enroll_token(uses=1)
    with pytest.raises(EnrollError, match="CERTIFICATE_VERIFY_FAILED"):
        enroll(tls_server.url, token, tmp_path / "dev", device_id="dev-b", ca_file=other_ca)
    identity = enroll(tls_server.url, token, tmp_path / "dev", device_id="dev-b", ca_file=tls_server.ca_file)
    assert identity.server_ca_file == tmp_path / "dev" / "server-ca.crt"
    assert identity.server_ca_file.read_bytes() == tls_server.ca_file.read_bytes()


def test_an_answer_sending_the_device_token_over_plain_http_is_refused(settings, tmp_path):
    (tmp_path / "web").mkdir()
    server = _tls_server(settings, tmp_path, public_url="http://127.0.0.1:1")
    try:
        with pytest.raises(EnrollError, match="the server hands out a plain-HTTP TUF metadata URL"):
            enroll(server.url, server.enroll_token(), tmp_path / "dev", ca_file=server.ca_file)
        assert not (tmp_path / "dev" / "identity.json").exists()
    finally:
        server.stop()


@pytest.mark.parametrize("pin", ["fingerprint", "ca_file"])
def test_the_daemon_talks_to_the_server_with_the_pins_of_enrollment(tls_server, tmp_path, pin):
    """Metadata (httpx) and downloads (http.client) both hold the server to the pin; a different
    fingerprint (FLEET_DEVICE_SERVER_FINGERPRINT replaces the stored one) is refused."""
    data = tmp_path / "dev"
    trust = {"server_fingerprint": tls_server.fingerprint()} if pin == "fingerprint" else {
        "ca_file": tls_server.ca_file
    }
    identity = enroll(tls_server.url, tls_server.enroll_token(), data, device_id="dev-c", **trust)
    url = f"{tls_server.url}/tuf/metadata/1.root.json"
    root = httpx.get(url, verify=tls_server.trust, timeout=10).content

    def fetch(daemon: Daemon) -> bytes:
        with daemon.http.client() as client:
            body = client.get(url, timeout=10).content
        got = download_resumable(
            url, tmp_path / f"root-{pin}.partial", expected_length=len(root),
            expected_sha256=hashlib.sha256(root).hexdigest(), max_bytes=len(root), deadline_s=10,
            http=daemon.http,
        )  # fmt: skip
        assert got.read_bytes() == body
        got.unlink()
        return body

    assert fetch(Daemon(device_settings(data), identity)) == root
    wrong = Daemon(device_settings(data, server_fingerprint="ab" * 32), identity)
    with pytest.raises(httpx.ConnectError, match="is not the pinned abab"):
        fetch(wrong)
    with pytest.raises(DownloadError, match="is not the pinned abab"):
        download_resumable(
            url, tmp_path / "x.partial", expected_length=len(root), expected_sha256="00" * 32,
            max_bytes=len(root), deadline_s=10, http=wrong.http,
        )  # fmt: skip
