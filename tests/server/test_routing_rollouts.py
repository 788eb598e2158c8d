"""Rollouts that carry a routing policy: checked against the catalog at creation (a 422 that
creates nothing), carried inside every director-signed DesiredState the rollout issues (and
re-signs), a rollout of the policy alone on the version the devices run, and a rollback that
restores the policy each device held before (or none). Simulated devices
(tests/helpers/fleet_sim.py) through the real ingest, the real engine and API."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa
from onnx import TensorProto, helper, numpy_helper

from device_client.protocol import DesiredState
from device_client.protocol.messages import utcnow
from device_client.protocol.routing import parse_routing_policy
from device_client.trust import verify_desired
from server.admin.tables import AuditEntry
from server.client import FleetClient
from server.rollouts.desired import DesiredStateService
from server.rollouts.engine import RolloutEngine
from server.rollouts.tables import Deployment, DesiredRecord, Rollout
from tests.helpers.fleet_sim import Behaviour, SimFleet
from tests.helpers.rollout_lab import drive, make_lab, rollout_body
from tests.helpers.routing_models import _save, split_pair

#: the lab's det model: x [N, 4] -> y [N, 3]; the cloud model det-cloud takes and gives the same
POLICY = {
    "mode": "prefer_edge",
    "confidence": {"output": "y", "kind": "max_prob", "softmax": True, "threshold": 0.6},
    "cloud": {"endpoint": "fleet", "model": "det-cloud", "timeout_ms": 500},
    "audit_rate": 0.05,
}


def policy(threshold: float = 0.6, **over) -> dict:
    return {**POLICY, "confidence": {**POLICY["confidence"], "threshold": threshold}, **over}


def push_file(client, headers, name: str, version: str, path: Path) -> None:
    with open(path, "rb") as fh:
        r = client.post(
            f"/api/v1/models/{name}/versions",
            data={"version": version},
            files={"file": ("m.onnx", fh, "application/octet-stream")},
            headers=headers,
        )
    assert r.status_code == 201, r.text


def cloud_head(path: Path, *, features: int = 5, dtype: int = TensorProto.FLOAT) -> Path:
    """A cloud head taking ``features`` [N, features] of ``dtype`` to ``probs`` [N, 3]."""
    b = numpy_helper.from_array(np.ones((features, 3), np.float32), "B")
    nodes = [
        helper.make_node("Cast", ["features"], ["f"], to=TensorProto.FLOAT),
        helper.make_node("MatMul", ["f", "B"], ["z"]),
        helper.make_node("Softmax", ["z"], ["probs"], axis=-1),
    ]
    graph = helper.make_graph(
        nodes,
        "head", [helper.make_tensor_value_info("features", dtype, ["N", features])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", 3])], initializer=[b],
    )  # fmt: skip
    return _save(graph, path)


@pytest.fixture
def lab(app_client, admin_headers, ctx, onnx_model, tmp_path) -> SimFleet:
    """Ten devices serving det 1.0.0 (2.0.0 published), the cloud model det-cloud 1.0.0, and a
    split pair: edge ``split`` (x -> emb [N, 5], logits [N, 3]) with cloud heads ``head``
    (features float32 [N, 5]), ``head-wide`` ([N, 6]) and ``head-f64`` (float64)."""
    fleet = make_lab(app_client, admin_headers, ctx, onnx_model)
    push_file(app_client, admin_headers, "det-cloud", "1.0.0", onnx_model("cloud.onnx", seed=7))
    edge, head = split_pair(tmp_path / "split")
    push_file(app_client, admin_headers, "split", "1.0.0", edge)
    push_file(app_client, admin_headers, "head", "1.0.0", head)
    push_file(app_client, admin_headers, "head-wide", "1.0.0", cloud_head(tmp_path / "wide.onnx", features=6))
    push_file(
        app_client,
        admin_headers,
        "head-f64",
        "1.0.0",
        cloud_head(tmp_path / "f64.onnx", dtype=TensorProto.DOUBLE),
    )
    return fleet


def create(client, headers, version: str = "2.0.0", **over):
    return client.post("/api/v1/rollouts", json=rollout_body(version, **over), headers=headers)


def created_nothing(ctx) -> bool:
    with ctx.db.session_scope() as s:
        rollouts = s.scalar(sa.select(sa.func.count()).select_from(Rollout))
        deployments = s.scalar(sa.select(sa.func.count()).select_from(Deployment))
        audits = s.scalar(
            sa.select(sa.func.count()).select_from(AuditEntry).where(AuditEntry.action == "rollout.create")
        )
    return (rollouts, deployments, audits) == (0, 0, 0)


def signed_states(ctx, device_ids) -> dict[str, DesiredState]:
    """Each device's DesiredState as the device itself accepts it (director signature, address)."""
    director = ctx.director.key.public_key()
    with ctx.db.session_scope() as s:
        records = s.scalars(
            sa.select(DesiredRecord).where(DesiredRecord.device_id.in_(list(device_ids)))
        ).all()
        envelopes = {r.device_id: json.dumps(r.envelope).encode() for r in records}
    return {d: verify_desired(env, [director], d, 0, utcnow()) for d, env in envelopes.items()}


