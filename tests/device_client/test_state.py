"""The update state machine: every legal transition, a sample of illegal ones, crash recovery."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from device_client import state as sm
from device_client.protocol import DesiredState, ServeMode
from device_client.state import (
    OUTCOMES,
    TRANSITIONS,
    DeviceState,
    IllegalTransition,
    RecoveryKind,
    Slot,
    UpdateEvent,
    UpdatePhase,
)

T0 = datetime(2025, 1, 1, tzinfo=UTC)


def desired(seq: int = 5, version: str = "2.0.0", release: int = 2, mode: ServeMode = ServeMode.serve):
    return DesiredState.build(
        device_id="dev-1",
        seq=seq,
        issued_at=T0,
        expires_at=T0 + timedelta(days=1),
        model="clf",
        version=version,
        release=release,
        target=f"clf/{version}.tar",
        length=100,
        hashes={"sha256": "0" * 64},
        mode=mode,
    )


OLD = Slot(model="clf", version="1.0.0", release=1, path="models/clf/1.0.0-default")
OLDER = Slot(model="clf", version="0.9.0", release=1, path="models/clf/0.9.0-default")
NEW = Slot(model="clf", version="2.0.0", release=2, path="models/clf/2.0.0-default")


def base() -> DeviceState:
    return DeviceState(current={"clf": OLD}, previous={"clf": OLDER}, release_floor={"clf": 1})


def to_phase(phase: UpdatePhase, mode: ServeMode = ServeMode.serve) -> DeviceState:
    s = base()
    if phase is UpdatePhase.idle:
        return s
    s = sm.accept(s, desired(mode=mode), T0, "downloads/x.partial")
    if phase is UpdatePhase.downloading:
        return s
    s = sm.downloaded(s, T0, "downloads/x.tar")
    if phase is UpdatePhase.verifying:
        return s
    s = sm.verified(s, T0, NEW)
    if phase is UpdatePhase.installing:
        return s
    s = sm.installed(s, T0, baseline_p95_ms=3.0)
    if phase is UpdatePhase.probation:
        return s
    if phase is UpdatePhase.succeeded:
        return sm.passed(s, T0)
    if phase is UpdatePhase.rolled_back:
        return sm.revert(s, T0, "bad")
    if phase is UpdatePhase.cancelled:
        return sm.cancel(s, T0, "superseded")
    if phase is UpdatePhase.failed:
        return sm.fail(to_phase(UpdatePhase.verifying), T0, "bad")
    raise AssertionError(phase)


def apply(s: DeviceState, event: UpdateEvent) -> DeviceState:
    now = T0 + timedelta(seconds=1)
    calls = {
        UpdateEvent.accept: lambda: sm.accept(s, desired(seq=9), now, "p"),
        UpdateEvent.downloaded: lambda: sm.downloaded(s, now, "b"),
        UpdateEvent.verified: lambda: sm.verified(s, now, NEW),
        UpdateEvent.installed: lambda: sm.installed(s, now, None),
        UpdateEvent.passed: lambda: sm.passed(s, now),
        UpdateEvent.fail: lambda: sm.fail(s, now, "r"),
        UpdateEvent.revert: lambda: sm.revert(s, now, "r"),
        UpdateEvent.cancel: lambda: sm.cancel(s, now, "r"),
        UpdateEvent.retry_verify: lambda: sm.retry_verify(s, now),
        UpdateEvent.finish: lambda: sm.finish(s),
    }
    return calls[event]()


@pytest.mark.parametrize(("phase", "event"), sorted(TRANSITIONS, key=str))
def test_every_legal_transition(phase: UpdatePhase, event: UpdateEvent) -> None:
    # a serve-mode probation may not simply "fail" (it must revert); shadow probation may
    shadow = (phase, event) == (UpdatePhase.probation, UpdateEvent.fail)
    mode = ServeMode.shadow if shadow else ServeMode.serve
    s = to_phase(phase, mode)
    assert s.phase is phase
    after = apply(s, event)
    assert after.phase is TRANSITIONS[(phase, event)]


ILLEGAL = [(p, e) for p in UpdatePhase for e in UpdateEvent if (p, e) not in TRANSITIONS]


@pytest.mark.parametrize(("phase", "event"), ILLEGAL[::3], ids=str)
def test_illegal_transitions_raise(phase: UpdatePhase, event: UpdateEvent) -> None:
    s = to_phase(phase)
    with pytest.raises(IllegalTransition):
        apply(s, event)


@pytest.mark.parametrize(
    ("phase", "event"),
    [
        (UpdatePhase.idle, UpdateEvent.downloaded),
        (UpdatePhase.idle, UpdateEvent.finish),
        (UpdatePhase.downloading, UpdateEvent.installed),
        (UpdatePhase.downloading, UpdateEvent.accept),
        (UpdatePhase.installing, UpdateEvent.cancel),
        (UpdatePhase.probation, UpdateEvent.downloaded),
        (UpdatePhase.succeeded, UpdateEvent.revert),
        (UpdatePhase.failed, UpdateEvent.passed),
        (UpdatePhase.rolled_back, UpdateEvent.accept),
    ],
)
def test_named_illegal_transitions(phase: UpdatePhase, event: UpdateEvent) -> None:
    with pytest.raises(IllegalTransition):
        apply(to_phase(phase), event)


def test_serve_probation_cannot_fail_it_must_revert() -> None:
    with pytest.raises(IllegalTransition):
        sm.fail(to_phase(UpdatePhase.probation), T0, "nope")


def test_table_covers_outcomes_and_next_phase() -> None:
    for outcome in OUTCOMES:
        assert TRANSITIONS[(outcome, UpdateEvent.finish)] is UpdatePhase.idle
    with pytest.raises(IllegalTransition, match="not allowed"):
        sm.next_phase(UpdatePhase.idle, UpdateEvent.passed)


def test_accept_rejects_old_seq() -> None:
    s = base().model_copy(update={"last_desired_seq": 5})
    with pytest.raises(ValueError, match="not newer"):
        sm.accept(s, desired(seq=5), T0, "p")
    s2 = sm.accept(s, desired(seq=6), T0, "p")
    assert s2.last_desired_seq == 6
    assert s2.update is not None
    assert s2.update.desired["seq"] == 6


def test_serve_flow_moves_slots_and_raises_floor() -> None:
    s = to_phase(UpdatePhase.probation)
    assert s.current["clf"] == NEW
    assert s.previous["clf"] == OLD
    assert s.update is not None
    assert s.update.displaced_previous == OLDER
    assert s.update.baseline_p95_ms == 3.0
    assert s.update.probation_started_at == T0
    done = sm.passed(s, T0)
    assert done.release_floor["clf"] == 2
    idle = sm.finish(done)
    assert idle.phase is UpdatePhase.idle
    assert idle.current["clf"] == NEW
    assert idle.previous["clf"] == OLD
    assert idle.referenced_slot_paths() == {NEW.path, OLD.path}


def test_revert_restores_current_and_previous_exactly() -> None:
    s = to_phase(UpdatePhase.rolled_back)
    assert s.current["clf"] == OLD
    assert s.previous["clf"] == OLDER
    assert s.release_floor["clf"] == 1
    assert s.update is not None
    assert s.update.reason == "bad"


def test_revert_of_first_install_leaves_nothing_serving() -> None:
    s = sm.accept(DeviceState(), desired(), T0, "p")
    s = sm.installed(sm.verified(sm.downloaded(s, T0, "b"), T0, NEW), T0, None)
    assert s.current == {"clf": NEW}
    r = sm.revert(s, T0, "bad")
    assert r.current == {}
    assert r.previous == {}


def test_shadow_mode_never_touches_slots_or_floor() -> None:
    s = to_phase(UpdatePhase.probation, ServeMode.shadow)
    assert s.current["clf"] == OLD
    assert s.previous["clf"] == OLDER
    assert sm.passed(s, T0).release_floor["clf"] == 1
    failed = sm.fail(s, T0, "low agreement")
    assert failed.phase is UpdatePhase.failed
    assert failed.current["clf"] == OLD


def test_report_seq_is_monotonic() -> None:
    s, a = sm.allocate_report_seq(DeviceState())
    s, b = sm.allocate_report_seq(s)
    assert (a, b) == (1, 2)
    assert s.report_seq == 2


def test_state_round_trips_through_json() -> None:
    s = to_phase(UpdatePhase.probation)
    again = DeviceState.model_validate_json(s.model_dump_json())
    assert again == s


# --------------------------------------------------------------------------- recovery


def test_recovery_idle_does_nothing() -> None:
    assert sm.recovery_action(base(), bundle_present=False).kind is RecoveryKind.nothing


def test_recovery_mid_download_resumes() -> None:
    s = to_phase(UpdatePhase.downloading)
    action = sm.recovery_action(s, bundle_present=False)
    assert action.kind is RecoveryKind.resume_download
    assert sm.apply_recovery(s, action, T0) == s


@pytest.mark.parametrize("phase", [UpdatePhase.verifying, UpdatePhase.installing])
def test_recovery_verify_or_install_restarts_then_gives_up(phase: UpdatePhase) -> None:
    s = to_phase(phase)
    action = sm.recovery_action(s, bundle_present=True, max_attempts=2)
    assert action.kind is RecoveryKind.restart_verify
    s2 = sm.apply_recovery(s, action, T0)
    assert s2.phase is UpdatePhase.verifying
    assert s2.update is not None
    assert s2.update.attempts == 2
    assert s2.update.candidate is None
    # crashing again exhausts the attempts: fail instead of crash-looping
    action2 = sm.recovery_action(s2, bundle_present=True, max_attempts=2)
    assert action2.kind is RecoveryKind.fail
    s3 = sm.apply_recovery(s2, action2, T0)
    assert s3.phase is UpdatePhase.failed
    assert s3.current["clf"] == OLD


def test_recovery_verify_without_bundle_fails() -> None:
    s = to_phase(UpdatePhase.verifying)
    action = sm.recovery_action(s, bundle_present=False)
    assert action.kind is RecoveryKind.fail
    assert "download is gone" in action.reason


def test_recovery_in_probation_reverts_to_last_known_good() -> None:
    s = to_phase(UpdatePhase.probation)
    action = sm.recovery_action(s, bundle_present=True)
    assert action.kind is RecoveryKind.revert
    assert action.reason == "crashed during probation"
    s2 = sm.apply_recovery(s, action, T0)
    assert s2.phase is UpdatePhase.rolled_back
    assert s2.current["clf"] == OLD
    assert s2.update is not None
    assert s2.update.reason == "crashed during probation"


def test_recovery_in_shadow_probation_fails_keeping_current() -> None:
    s = to_phase(UpdatePhase.probation, ServeMode.shadow)
    action = sm.recovery_action(s, bundle_present=True)
    assert action.kind is RecoveryKind.fail
    s2 = sm.apply_recovery(s, action, T0)
    assert s2.phase is UpdatePhase.failed
    assert s2.current["clf"] == OLD


@pytest.mark.parametrize("phase", sorted(OUTCOMES))
def test_recovery_after_outcome_reports_it(phase: UpdatePhase) -> None:
    s = to_phase(phase)
    action = sm.recovery_action(s, bundle_present=False)
    assert action.kind is RecoveryKind.report_outcome
    assert sm.apply_recovery(s, action, T0) == s
