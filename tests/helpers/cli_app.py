"""`fleet ...` run in-process against a test's app: the CLI's own FleetClient over the TestClient's
ASGI transport (no uvicorn, no broker), its output flattened to words."""

from __future__ import annotations

import re
from collections.abc import Callable

import pytest
from click.testing import CliRunner

from server.cli import common, main
from server.client import FleetClient

#: rich's table borders, removed from the output
BOX = re.compile("[\u2500-\u257f]")


def cli_against(app_client, monkeypatch: pytest.MonkeyPatch, token: str) -> Callable[..., str]:
    """``run(*args, code=0)``: run `fleet *args` with ``token``, assert its exit code, and return
    its output as words (rich's wrapping and table borders removed)."""
    transport = app_client._transport  # the real app, in-process
    monkeypatch.setattr(
        common,
        "api_client",
        lambda url, token, **kw: FleetClient("http://testserver", token, transport=transport),
    )
    env = {"FLEET_TOKEN": token, "COLUMNS": "200"}

    def run(*args: str, code: int = 0) -> str:
        result = CliRunner().invoke(main, list(args), env=env, catch_exceptions=False)
        assert result.exit_code == code, result.output
        return " ".join(BOX.sub(" ", result.output).split())

    return run
