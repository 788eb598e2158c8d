"""Fixtures for device tests: extracted model slots built from real ONNX models."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from device_client.protocol.bundle import extract_bundle
from tests.helpers.bundles import make_bundle


@pytest.fixture
def make_slot(tmp_path: Path) -> Callable[..., Path]:
    """``make_slot(version="1.0.0", **make_bundle kwargs)`` -> an extracted slot directory."""
    counter = iter(range(10_000))

    def build(version: str = "1.0.0", **kwargs) -> Path:
        n = next(counter)
        tar, _ = make_bundle(tmp_path / f"bundles{n}", version=version, **kwargs)
        dest = tmp_path / "slots" / f"{n}-{version}"
        extract_bundle(tar, dest)
        return dest

    return build
