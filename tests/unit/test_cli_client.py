"""The `fleet` CLI and FleetClient when the server does not answer: clean errors, and timeouts."""

from __future__ import annotations

import socket
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner

from server.cli import common, main
from server.client import CONNECT_TIMEOUT_S, DEFAULT_TIMEOUT_S, UPLOAD_TIMEOUT_S, FleetClient


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"  # nothing listens: connection refused


def invoke(args: list[str]):
    # catch_exceptions=False: an exception escaping the command fails the test with its traceback
    return CliRunner().invoke(main, args, env={"FLEET_TOKEN": "fa.x.y"}, catch_exceptions=False)


@pytest.mark.parametrize(
    "args",
    [
        ["devices", "ls"],
        ["rollout", "ls"],
        ["enroll-token", "create"],
        ["model", "ls"],
    ],
)
def test_connection_refused_is_a_clean_one_line_error(args):
    result = invoke([*args, "--url", closed_port_url()])
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    text = " ".join(result.output.split())  # rich wraps at the terminal width
    method = "GET" if args[-1] == "ls" else "POST"
    assert text.startswith(f"error: request failed ({method} http://127.0.0.1:"), text
    assert text.endswith("Connection refused"), text


def test_unsupported_url_scheme_is_a_clean_error():
    result = invoke(["devices", "ls", "--url", "ftp://example.invalid"])
    assert result.exit_code == 1
    assert " ".join(result.output.split()).startswith("error: request failed (GET ftp://example.invalid/")


def test_read_timeout_is_a_clean_error(monkeypatch):
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("timed out", request=request)

    transport = httpx.MockTransport(handler)
    monkeypatch.setattr(
        common, "api_client", lambda url, token, **kw: FleetClient(url, token, transport=transport)
    )
    result = invoke(["devices", "ls"])
    assert result.exit_code == 1
    assert "Traceback" not in result.output
    text = " ".join(result.output.split())
    assert text == "error: timed out (GET http://127.0.0.1:8080/api/v1/devices?limit=100): timed out"


def _recording_client(seen: list[httpx.Request], **options) -> FleetClient:
    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if request.method == "POST":
            return httpx.Response(201, json={"release": 1, "artifacts": []})
        return httpx.Response(200, json={"items": [], "next_cursor": None})

    return FleetClient("http://fleet.test", "fa.x.y", transport=httpx.MockTransport(handler), **options)


def test_uploads_get_a_long_read_write_timeout_and_a_short_connect(tmp_path: Path):
    model = tmp_path / "m.onnx"
    model.write_bytes(b"x" * 1000)
    seen: list[httpx.Request] = []
    with _recording_client(seen) as client:
        client.list_devices()
        client.push_model("m", "1.0.0", model)
    ordinary, upload = (r.extensions["timeout"] for r in seen)
    assert ordinary["connect"] == CONNECT_TIMEOUT_S
    assert ordinary["read"] == ordinary["write"] == DEFAULT_TIMEOUT_S
    assert upload["connect"] == CONNECT_TIMEOUT_S
    assert upload["read"] == upload["write"] == UPLOAD_TIMEOUT_S >= 30 * 60


def test_model_push_timeout_option(tmp_path: Path, monkeypatch):
    model = tmp_path / "m.onnx"
    model.write_bytes(b"x" * 1000)
    seen: list[httpx.Request] = []
    monkeypatch.setattr(common, "api_client", lambda url, token, **kw: _recording_client(seen, **kw))
    result = invoke(["model", "push", "m", "1.0.0", str(model), "--timeout", "7200"])
    assert result.exit_code == 0, result.output
    assert "published m 1.0.0 (release 1)" in result.output
    timeout = seen[0].extensions["timeout"]
    assert (timeout["read"], timeout["write"], timeout["connect"]) == (7200, 7200, CONNECT_TIMEOUT_S)


@pytest.mark.parametrize(
    ("tags", "message"),
    [
        ("nocolon", "error: invalid tag 'nocolon': expected key:value or key=value"),
        ("site=lab,=x", "error: invalid tag key '': lowercase letters, digits, '_', '.', '-'; max 63"),
        ("Site=lab", "error: invalid tag key 'Site': lowercase letters, digits, '_', '.', '-'; max 63"),
        ("site=", "error: invalid tag value '' for 'site': letters, digits, '_.:/-'; max 128"),
        ("site=[lab]", "error: invalid tag value '[lab]' for 'site': letters, digits, '_.:/-'; max 128"),
    ],
)
def test_enroll_token_bad_tags_are_a_one_line_error_before_any_request(tags, message):
    # nothing listens at the URL: a request would end in "request failed", not the tag error
    result = invoke(["enroll-token", "create", "--url", closed_port_url(), "--tags", tags])
    assert result.exit_code == 2, result.output
    assert result.output.count("\n") == 1, result.output  # one line (rich wraps only past 80 columns)
    assert result.output.strip() == message
