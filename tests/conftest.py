"""Shared fixtures: databases (SQLite always, PostgreSQL when FLEET_TEST_POSTGRES_URL is set),
a running app with an admin token, and real ONNX model files; the plugins in ``pytest_plugins``
add a private Mosquitto and live servers (tests/README.md lists them all)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.helpers.databases import fresh_postgres_database
from tests.helpers.onnx_models import make_model
from tests.helpers.tokens import create_admin_token

pytest_plugins = ["tests.helpers.mosquitto", "tests.helpers.live_server"]

POSTGRES_URL = os.environ.get("FLEET_TEST_POSTGRES_URL", "")


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty database URL, once per backend (PostgreSQL skipped without FLEET_TEST_POSTGRES_URL)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'fleet.db'}"
        return
    if not POSTGRES_URL:
        pytest.skip("FLEET_TEST_POSTGRES_URL is not set")
    url, drop = fresh_postgres_database(POSTGRES_URL)
    try:
        yield url
    finally:
        drop()


@pytest.fixture
def settings(database_url: str, tmp_path: Path):
    from server.config import Settings

    return Settings(
        data_dir=tmp_path / "data",
        database_url=database_url,
        public_url="http://testserver",
        max_upload_bytes=4 * 1024 * 1024,
        metadata_refresh_interval_s=3600,
        mqtt_enabled=False,
        rollout_engine=False,
        gc_tuning=False,  # many apps start in one test process: no collect + freeze per app
    )


@pytest.fixture
def app_client(settings):
    """A TestClient around ``create_app(settings)`` with the lifespan running."""
    from fastapi.testclient import TestClient

    from server.app import create_app

    with TestClient(create_app(settings)) as client:
        yield client


@pytest.fixture
def ctx(app_client):
    return app_client.app.state.ctx


@pytest.fixture
def make_token(ctx) -> Callable[[str], str]:
    """Create an admin token of the given role directly in the database; return the bearer."""
    return lambda role="admin": create_admin_token(ctx, role)


@pytest.fixture
def admin_headers(make_token) -> dict[str, str]:
    return {"Authorization": f"Bearer {make_token('admin')}"}


@pytest.fixture
def onnx_model(tmp_path: Path) -> Callable[..., Path]:
    """Build a real ONNX model file: ``onnx_model(name="m.onnx", **make_model kwargs)``."""

    def build(name: str = "model.onnx", **kwargs) -> Path:
        return make_model(tmp_path / "onnx" / name, **kwargs)

    return build
