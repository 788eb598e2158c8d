from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from device_client.config import DeviceSettings


def test_defaults() -> None:
    s = DeviceSettings()
    assert s.api_host == "127.0.0.1"
    assert s.api_port == 8500
    assert s.max_bundle_bytes == 1024**3
    assert s.keep_previous_warm is True
    assert s.shadow_sample_rate == 0.1
    assert s.data_dir.is_absolute()


def test_env_prefix_is_fleet_device(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("FLEET_DEVICE_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("FLEET_DEVICE_API_PORT", "0")
    monkeypatch.setenv("FLEET_DEVICE_KEEP_PREVIOUS_WARM", "false")
    monkeypatch.setenv("FLEET_API_PORT", "1234")  # the server's namespace is ignored
    s = DeviceSettings()
    assert s.data_dir == tmp_path
    assert s.api_port == 0
    assert s.keep_previous_warm is False


def test_validation() -> None:
    with pytest.raises(ValidationError):
        DeviceSettings(shadow_sample_rate=1.5)
    with pytest.raises(ValidationError, match="reconnect_max_s"):
        DeviceSettings(reconnect_min_s=10, reconnect_max_s=1)
    with pytest.raises(ValidationError, match="go together"):
        DeviceSettings(client_cert=Path("c.pem"))
