"""Fuzz tests run on SQLite only: they probe input handling, not the database backend."""

from __future__ import annotations

import pytest


@pytest.fixture
def database_url(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'fleet.db'}"
