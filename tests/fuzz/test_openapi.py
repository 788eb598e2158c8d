"""schemathesis against the server's own OpenAPI schema, in process, with an admin token.

protection: request validation and the error handlers (``server.http``) turn every bad input into
a documented 4xx, and routes answer what their ``response_model`` declares. A route that crashes
on a generated input (5xx) or answers outside its schema fails here. One test per operation; the
examples are derandomized and few, so the run is repeatable and quick.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import response_schema_conformance

from tests.helpers.tokens import create_admin_token

#: generated examples per operation (36 operations: about 10 s)
EXAMPLES = 12


def _settings(tmp: Path):
    from server.config import Settings

    return Settings(
        data_dir=tmp / "data",
        database_url=f"sqlite:///{tmp / 'fleet.db'}",
        public_url="http://testserver",
        max_upload_bytes=256 * 1024,
        metadata_refresh_interval_s=3600,
        mqtt_enabled=False,
        rollout_engine=False,
    )


def _load_schema() -> Any:
    from server.app import create_app

    with tempfile.TemporaryDirectory() as tmp:  # the schema needs no lifespan, nothing is written
        return schemathesis.openapi.from_dict(create_app(_settings(Path(tmp))).openapi())


SCHEMA = _load_schema()
OPERATIONS = {op.label: op for op in (r.ok() for r in SCHEMA.get_all_operations())}


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple]:
    """(TestClient, admin headers) of one server for the whole module, its lifespan running."""
    from fastapi.testclient import TestClient

    from server.app import create_app

    with TestClient(create_app(_settings(tmp_path_factory.mktemp("openapi")))) as client:
        token = create_admin_token(client.app.state.ctx, "admin")
        yield client, {"Authorization": f"Bearer {token}"}


def _send(client, case, headers: dict[str, str]):
    kw = case.as_transport_kwargs(base_url="http://testserver", headers=headers)
    data = kw.pop("data", None)
    if isinstance(data, (bytes, str)):
        kw["content"] = data
    elif data is not None:
        kw["data"] = data
    kw.pop("allow_redirects", None)
    return client.request(**kw)


def test_the_schema_lists_the_api():
    assert len(OPERATIONS) >= 30
    assert "POST /api/v1/enroll" in OPERATIONS


@pytest.mark.parametrize("label", sorted(OPERATIONS))
def test_no_server_error_and_responses_match_the_schema(served, label):
    client, headers = served
    statuses: list[int] = []

    @given(case=OPERATIONS[label].as_strategy())
    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        derandomize=True,
        database=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    def run(case) -> None:
        response = _send(client, case, headers)
        statuses.append(response.status_code)
        case.validate_response(response, checks=[not_a_server_error, response_schema_conformance])

    run()
    assert statuses
    assert all(s < 500 for s in statuses)