SPLIT = {
    "mode": "prefer_edge",
    "confidence": {"output": "logits", "softmax": True, "threshold": 0.7},
    "cloud": {"model": "head", "send": "emb", "inputs": {"emb": "features"}, "outputs": {"logits": "probs"}},
}


@pytest.mark.parametrize(
    ("model", "routing"),
    [("det", POLICY), ("split", SPLIT), ("det", {"mode": "edge_only"}),
     ("det", policy(cloud={"endpoint": "https://triton.example:8000", "model": "resnet", "version": "3"}))],
    ids=["fleet-cloud", "split-inference", "edge-only", "external-https"],
)  # fmt: skip
def test_a_good_policy_is_signed_into_every_desired_state(
    app_client, admin_headers, ctx, lab, model, routing
):
    version = "2.0.0" if model == "det" else "1.0.0"
    r = create(app_client, admin_headers, version, model=model, routing=routing,
               stages=[{"percent": 100, "soak_s": 0}])  # fmt: skip
    assert r.status_code == 201, r.text
    expected = parse_routing_policy(routing)
    assert r.json()["routing"] == expected.to_dict()
    RolloutEngine(ctx).tick()
    states = signed_states(ctx, lab.devices)
    assert len(states) == 10
    assert all(s.routing == expected and (s.model, s.version) == (model, version) for s in states.values())


def bad(model: str, routing, detail: str, gates: dict | None = None, *, id: str):
    return pytest.param(model, routing, gates or {}, detail, id=id)


NO_INPUT = "the edge model's input 'x' goes to input 'x', which cloud model head 1.0.0 does not have"
NEEDS_CLOUD = "min_cloud_agreement needs a routing policy that asks the cloud"
SPLIT_CLOUD = SPLIT["cloud"]


@pytest.mark.parametrize(
    ("model", "routing", "gates", "detail"),
    [
        bad("det", {"mode": "sometimes"}, "routing policy: mode: Input should be", id="mode"),
        bad("det", {**POLICY, "colour": "red"}, "routing policy: colour: Extra inputs", id="unknown-field"),
        bad("det", [1, 2], "Input should be a valid dictionary", id="not-an-object"),
        bad("det", policy(1.5), "threshold 1.5 is out of range for max_prob: must be in [0, 1]",
            id="threshold"),
        bad("det", policy(cloud={"model": "nope"}), "cloud.model 'nope' is not in the catalog",
            id="cloud-model"),
        bad(
            "det", policy(cloud={"model": "det-cloud", "version": "9.9.9"}),
            "cloud model 'det-cloud' has no version '9.9.9'", id="cloud-version",
        ),
        bad(
            "det", policy(cloud={"endpoint": "http://triton.example", "model": "resnet"}),
            "endpoint must be 'fleet' or an https:// URL, got 'http://triton.example'", id="http-endpoint",
        ),
        bad(
            "det", policy(confidence={"output": "probs", "threshold": 0.5}),
            "confidence.output 'probs' is not an output of det 2.0.0 (its outputs: y)",
            id="confidence-output",
        ),
        bad(
            "det", policy(cloud={"model": "head", "send": "emb", "outputs": {"y": "probs"}}),
            "cloud.send 'emb' is not an output of det 2.0.0 (its outputs: y)", id="send-missing-output",
        ),
        bad(
            "split", {**SPLIT, "cloud": {**SPLIT_CLOUD, "model": "head-wide"}},
            "the edge output 'emb' is float32[?, 5], but input 'features' of cloud model head-wide 1.0.0 "
            "takes float32[?, 6]", id="send-shape",
        ),
        bad(
            "split", {**SPLIT, "cloud": {**SPLIT_CLOUD, "model": "head-f64"}},
            "the edge output 'emb' is float32[?, 5], but input 'features' of cloud model head-f64 1.0.0 "
            "takes float64[?, 5]", id="send-dtype",
        ),
        bad(
            "split", {**SPLIT, "cloud": {**SPLIT_CLOUD, "inputs": {}}},
            "the edge output 'emb' goes to input 'emb', which cloud model head 1.0.0 does not have",
            id="send-name",
        ),
        bad("det", policy(cloud={"model": "head"}), NO_INPUT, id="input-name"),
        bad("det", None, NEEDS_CLOUD, {"min_cloud_agreement": 0.9}, id="cloud-agreement-no-policy"),
        bad("det", {"mode": "edge_only"}, NEEDS_CLOUD, {"min_cloud_agreement": 0.9},
            id="cloud-agreement-edge"),
    ],
)  # fmt: skip
def test_a_bad_policy_is_refused_and_nothing_is_created(
    app_client, admin_headers, ctx, lab, model, routing, gates, detail
):
    version = "2.0.0" if model == "det" else "1.0.0"
    r = create(app_client, admin_headers, version, model=model, routing=routing, gates=gates)
    assert r.status_code == 422, r.text
    assert (
        detail in json.dumps(r.json()["detail"])
        if isinstance(r.json()["detail"], list)
        else detail in r.json()["detail"]
    )
    assert created_nothing(ctx)


