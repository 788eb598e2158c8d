"""The routing policy in the persisted device state: it takes effect with the version it came
with, a revert restores the one before, a shadow candidate's waits, and it survives a restart."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from device_client import state as sm
from device_client.daemon.intake import _same_target
from device_client.protocol import DesiredState, ServeMode
from device_client.protocol.routing import parse_routing_policy
from device_client.state import DeviceState, Slot
from device_client.store import StateStore

T0 = datetime(2025, 1, 1, tzinfo=UTC)
OLD = Slot(model="clf", version="1.0.0", release=1, path="models/clf/1.0.0-default")
NEW = Slot(model="clf", version="2.0.0", release=2, path="models/clf/2.0.0-default")


def policy(threshold: float = 0.9, mode: str = "prefer_edge") -> dict[str, Any]:
    doc = {
        "mode": mode,
        "confidence": {"output": "y", "softmax": True, "threshold": threshold},
        "cloud": {"endpoint": "fleet", "model": "big", "timeout_ms": 500},
    }
    return parse_routing_policy(doc).to_dict()


def desired(routing: dict[str, Any] | None, mode: ServeMode = ServeMode.serve) -> DesiredState:
    return DesiredState.build(
        device_id="dev-1",
        seq=5,
        issued_at=T0,
        expires_at=T0 + timedelta(days=1),
        model="clf",
        version="2.0.0",
        release=2,
        target="clf/2.0.0.tar",
        length=100,
        hashes={"sha256": "0" * 64},
        mode=mode,
        routing=routing,
    )


def installed(state: DeviceState, d: DesiredState) -> DeviceState:
    s = sm.accept(state, d, T0, "downloads/x.partial")
    s = sm.downloaded(s, T0, "downloads/x.tar")
    s = sm.verified(s, T0, NEW)
    return sm.installed(s, T0, None)


def test_the_policy_takes_effect_with_the_version_it_came_with() -> None:
    before = DeviceState(current={"clf": OLD})
    assert before.routing == {}
    p = policy()
    after = installed(before, desired(p))
    assert after.routing == {"clf": p}
    assert after.current["clf"] == NEW
    assert sm.passed(after, T0).routing == {"clf": p}


def test_a_new_version_without_a_policy_drops_the_old_one() -> None:
    before = DeviceState(current={"clf": OLD}, routing={"clf": policy()})
    assert installed(before, desired(None)).routing == {}


def test_a_revert_restores_the_policy_of_the_good_version() -> None:
    old_policy, new_policy = policy(0.5), policy(0.99, "prefer_cloud")
    before = DeviceState(current={"clf": OLD}, previous={}, routing={"clf": old_policy})
    during = installed(before, desired(new_policy))
    assert during.routing == {"clf": new_policy}
    reverted = sm.revert(during, T0, "probation_failed")
    assert reverted.current["clf"] == OLD
    assert reverted.routing == {"clf": old_policy}
    # ... and a good version that had none has none again
    plain = sm.revert(installed(DeviceState(current={"clf": OLD}), desired(new_policy)), T0, "x")
    assert plain.routing == {}


def test_a_revert_of_a_first_install_leaves_no_policy() -> None:
    during = installed(DeviceState(), desired(policy()))
    assert during.routing == {"clf": policy()}
    assert sm.revert(during, T0, "probation_failed").routing == {}


def test_a_shadow_candidate_does_not_change_the_serving_policy() -> None:
    serving = policy(0.5)
    before = DeviceState(current={"clf": OLD}, routing={"clf": serving})
    assert installed(before, desired(policy(0.99), ServeMode.shadow)).routing == {"clf": serving}


def test_set_routing_replaces_or_removes_one_models_policy() -> None:
    other = policy(0.7)
    s = DeviceState(current={"clf": OLD}, routing={"det": other})
    s = sm.set_routing(s, "clf", policy())
    assert s.routing == {"det": other, "clf": policy()}
    assert sm.set_routing(s, "clf", None).routing == {"det": other}


def test_the_policy_survives_a_restart(tmp_path) -> None:
    store = StateStore(tmp_path)
    p = policy()
    state = installed(DeviceState(current={"clf": OLD}, routing={"clf": policy(0.3)}), desired(p))
    store.save(state)
    loaded = StateStore(tmp_path).load().state
    assert loaded.routing == {"clf": p}
    assert loaded.update is not None
    assert loaded.update.displaced_routing == policy(0.3)


def test_the_update_in_flight_with_another_policy_is_another_update() -> None:
    """A re-issue of the update in flight (a new seq, nothing else) continues it; the same version
    with another policy, or none, replaces it: otherwise the old policy would be applied."""
    in_flight = sm.accept(DeviceState(), desired(policy()), T0, "downloads/x.partial").update
    assert in_flight is not None
    assert _same_target(in_flight.desired, desired(policy()))
    assert not _same_target(in_flight.desired, desired(policy(0.5)))
    assert not _same_target(in_flight.desired, desired(None))
