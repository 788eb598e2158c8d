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


@pytest.mark.parametrize("host", ["", "   "])
def test_an_empty_host_is_refused(tmp_path, monkeypatch, host: str) -> None:
    # uvicorn binds "" to every interface, so it must not count as loopback (public_url http://:8080)
    monkeypatch.setenv("FLEET_HOST", host)
    with pytest.raises(ValidationError, match=r"must not be empty .*0\.0\.0\.0 \(all interfaces\)"):
        Settings(data_dir=tmp_path)


def test_empty_host_is_not_loopback_even_unvalidated() -> None:
    assert not Settings.model_construct(host="").is_loopback


@pytest.mark.parametrize(
    ("host", "loopback", "public_url"),
    [
        ("127.0.0.1", True, "http://127.0.0.1:8080"),
        ("localhost", True, "http://localhost:8080"),
        ("LocalHost", True, "http://LocalHost:8080"),
        ("::1", True, "http://[::1]:8080"),
        (" 127.0.0.2 ", True, "http://127.0.0.2:8080"),
        ("0.0.0.0", False, "http://0.0.0.0:8080"),
        ("::", False, "http://[::]:8080"),
        ("fleet.example", False, "http://fleet.example:8080"),
    ],
)
def test_loopback_hosts_and_the_default_public_url(
    tmp_path, host: str, loopback: bool, public_url: str
) -> None:
    s = Settings(data_dir=tmp_path, host=host)
    assert s.is_loopback is loopback
    assert s.public_url == public_url
