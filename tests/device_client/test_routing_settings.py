"""``FLEET_DEVICE_CLOUD_URL``: where the fleet's cloud tier is, refused where the device token
would cross the network in clear."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from device_client.config import DeviceSettings


@pytest.mark.parametrize(
    "url",
    [
        "https://cloud.example.com",
        "https://10.0.0.5:8600/base",
        "http://127.0.0.1:8600",
        "http://localhost:1",
        "http://[::1]:8600",
    ],
)
def test_https_anywhere_and_plain_http_to_this_machine_are_taken(tmp_path, url: str) -> None:
    assert DeviceSettings(data_dir=tmp_path, cloud_url=url).cloud_url == url


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("http://cloud.example.com", "plain http:// only to this machine"),
        ("http://10.0.0.5:8600", "plain http:// only to this machine"),
        ("ftp://cloud.example.com", r"must be an http\(s\) base URL"),
        ("https://", r"must be an http\(s\) base URL"),
        ("https://cloud.example.com/?x=1", r"must be an http\(s\) base URL"),
        ("https://cloud.example.com:99999", "is not a URL"),
    ],
)
def test_other_urls_are_refused(tmp_path, url: str, why: str) -> None:
    with pytest.raises(ValidationError, match=why):
        DeviceSettings(data_dir=tmp_path, cloud_url=url)


def test_unset_or_empty_means_the_enrollment_answer_decides(tmp_path, monkeypatch) -> None:
    assert DeviceSettings(data_dir=tmp_path).cloud_url is None
    monkeypatch.setenv("FLEET_DEVICE_CLOUD_URL", " ")
    assert DeviceSettings(data_dir=tmp_path).cloud_url is None
    monkeypatch.setenv("FLEET_DEVICE_CLOUD_URL", "https://cloud.example.com")
    assert DeviceSettings(data_dir=tmp_path).cloud_url == "https://cloud.example.com"