def test_a_revoked_cloud_version_is_refused(app_client, admin_headers, ctx, lab, onnx_model):
    push_file(app_client, admin_headers, "det-cloud", "2.0.0", onnx_model("cloud2.onnx", seed=8))
    assert (
        app_client.delete("/api/v1/models/det-cloud/versions/2.0.0", headers=admin_headers).status_code == 200
    )
    r = create(app_client, admin_headers, routing=policy(cloud={"model": "det-cloud", "version": "2.0.0"}))
    assert r.status_code == 422
    assert r.json()["detail"] == "routing policy: cloud model 'det-cloud' 2.0.0 is revoked, not active"
    # "its active version": the highest release still active, 1.0.0
    assert create(app_client, admin_headers, routing=POLICY).status_code == 201


def test_escalation_gates_without_a_policy_warn(app_client, admin_headers, ctx, lab):
    r = create(app_client, admin_headers, gates={"max_escalation_rate": 0.3})
    assert r.status_code == 201, r.text
    assert (
        "max_escalation_rate will not be judged: the rollout carries no routing policy, so its devices "
        "report no escalations"
    ) in r.json()["warnings"]


def test_a_re_signed_desired_state_keeps_the_policy(app_client, admin_headers, ctx, lab):
    r = create(app_client, admin_headers, routing=POLICY, stages=[{"percent": 100, "soak_s": 0}])
    assert r.status_code == 201, r.text
    RolloutEngine(ctx).tick()
    device = sorted(lab.devices)[0]
    first = signed_states(ctx, [device])[device]
    with ctx.db.session_scope() as s:  # about to expire
        s.get(DesiredRecord, device).expires_at = utcnow() + timedelta(seconds=1)
    with ctx.db.session_scope() as s:
        assert DesiredStateService(s, ctx).resign_expiring_ids([device]) == 1
    again = signed_states(ctx, [device])[device]
    assert again.seq == first.seq + 1
    assert again.routing == parse_routing_policy(POLICY)


def escalating(rates: dict[float | None, float]):
    """Devices escalate by the threshold of the policy they hold (None: no policy, no routing)."""

    def behaviour(version: str, routing: dict | None) -> Behaviour | None:
        threshold = None if routing is None else routing["confidence"]["threshold"]
        rate = rates.get(threshold)
        return None if rate is None else Behaviour(escalation_rate=rate, cloud_agreement=0.95)

    return behaviour


