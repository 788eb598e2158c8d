"""``fleet rollout preview`` and ``fleet rollout start --skip-unfit`` over devices no variant fits.
The CLI talks HTTP to the real app in-process (the TestClient's ASGI transport under the CLI's own
FleetClient)."""

from __future__ import annotations

import json
import re

import pytest

from tests.helpers.catalog import auth
from tests.helpers.cli_app import cli_against
from tests.helpers.cpu_flags import VNNI_ONLY, flagged_fleet, push_variant

pytestmark = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
FLAGS = {"plain-1": "avx2", "plain-2": "", "vnni-1": "avx512_vnni,avx2"}


@pytest.fixture
def fleet_cli(app_client, monkeypatch, make_token, admin_headers, ctx, onnx_model):
    """Three devices, det 1.0.0 published as a variant only vnni-1 fits, and `fleet ...` against
    the app; returns its output as words (rich's table borders removed)."""
    flagged_fleet(app_client, admin_headers, ctx, FLAGS)
    token = make_token("operator")
    r = push_variant(app_client, auth(token), onnx_model(), "vnni", VNNI_ONLY)
    assert r.status_code == 201, r.text
    return cli_against(app_client, monkeypatch, token)


def test_preview_table(fleet_cli):
    out = fleet_cli("rollout", "preview", "det", "1.0.0")
    assert "det 1.0.0: 3 selected device(s)" in out
    assert re.search(r"vnni 1 .*no variant fits 2", out), out
    assert "fit no variant: plain-1, plain-2" in out
    one = json.loads(fleet_cli("rollout", "preview", "det", "1.0.0", "--device", "vnni-1", "--json"))
    assert (one["selected"], one["variants"], one["unfit"]) == (1, {"vnni": 1}, 0)


def test_start_refused_then_skip_unfit(fleet_cli):
    out = fleet_cli("rollout", "start", "det", "1.0.0", "--stages", "100", "--soak", "0", code=1)
    assert "422" in out
    assert "2 of the 3 selected devices fit no variant of det 1.0.0" in out
    out = fleet_cli("rollout", "start", "det", "1.0.0", "--stages", "100", "--soak", "0", "--skip-unfit")
    assert "started: 1 devices in 1 stages" in out
    assert "2 selected device(s) fit no variant of det 1.0.0 and are left out" in out
    rollout_id = re.search(r"rollout (\w+) started", out).group(1)
    status = fleet_cli("rollout", "status", rollout_id)
    assert "2 selected device(s) fit no variant: left out (skip_unfit)" in status
    state = json.loads(fleet_cli("rollout", "status", rollout_id, "--json"))
    assert (state["devices"], state["unfit_skipped"], state["unfit_skipped_examples"]) == (
        1, 2, ["plain-1", "plain-2"],
    )  # fmt: skip
