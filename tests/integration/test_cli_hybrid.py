"""`fleet rollout start ... --routing policy.json` and `fleet model accuracy NAME [--json]`: the CLI
talks HTTP to the real app in-process (the TestClient's ASGI transport under the CLI's own
FleetClient); the engine and the simulated fleet are the real ones of the rollout tests."""

from __future__ import annotations

import json
import re

import pytest

from server.rollouts.engine import RolloutEngine
from tests.helpers.cli_app import cli_against
from tests.helpers.fleet_sim import Behaviour, SimFleet
from tests.helpers.rollout_lab import drive, make_lab

pytestmark = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
POLICY = {
    "mode": "prefer_edge",
    "confidence": {"output": "y", "softmax": True, "threshold": 0.6},
    "cloud": {"model": "det-cloud"},
}


@pytest.fixture
def lab(app_client, admin_headers, ctx, onnx_model) -> SimFleet:
    """Ten simulated devices serving det 1.0.0, 2.0.0 published, and the cloud model det-cloud;
    under a routing policy the devices escalate 25% of their requests and agree on 80%."""
    fleet = make_lab(app_client, admin_headers, ctx, onnx_model, baseline=False)
    with open(onnx_model("cloud.onnx", seed=7), "rb") as fh:
        r = app_client.post(
            "/api/v1/models/det-cloud/versions", data={"version": "1.0.0"},
            files={"file": ("m.onnx", fh, "application/octet-stream")}, headers=admin_headers,
        )  # fmt: skip
    assert r.status_code == 201, r.text
    fleet.by_policy = lambda version, routing: (
        routing and Behaviour(escalation_rate=0.25, cloud_agreement=0.8)
    )
    return fleet


@pytest.fixture
def fleet_cli(app_client, monkeypatch, make_token):
    """Run `fleet ...` against the app; returns its output as words."""
    return cli_against(app_client, monkeypatch, make_token("operator"))


def test_rollout_start_with_a_routing_policy(app_client, admin_headers, ctx, lab, fleet_cli, tmp_path):
    path = tmp_path / "policy.json"
    path.write_text(json.dumps(POLICY))
    out = fleet_cli(
        "rollout", "start", "det", "2.0.0", "--routing", str(path), "--tag", "site=lab", "--stages", "100",
        "--soak", "0", "--gate", "max_escalation_rate=0.3", "--gate", "min_cloud_agreement=0.75",
    )  # fmt: skip
    assert "routing policy: prefer_edge, cloud det-cloud (active), max_prob threshold 0.6" in out
    rid = re.search(r"rollout (\w+) started", out).group(1)
    final = drive(RolloutEngine(ctx), lab, app_client, admin_headers, rid)
    assert final["status"] == "completed", final["reason"]
    assert final["gates"]["max_escalation_rate"] == 0.3
    numbers = final["verdict"]["numbers"]
    assert (numbers["escalation_rate"], numbers["cloud_agreement"]) == (0.25, 0.8)
    out = fleet_cli("rollout", "status", rid)
    assert "routing: prefer_edge, cloud det-cloud (active), max_prob threshold 0.6" in out
    assert "escalated cloud agr." in out
    assert "25.0% 0.800" in out  # the stage's escalated share and cloud agreement


def test_a_bad_routing_policy_is_one_line(app_client, admin_headers, lab, fleet_cli, tmp_path):
    path = tmp_path / "policy.json"
    path.write_text("{not json")
    out = fleet_cli("rollout", "start", "det", "2.0.0", "--routing", str(path), "--tag", "site=lab", code=2)
    assert f"Invalid value for --routing: {path} is not a JSON file" in out
    path.write_text(json.dumps({**POLICY, "cloud": {"model": "nope"}}))
    out = fleet_cli("rollout", "start", "det", "2.0.0", "--routing", str(path), "--tag", "site=lab", code=1)
    assert out == "error: server answered 422: routing policy: cloud.model 'nope' is not in the catalog"


def test_model_accuracy(app_client, admin_headers, ctx, lab, fleet_cli):
    for device in lab.devices.values():
        device.routing = POLICY
    lab.health()
    out = fleet_cli("model", "accuracy", "det", "--bucket", "86400")
    assert "field accuracy of det since" in out
    # the total row of 1.0.0: 1,000 requests, 750 at the edge, 250 by the cloud, none from cache
    assert "1.0.0 all 1000 750 250 0 25.0% 0.800 250" in out
    data = json.loads(fleet_cli("model", "accuracy", "det", "--since", "1h", "--json"))
    assert data["bucket_s"] == 3600
    (version,) = data["versions"]
    assert (version["version"], version["escalation_rate"], version["cloud_agreement"]) == (
        "1.0.0",
        0.25,
        0.8,
    )
    assert "no health windows in that span" in fleet_cli("model", "accuracy", "det-cloud")
    out = fleet_cli("model", "accuracy", "det", "--since", "yesterday", code=2)
    assert "neither a duration (90s, 30m, 24h, 7d) nor an ISO 8601 time" in out
