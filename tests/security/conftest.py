"""Fixtures of the adversarial suite: one device under attack per test module
(tests/helpers/testbed.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.helpers.testbed import Testbed, running_testbed


@pytest.fixture(scope="module")
def tb(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Testbed]:
    """One testbed per module; a module may set ``TESTBED_SETTINGS`` (daemon settings overrides)."""
    settings = getattr(request.module, "TESTBED_SETTINGS", {})
    with running_testbed(tmp_path_factory.mktemp("testbed"), **settings) as bed:
        yield bed


@pytest.fixture
def device(tb: Testbed) -> Iterator[Testbed]:
    """The device under attack; after the test the mirror tells the truth again and the device
    must still serve its baseline model with no update in flight."""
    tb.assert_serving("2.0.0")
    yield tb
    tb.mirror.truth()
    tb.assert_serving("2.0.0")


@pytest.fixture
def database_url(tmp_path) -> str:
    """The security suite runs on SQLite only (the trust checks do not depend on the database)."""
    return f"sqlite:///{tmp_path / 'fleet.db'}"
