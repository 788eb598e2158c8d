"""Server settings: where devices are told to download bundles (``FLEET_TARGETS_URL``)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from server.config import Settings


def test_targets_default_to_the_servers_own_endpoint(tmp_path) -> None:
    s = Settings(data_dir=tmp_path, public_url="https://fleet.example/")
    assert s.targets_base_url == "https://fleet.example/tuf/targets/"


def test_targets_url_points_devices_at_a_mirror(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("FLEET_TARGETS_URL", "https://cdn.example/fleet/targets")
    s = Settings(data_dir=tmp_path, public_url="https://fleet.example")
    assert s.targets_base_url == "https://cdn.example/fleet/targets/"


@pytest.mark.parametrize("url", ["cdn.example/targets", "ftp://cdn.example/", "file:///srv/targets", "https://"])
def test_a_targets_url_that_is_not_http_is_refused(tmp_path, url: str) -> None:
    with pytest.raises(ValidationError, match="not an http"):
        Settings(data_dir=tmp_path, targets_url=url)