def test_a_rollout_of_the_policy_alone(app_client, admin_headers, ctx, lab):
    """The version the devices run, with a policy: the same stages and gates, judged against the
    same devices' windows of that version before it (without a policy: no baseline rate)."""
    lab.by_policy = escalating({0.6: 0.2})
    gates = {"max_escalation_rate": 0.3, "max_escalation_ratio": 1.5, "max_p95_ratio": 1.5}
    r = create(app_client, admin_headers, "1.0.0", routing=POLICY, gates=gates)
    assert r.status_code == 201, r.text
    assert not [w for w in r.json()["warnings"] if "routing" in w or "escalation" in w]
    final = drive(RolloutEngine(ctx), lab, app_client, admin_headers, r.json()["id"])
    assert (final["status"], final["phases"]) == ("completed", {"succeeded": 10}), final["reason"]
    numbers = final["verdict"]["numbers"]
    assert (numbers["escalation_rate"], numbers["baseline_escalation_rate"]) == (0.2, None)
    assert numbers["p95_ratio"] == 1.0  # against the devices' own 1.0.0 windows
    states = signed_states(ctx, lab.devices)
    assert {(s.version, s.routing == parse_routing_policy(POLICY)) for s in states.values()} == {
        ("1.0.0", True)
    }
    assert final["stage_views"][-1]["health"]["escalation_rate"] == pytest.approx(0.2)


def test_a_rollback_restores_the_policy_each_device_held(app_client, admin_headers, ctx, lab):
    """2.0.0 goes out with policy A (threshold 0.6); then a policy-only rollout of B (threshold 0.9)
    escalates six times as often as the same devices did under A: it rolls back, and every
    device's signed DesiredState names 2.0.0 with policy A again."""
    lab.by_policy = escalating({0.6: 0.1, 0.9: 0.6})
    engine = RolloutEngine(ctx)
    first = create(app_client, admin_headers, routing=POLICY, stages=[{"percent": 100, "soak_s": 0}])
    assert drive(engine, lab, app_client, admin_headers, first.json()["id"])["status"] == "completed"
    second = create(app_client, admin_headers, routing=policy(0.9), gates={"max_escalation_ratio": 2.0},
                    stages=[{"percent": 50, "soak_s": 0}, {"percent": 100, "soak_s": 0}])  # fmt: skip
    assert second.status_code == 201, second.text
    final = drive(engine, lab, app_client, admin_headers, second.json()["id"])
    assert final["status"] == "rolled_back", final["reason"]
    numbers = final["verdict"]["numbers"]
    assert (numbers["escalation_rate"], numbers["baseline_escalation_rate"], numbers["escalation_ratio"]) == (
        0.6, 0.1, 6.0,
    )  # fmt: skip
    assert "escalation rate 6.00x the same devices' baseline > 2.0x" in final["reason"]
    states = signed_states(ctx, lab.devices)
    assert all(s.version == "2.0.0" and s.routing == parse_routing_policy(POLICY) for s in states.values())
    assert {dev.routing["confidence"]["threshold"] for dev in lab.devices.values()} == {0.6}


def test_a_rollback_to_no_policy(app_client, admin_headers, ctx, lab):
    """Devices that ran without a policy get a DesiredState without one back."""
    lab.by_policy = escalating({0.9: 0.6})
    r = create(app_client, admin_headers, routing=policy(0.9), gates={"max_escalation_rate": 0.3},
               stages=[{"percent": 100, "soak_s": 0}])  # fmt: skip
    final = drive(RolloutEngine(ctx), lab, app_client, admin_headers, r.json()["id"])
    assert final["status"] == "rolled_back"
    assert final["reason"] == "stage 1 gates failed: escalation rate 0.6000 > 0.3"
    states = signed_states(ctx, lab.devices)
    assert {(s.version, s.routing) for s in states.values()} == {("1.0.0", None)}


def test_a_rollout_without_a_policy_warns_devices_that_hold_one(app_client, admin_headers, ctx, lab):
    engine = RolloutEngine(ctx)
    first = create(app_client, admin_headers, routing=POLICY, stages=[{"percent": 100, "soak_s": 0}])
    assert drive(engine, lab, app_client, admin_headers, first.json()["id"])["status"] == "completed"
    r = create(app_client, admin_headers, "1.0.0")
    assert r.status_code == 201
    assert (
        "10 of the selected devices run under a routing policy and this rollout carries none: they will "
        "answer at the edge alone (give the policy again to keep it)"
    ) in r.json()["warnings"]


def test_the_client_sends_a_policy(app_client, make_token, ctx, lab):
    client = FleetClient("http://testserver", make_token("operator"), transport=app_client._transport)
    state = client.create_rollout(rollout_body("2.0.0"), routing=POLICY)
    assert state["routing"] == parse_routing_policy(POLICY).to_dict()
    assert client.get_rollout(state["id"])["routing"] == state["routing"]
