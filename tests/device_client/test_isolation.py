"""The device side needs only the `device` extra: no FastAPI, SQLAlchemy, Alembic or uvicorn, and
`device_client` never imports `server` (docs/architecture.md, "Layers and import rules")."""

from __future__ import annotations

import subprocess
import sys
import textwrap

BLOCKER = textwrap.dedent(
    """
    import importlib.abc, sys

    BLOCKED = {"fastapi", "sqlalchemy", "alembic", "uvicorn", "starlette", "psycopg"}

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            root = name.split(".")[0]
            if root in BLOCKED or (root == "server" and ALLOW_SERVER_CLI is False):
                raise ImportError(f"the device side imported {name}")
            return None

    sys.meta_path.insert(0, Block())
    """
)


def run(code: str, allow_server_cli: bool) -> subprocess.CompletedProcess[str]:
    script = f"ALLOW_SERVER_CLI = {allow_server_cli}\n" + BLOCKER + textwrap.dedent(code)
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)


def test_device_client_imports_nothing_of_the_server():
    result = run(
        """
        import device_client.daemon, device_client.cli, device_client.enroll, device_client.trust
        import device_client.api, device_client.mqtt, device_client.runtime, device_client.fetcher
        print("ok")
        """,
        allow_server_cli=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_fleet_device_commands_run_without_server_extras():
    result = run(
        """
        import sys
        from server.cli import main
        sys.argv = ["fleet", "device", "--help"]
        try:
            main()
        except SystemExit as exc:
            assert exc.code == 0, exc.code
        """,
        allow_server_cli=True,
    )
    assert result.returncode == 0, result.stderr
    assert "enroll" in result.stdout
    assert "run" in result.stdout
