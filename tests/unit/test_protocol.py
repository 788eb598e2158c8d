"""The wire contract: topics, payload parsing, signed envelopes."""

from __future__ import annotations

import copy
from datetime import timedelta

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pydantic import ValidationError

from device_client.protocol import (
    DesiredState,
    HealthWindow,
    InvalidPayload,
    InvalidTopic,
    SignatureError,
    TopicKind,
    device_topic,
    parse_payload,
    parse_topic,
)
from device_client.protocol.messages import MAX_PAYLOAD_BYTES, utcnow
from device_client.protocol.signing import (
    canonical_json,
    public_key_from_pem,
    public_key_to_pem,
    sign_envelope,
    verify_envelope,
)
from device_client.protocol.topics import server_subscriptions


def desired(**over) -> DesiredState:
    now = utcnow()
    fields = {
        "device_id": "cam-1",
        "seq": 3,
        "issued_at": now,
        "expires_at": now + timedelta(hours=1),
        "model": "det",
        "version": "1.2.0",
        "release": 4,
        "target": "det/1.2.0/default/bundle.tar",
        "length": 100,
        "hashes": {"sha256": "ab" * 32},
    }
    fields.update(over)
    return DesiredState.build(**fields)


def test_topics_round_trip_and_reject_bad_ids():
    assert device_topic("cam-1", TopicKind.report) == "fleet/v1/d/cam-1/report"
    assert parse_topic("fleet/v1/d/cam-1/health") == ("cam-1", TopicKind.health)
    for bad in (
        "fleet/v1/d/Cam/report",
        "fleet/v1/d/a+b/report",
        "fleet/v1/d/x/unknown",
        "fleet/v2/d/x/report",
        "fleet/v1/d/x/report/extra",
    ):
        with pytest.raises(InvalidTopic):
            parse_topic(bad)
    with pytest.raises(InvalidTopic):
        device_topic("#", TopicKind.desired)
    assert server_subscriptions() == [
        "$share/fleet-server/fleet/v1/d/+/report",
        "$share/fleet-server/fleet/v1/d/+/health",
        "$share/fleet-server/fleet/v1/d/+/presence",
    ]


def test_payload_round_trip_and_rejections():
    d = desired()
    assert parse_payload(d.to_json(), DesiredState) == d
    with pytest.raises(InvalidPayload, match="not JSON"):
        parse_payload(b"\xff\x00", DesiredState)
    with pytest.raises(InvalidPayload, match="not a JSON object"):
        parse_payload(b"[1,2]", DesiredState)
    with pytest.raises(InvalidPayload, match="expected schema"):
        parse_payload(d.to_json().replace(b"fleet.desired/1", b"fleet.desired/9"), DesiredState)
    with pytest.raises(InvalidPayload, match="exceeds"):
        parse_payload(b" " * (MAX_PAYLOAD_BYTES + 1), DesiredState)
    with pytest.raises(InvalidPayload, match="version"):
        parse_payload(desired().to_json().replace(b'"1.2.0"', b'"v1.2"'), DesiredState)
    with pytest.raises(ValidationError):
        HealthWindow.build(
            device_id="x",
            seq=1,
            at=utcnow(),
            window_s=10,
            model="m",
            version="1.0.0",
            requests=1,
            errors=0,
            agreement=1.5,
        )


def test_the_one_pass_parse_gives_what_json_loads_and_validate_give():
    """parse_payload validates straight from JSON (pydantic-core) and falls back to json.loads +
    model_validate only for what that refuses: both must read every payload the same way."""
    import json

    from device_client.protocol import Presence, Report, validate_payload

    now = utcnow()
    window = HealthWindow.build(
        device_id="cam-1", seq=3, at=now, window_s=10, model="m", version="1.0.0", requests=5,
        errors=1, p50_ms=1.5, p95_ms=2.5, p99_ms=None, shadow_requests=4, agreement=0.75,
    )  # fmt: skip
    report = Report.build(
        device_id="cam-1", seq=9, at=now, phase="probation", desired_seq=2, model="m",
        version="1.0.0", serving={"m": "1.0.0"}, details={"probation": {"p95_ms": 1.25}},
    )  # fmt: skip
    samples = [
        (desired().to_json(), DesiredState),
        (window.to_json(), HealthWindow),
        (report.to_json(), Report),
        (Presence.build(device_id="cam-1", status="online", at=now).to_json(), Presence),
        # JSON that json.loads reads and pydantic-core's parser may not: the same outcome either way
        (window.to_json().replace(b'"p95_ms":2.5', b'"p95_ms":NaN'), HealthWindow),
        (window.to_json().replace(b'"seq":3', b'"seq":3.0'), HealthWindow),
        (window.to_json().replace(b'"seq":3', b'"seq":"3"'), HealthWindow),
        (report.to_json().replace(b'"phase":"probation"', b'"phase":"probing"'), Report),
    ]

    def outcome(parse) -> str:
        try:
            return parse().model_dump_json()
        except InvalidPayload as exc:
            return f"invalid: {exc}"

    for raw, model in samples:
        fast = outcome(lambda raw=raw, model=model: parse_payload(raw, model))
        assert fast == outcome(lambda raw=raw, model=model: validate_payload(json.loads(raw), model)), raw
    assert outcome(lambda: parse_payload(samples[-1][0], Report)).startswith("invalid: ")


def test_envelope_signature_checks():
    key, other = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    env = sign_envelope(desired().to_dict(), key)
    pub = public_key_from_pem(public_key_to_pem(key.public_key()))
    assert verify_envelope(env, [pub]) == env["signed"]

    with pytest.raises(SignatureError, match="no signature by a trusted key"):
        verify_envelope(env, [other.public_key()])
    tampered = copy.deepcopy(env)
    tampered["signed"]["version"] = "9.9.9"
    with pytest.raises(SignatureError, match="does not verify"):
        verify_envelope(tampered, [pub])
    unsigned = {"signed": env["signed"], "signatures": []}
    with pytest.raises(SignatureError, match="unsigned"):
        verify_envelope(unsigned, [pub])
    with pytest.raises(InvalidPayload):
        verify_envelope({"signed": "x"}, [pub])
    forged = copy.deepcopy(env)
    forged["signatures"][0]["sig"] = "!!!notbase64"
    with pytest.raises(SignatureError):
        verify_envelope(forged, [pub])


def test_canonical_json_is_order_independent():
    assert canonical_json({"b": 1, "a": [1, {"y": 2, "x": 1}]}) == b'{"a":[1,{"x":1,"y":2}],"b":1}'


def test_sign_envelope_json_bytes_are_the_envelope_and_verify():
    # the bulk signer publishes these bytes as they are: they must parse to the very envelope
    # stored beside them and verify like any envelope, non-ASCII text and floats included
    import json

    from device_client.protocol.signing import key_id, sign_envelope_json

    key = Ed25519PrivateKey.generate()
    signed = {"schema": "fleet.desired/1", "seq": 3, "note": "Zürich", "ratio": 0.05, "x": None}
    envelope, data = sign_envelope_json(signed, key, key_id(key.public_key()))
    assert json.loads(data) == envelope
    assert verify_envelope(json.loads(data), [key.public_key()]) == signed
    with pytest.raises(ValueError, match="not hex"):
        sign_envelope_json(signed, key, 'ab","sig":"forged')
