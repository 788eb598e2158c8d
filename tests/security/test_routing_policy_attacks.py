"""Attacks on the routing policy inside the DesiredState, against a real daemon serving clf 2.0.0:
whoever changes a device's policy decides where its inference inputs go.

protection: the policy is part of the director-signed DesiredState (the signature covers it) and
strictly validated (``device_client/protocol/routing.py``): a policy that does not validate makes
the whole DesiredState malformed. Either way the device reports the refusal and keeps its policy.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest

pytestmark = pytest.mark.mqtt

POLICY: dict[str, Any] = {
    "mode": "prefer_edge",
    "confidence": {"output": "y", "softmax": True, "threshold": 0.9},
    "cloud": {"endpoint": "https://cloud.example.com", "model": "big", "timeout_ms": 500},
}


def _refused(device: Any, payload: dict[str, Any], code: str) -> dict[str, Any]:
    """Send ``payload`` to the testbed's device; its ``failed`` report, which must carry ``code``."""
    assert device.daemon is not None
    before = device.daemon.state.routing
    report = device.rejection(device.send(payload))
    assert report["details"]["code"] == code, report
    assert report["desired_seq"] is None  # not authentic: its claims are not trusted
    assert device.daemon.state.routing == before
    return report


def test_a_policy_changed_in_a_genuine_desired_state(device):
    # protection: the director's signature covers the routing policy: redirecting the traffic to
    # another endpoint breaks it
    envelope = device.sign(device.desired("2.0.0", routing=POLICY))
    tampered = copy.deepcopy(envelope)
    tampered["signed"]["routing"]["cloud"]["endpoint"] = "https://collector.example.net"
    tampered["signed"]["routing"]["confidence"]["threshold"] = 1.0  # and send it everything
    report = _refused(device, tampered, "bad_signature")
    assert report["reason"] == "bad_signature: signature does not verify"


def test_a_policy_added_to_a_genuine_desired_state(device):
    envelope = device.sign(device.desired("2.0.0"))
    envelope["signed"]["routing"] = POLICY
    _refused(device, envelope, "bad_signature")


@pytest.mark.parametrize(
    ("routing", "why"),
    [
        ({**POLICY, "cloud": {**POLICY["cloud"], "endpoint": "http://cloud.example.com"}}, "https"),
        ({**POLICY, "confidence": {**POLICY["confidence"], "threshold": 1.5}}, "out of range"),
        ({**POLICY, "upload_everything": True}, "Extra inputs are not permitted"),
        ({"mode": "prefer_edge", "cloud": POLICY["cloud"]}, "needs a confidence section"),
    ],
)
def test_a_malformed_policy_with_the_director_signature(device, routing, why):
    # protection: strict validation; the signed DesiredState is refused as a whole
    desired = device.desired("2.0.0")
    desired["routing"] = routing
    report = _refused(device, device.sign(desired), "malformed")
    assert report["reason"].startswith("malformed: DesiredState: routing")
    assert why in report["reason"]
