"""The routing policy: what parses, what is refused and why, and that it travels inside the
signed DesiredState (a malformed one makes the whole DesiredState malformed)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from device_client.protocol import DesiredState, InvalidPayload, parse_payload
from device_client.protocol.routing import (
    ROUTING_SCHEMA,
    ConfidenceKind,
    RoutingMode,
    RoutingPolicy,
    parse_routing_policy,
)
from device_client.protocol.signing import sign_envelope
from device_client.trust import BadSignature, Malformed, verify_desired

X = "https://x.example.com"
PEM = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"


def policy(**over) -> dict:
    doc = {
        "schema": ROUTING_SCHEMA,
        "mode": "prefer_edge",
        "confidence": {"output": "logits", "kind": "max_prob", "softmax": True, "threshold": 0.8},
        "cloud": {"endpoint": "fleet", "model": "digits-large", "version": "2.1.0", "timeout_ms": 300},
    }
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(doc.get(key), dict):
            doc[key] = {**doc[key], **value}
        elif value is None:
            doc.pop(key, None)
        else:
            doc[key] = value
    return doc


def refused(doc, needle: str) -> None:
    with pytest.raises(InvalidPayload) as info:
        parse_routing_policy(doc)
    assert needle in str(info.value), str(info.value)


def test_a_full_policy_parses_and_round_trips():
    doc = policy(
        budget={"per_minute": 30, "burst": 5},
        audit_rate=0.02,
        breaker={"failures": 3, "open_s": 10, "probes": 2},
        cache={"max_bytes": 1 << 20, "ttl_s": 600},
        collect={"enabled": True, "sample_rate": 0.5, "max_bytes": 1 << 30},
        agreement={"rtol": 0.1, "atol": 0.01},
    )
    p = parse_routing_policy(json.dumps(doc))
    assert p.mode is RoutingMode.prefer_edge
    assert p.confidence.kind is ConfidenceKind.max_prob
    c = p.cloud
    assert (c.model, c.version, c.timeout_ms, c.send) == ("digits-large", "2.1.0", 300, "input")
    assert (p.budget.per_minute, p.budget.burst, p.breaker.probes, p.cache.ttl_s) == (30, 5, 2, 600)
    assert parse_routing_policy(p.to_dict()) == p
    assert p.to_dict()["schema"] == ROUTING_SCHEMA


def test_defaults_and_minimal_policies():
    assert parse_routing_policy({"mode": "edge_only"}).cloud is None
    p = parse_routing_policy({"mode": "prefer_cloud", "cloud": {"model": "big"}})
    assert (p.cloud.endpoint, p.cloud.version, p.cloud.timeout_ms) == ("fleet", None, 1000)
    assert (p.audit_rate, p.collect.enabled, p.cache.max_bytes > 0) == (0.0, False, True)
    assert parse_routing_policy({"mode": "cloud_only", "cloud": {"model": "big"}}).confidence is None


def test_an_external_endpoint_with_its_ca_and_a_credential_reference():
    p = parse_routing_policy(
        policy(
            cloud={
                "endpoint": "https://triton.example.com:8443/base",
                "model": "resnet50_onnx",
                "version": "3",
                "ca_pem": PEM,
                "credential": {"header": "Authorization", "prefix": "Bearer ", "secret": "triton-token"},
            }
        )
    )
    assert not p.cloud.is_fleet
    assert p.cloud.credential.secret == "triton-token"
    p2 = parse_routing_policy(
        policy(
            cloud={
                "endpoint": "https://kserve.example.com",
                "model": "m",
                "version": None,
                "ca_file": "/etc/fleet/kserve-ca.pem",
            }
        )
    )
    assert p2.cloud.ca_file == "/etc/fleet/kserve-ca.pem"


def test_split_inference_names_an_edge_output_and_what_comes_back():
    p = parse_routing_policy(
        policy(cloud={"send": "emb", "inputs": {"emb": "features"}, "outputs": {"logits": "probs"}})
    )
    assert (p.cloud.send, p.cloud.inputs) == ("emb", {"emb": "features"})
    assert p.cloud.outputs == {"logits": "probs"}


@pytest.mark.parametrize(
    ("kind", "threshold", "ok"),
    [
        ("max_prob", 0.0, True),
        ("max_prob", 1.0, True),
        ("max_prob", 1.01, False),
        ("max_prob", -0.1, False),
        ("margin", 0.5, True),
        ("margin", 2.0, False),
        ("entropy", 0.0, True),
        ("entropy", 2.5, True),
        ("entropy", -0.01, False),
    ],
)
def test_threshold_range_depends_on_the_kind(kind, threshold, ok):
    doc = policy(confidence={"kind": kind, "threshold": threshold})
    if ok:
        assert parse_routing_policy(doc).confidence.threshold == threshold
    else:
        refused(doc, "threshold")


@pytest.mark.parametrize(
    ("doc", "needle"),
    [
        (policy(mode="sometimes"), "mode"),
        (policy(schema="fleet.routing/2"), "expected schema"),
        (policy(surprise=1), "surprise: Extra inputs are not permitted"),
        (policy(cloud={"surprise": 1}), "cloud.surprise"),
        (policy(confidence={"threshold": None}), "confidence.threshold"),
        (policy(confidence={"threshold": "NaN"}), "finite"),
        (policy(cloud=None), "needs a cloud section"),
        (policy(confidence=None), "needs a confidence section"),
        (policy(cloud={"endpoint": "http://plain.example.com"}), "https"),
        (policy(cloud={"endpoint": "ftp://x.example.com"}), "https"),
        (policy(cloud={"endpoint": "https://user:pw@x.example.com"}), "user info"),
        (policy(cloud={"endpoint": "https://x.example.com/?redirect=evil"}), "query"),
        (policy(cloud={"endpoint": "https://"}), "needs a host"),
        (policy(cloud={"ca_pem": PEM}), "external endpoint"),
        (policy(cloud={"credential": {"header": "X-Key", "secret": "k"}}), "external endpoint"),
        (policy(cloud={"endpoint": X, "ca_pem": PEM, "ca_file": "/ca.pem"}), "not both"),
        (policy(cloud={"endpoint": X, "ca_file": "relative/ca.pem"}), "absolute"),
        (policy(cloud={"endpoint": X, "ca_pem": "not a pem"}), "PEM"),
        (policy(cloud={"endpoint": X, "credential": {"header": "Host", "secret": "k"}}), "set by the client"),
        (
            policy(cloud={"endpoint": X, "credential": {"header": "X-Key", "secret": "../k"}}),
            "credential.secret",
        ),
        (
            policy(
                cloud={
                    "endpoint": X,
                    "credential": {"header": "X-Key", "secret": "k", "prefix": "a\r\nX-Evil: 1"},
                }
            ),
            "credential.prefix",
        ),
        (
            policy(
                cloud={"endpoint": X, "credential": {"header": "X Key", "secret": "k", "value": "s3cret"}}
            ),
            "credential",
        ),
        (policy(cloud={"model": "Not_A_Fleet_Model"}), "not a fleet model name"),
        (policy(cloud={"version": "latest"}), "not a semantic version"),
        (policy(cloud={"endpoint": X, "model": "a/b"}), "not a usable model name"),
        (policy(cloud={"timeout_ms": 0}), "cloud.timeout_ms"),
        (policy(cloud={"timeout_ms": 600_000}), "cloud.timeout_ms"),
        (policy(cloud={"send": "emb"}), "list in outputs"),
        (policy(cloud={"send": "bad name!"}), "cloud.send"),
        (policy(cloud={"outputs": {"logits": "bad name!"}}), "not a tensor name"),
        (policy(budget={"per_minute": -1}), "budget.per_minute"),
        (policy(budget={"burst": 0}), "budget.burst"),
        (policy(audit_rate=1.5), "audit_rate"),
        (policy(breaker={"failures": 0}), "breaker.failures"),
        (policy(breaker={"open_s": 0}), "breaker.open_s"),
        (policy(cache={"max_bytes": -1}), "cache.max_bytes"),
        (policy(cache={"ttl_s": 1e12}), "cache.ttl_s"),
        (policy(collect={"sample_rate": 2}), "collect.sample_rate"),
        (policy(cloud={"endpoint": X}, collect={"enabled": True}), "fleet endpoint only"),
        ("not json", "not JSON"),
        ([], "not a JSON object"),
    ],
)
def test_refused_policies_say_why(doc, needle):
    refused(doc, needle)


def test_every_problem_is_named_at_once():
    with pytest.raises(InvalidPayload) as info:
        parse_routing_policy(policy(audit_rate=3, budget={"burst": 0}))
    assert "audit_rate" in str(info.value)
    assert "budget.burst" in str(info.value)


NOW = datetime(2030, 1, 1, tzinfo=UTC)
KEY = Ed25519PrivateKey.generate()


def desired(routing) -> dict:
    doc = DesiredState.build(
        device_id="dev-1",
        seq=5,
        issued_at=NOW - timedelta(minutes=1),
        expires_at=NOW + timedelta(days=1),
        model="clf",
        version="2.0.0",
        release=2,
        target="clf/2.0.0/default/bundle.tar",
        length=100,
        hashes={"sha256": "ab" * 32},
    ).to_dict()
    doc["routing"] = routing
    return doc


def test_the_policy_travels_signed_inside_the_desired_state():
    envelope = json.dumps(sign_envelope(desired(policy()), KEY)).encode()
    d = verify_desired(envelope, [KEY.public_key()], "dev-1", 4, NOW)
    assert isinstance(d.routing, RoutingPolicy)
    assert d.routing.cloud.model == "digits-large"
    assert parse_payload(d.to_json(), DesiredState).routing == d.routing
    plain = desired(None)
    assert parse_payload(json.dumps(plain), DesiredState).routing is None


def test_a_malformed_policy_makes_the_signed_desired_state_malformed():
    bad = policy(confidence={"threshold": 7})
    envelope = json.dumps(sign_envelope(desired(bad), KEY)).encode()
    with pytest.raises(Malformed, match="threshold"):
        verify_desired(envelope, [KEY.public_key()], "dev-1", 4, NOW)


def test_the_policy_cannot_be_changed_without_the_director_key():
    envelope = sign_envelope(desired(policy()), KEY)
    envelope["signed"]["routing"]["cloud"]["endpoint"] = "https://attacker.example.com"
    envelope["signed"]["routing"]["cloud"]["model"] = "m"
    envelope["signed"]["routing"]["cloud"]["version"] = None
    with pytest.raises(BadSignature):
        verify_desired(json.dumps(envelope).encode(), [KEY.public_key()], "dev-1", 4, NOW)
