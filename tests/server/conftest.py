"""Fixtures of the server tests: ``lab``, the rollout lab most rollout tests run on."""

from __future__ import annotations

import pytest

from tests.helpers.fleet_sim import Behaviour, SimFleet
from tests.helpers.rollout_lab import make_lab


@pytest.fixture
def lab(app_client, admin_headers, ctx, onnx_model) -> SimFleet:
    """Ten simulated devices (site=lab) serving det 1.0.0 with a stored baseline; 2.0.0 and 3.0.0
    published, 3.0.0 failing 30% of its requests. A module may define its own ``lab``."""
    return make_lab(
        app_client, admin_headers, ctx, onnx_model, ("1.0.0", "2.0.0", "3.0.0"),
        behaviours={"3.0.0": Behaviour(error_rate=0.3)},
    )
