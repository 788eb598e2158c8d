"""The device's update state machine: a pure transition table plus the persisted ``DeviceState``.

Nothing here does I/O: the daemon applies these functions, persists the returned state
(``store.StateStore.save``) after every step, and only then acts on it. :data:`TRANSITIONS` is the
table (anything else raises :class:`IllegalTransition`); :func:`recovery_action` says what to do
after a crash. Phases, model slots and recovery: docs/architecture.md, "Device update".
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from .protocol import DeploymentPhase, DesiredState, ServeMode


class UpdatePhase(StrEnum):
    """Phases of the daemon's update; all but ``idle`` are protocol deployment phases."""

    idle = "idle"
    downloading = DeploymentPhase.downloading.value
    verifying = DeploymentPhase.verifying.value
    installing = DeploymentPhase.installing.value
    probation = DeploymentPhase.probation.value
    succeeded = DeploymentPhase.succeeded.value
    failed = DeploymentPhase.failed.value
    rolled_back = DeploymentPhase.rolled_back.value
    cancelled = DeploymentPhase.cancelled.value


OUTCOMES = frozenset(
    {UpdatePhase.succeeded, UpdatePhase.failed, UpdatePhase.rolled_back, UpdatePhase.cancelled}
)


class UpdateEvent(StrEnum):
    accept = "accept"
    downloaded = "downloaded"
    verified = "verified"
    installed = "installed"
    passed = "passed"
    fail = "fail"
    revert = "revert"
    cancel = "cancel"
    retry_verify = "retry_verify"
    finish = "finish"


_P = UpdatePhase
_E = UpdateEvent

#: (phase, event) -> next phase. The single source of truth for what may happen.
TRANSITIONS: dict[tuple[UpdatePhase, UpdateEvent], UpdatePhase] = {
    (_P.idle, _E.accept): _P.downloading,
    (_P.downloading, _E.downloaded): _P.verifying,
    (_P.verifying, _E.verified): _P.installing,
    (_P.installing, _E.installed): _P.probation,
    (_P.probation, _E.passed): _P.succeeded,
    (_P.downloading, _E.fail): _P.failed,
    (_P.verifying, _E.fail): _P.failed,
    (_P.installing, _E.fail): _P.failed,
    (_P.probation, _E.fail): _P.failed,
    (_P.probation, _E.revert): _P.rolled_back,
    (_P.downloading, _E.cancel): _P.cancelled,
    (_P.verifying, _E.cancel): _P.cancelled,
    (_P.probation, _E.cancel): _P.cancelled,
    (_P.verifying, _E.retry_verify): _P.verifying,
    (_P.installing, _E.retry_verify): _P.verifying,
    (_P.succeeded, _E.finish): _P.idle,
    (_P.failed, _E.finish): _P.idle,
    (_P.rolled_back, _E.finish): _P.idle,
    (_P.cancelled, _E.finish): _P.idle,
}


class IllegalTransition(Exception):
    """An event that the transition table does not allow in the current phase."""

    def __init__(self, phase: UpdatePhase, event: UpdateEvent) -> None:
        super().__init__(f"event {event.value!r} is not allowed in phase {phase.value!r}")
        self.phase = phase
        self.event = event


def next_phase(phase: UpdatePhase, event: UpdateEvent) -> UpdatePhase:
    """Look ``(phase, event)`` up in :data:`TRANSITIONS`; raise :class:`IllegalTransition` if absent."""
    try:
        return TRANSITIONS[(phase, event)]
    except KeyError:
        raise IllegalTransition(phase, event) from None


class Slot(BaseModel):
    """One installed model version: an extracted bundle directory (``path`` relative to data_dir)."""

    model_config = ConfigDict(frozen=True)

    model: str
    version: str
    release: int
    variant: str = "default"
    path: str


class InFlightUpdate(BaseModel):
    """The update being applied; everything needed to resume or undo it after a crash."""

    model_config = ConfigDict(frozen=True)

    desired: dict[str, Any]
    desired_seq: int
    model: str
    version: str
    release: int
    variant: str
    mode: ServeMode
    phase: UpdatePhase
    started_at: datetime
    phase_at: datetime
    #: the ``.partial`` file being downloaded (relative to data_dir)
    partial_path: str | None = None
    #: the complete, hash-verified download (relative to data_dir)
    bundle_path: str | None = None
    candidate: Slot | None = None
    #: ``previous`` before the candidate displaced it (restored by a revert)
    displaced_previous: Slot | None = None
    #: the routing policy in force before the candidate displaced it (restored by a revert)
    displaced_routing: dict[str, Any] | None = None
    probation_started_at: datetime | None = None
    baseline_p95_ms: float | None = None
    #: verify/install attempts started (bounded, see recovery_action)
    attempts: int = 0
    reason: str | None = None
    #: report seq allocated for this outcome (re-sent unchanged after a crash)
    outcome_report_seq: int | None = None


class DeviceState(BaseModel):
    """Everything the daemon must remember across a crash or power cut."""

    model_config = ConfigDict(frozen=True)

    version: int = 1
    last_desired_seq: int = 0
    release_floor: dict[str, int] = Field(default_factory=dict)
    current: dict[str, Slot] = Field(default_factory=dict)
    previous: dict[str, Slot] = Field(default_factory=dict)
    update: InFlightUpdate | None = None
    report_seq: int = 0
    #: candidates that passed a shadow probation and keep shadowing until the next desired state
    shadow: dict[str, Slot] = Field(default_factory=dict)
    #: seq of the last desired state rejected after its signature checked out (a redelivery of that
    #: retained message is then ignored instead of reported again)
    last_rejected_seq: int = 0
    #: the routing policy (``fleet.routing/1`` JSON) of each serving model that has one: the
    #: policy of the DesiredState whose version serves (docs/architecture.md, "Hybrid routing")
    routing: dict[str, dict[str, Any]] = Field(default_factory=dict)

    @property
    def phase(self) -> UpdatePhase:
        return self.update.phase if self.update is not None else UpdatePhase.idle

    def serving(self) -> dict[str, str]:
        """{model: version} of what serves now."""
        return {name: slot.version for name, slot in sorted(self.current.items())}

    def referenced_slot_paths(self) -> set[str]:
        """Slot directories that must not be garbage-collected."""
        paths = {s.path for s in self.current.values()} | {s.path for s in self.previous.values()}
        paths |= {s.path for s in self.shadow.values()}
        if self.update is not None:
            for slot in (self.update.candidate, self.update.displaced_previous):
                if slot is not None:
                    paths.add(slot.path)
        return paths


# --------------------------------------------------------------------------- pure steps


def _step(state: DeviceState, event: UpdateEvent, now: datetime, **changes: Any) -> DeviceState:
    if state.update is None:
        raise IllegalTransition(UpdatePhase.idle, event)
    phase = next_phase(state.update.phase, event)
    update = state.update.model_copy(update={"phase": phase, "phase_at": now, **changes})
    return state.model_copy(update={"update": update})


def accept(state: DeviceState, desired: DesiredState, now: datetime, partial_path: str) -> DeviceState:
    """idle -> downloading for a verified desired state (seq must be new)."""
    if state.update is not None:
        raise IllegalTransition(state.update.phase, UpdateEvent.accept)
    if desired.seq <= state.last_desired_seq:
        raise ValueError(f"desired seq {desired.seq} is not newer than {state.last_desired_seq}")
    update = InFlightUpdate(
        desired=desired.to_dict(),
        desired_seq=desired.seq,
        model=desired.model,
        version=desired.version,
        release=desired.release,
        variant=desired.variant,
        mode=desired.mode,
        phase=next_phase(UpdatePhase.idle, UpdateEvent.accept),
        started_at=now,
        phase_at=now,
        partial_path=partial_path,
    )
    return state.model_copy(update={"update": update, "last_desired_seq": desired.seq})


def downloaded(state: DeviceState, now: datetime, bundle_path: str) -> DeviceState:
    """downloading -> verifying; the partial file became the complete ``bundle_path``."""
    return _step(state, UpdateEvent.downloaded, now, bundle_path=bundle_path, partial_path=None, attempts=1)


def verified(state: DeviceState, now: datetime, candidate: Slot) -> DeviceState:
    """verifying -> installing; the bundle is extracted into the ``candidate`` slot."""
    return _step(state, UpdateEvent.verified, now, candidate=candidate)


def installed(state: DeviceState, now: datetime, baseline_p95_ms: float | None) -> DeviceState:
    """installing -> probation. In serve mode the candidate becomes current (old current -> previous)
    and its DesiredState's routing policy (or none) takes over from the one it displaces."""
    upd = state.update
    if upd is None:
        raise IllegalTransition(UpdatePhase.idle, UpdateEvent.installed)
    if upd.candidate is None and upd.phase is UpdatePhase.installing:
        raise ValueError("installing without a candidate slot")
    new = _step(
        state,
        UpdateEvent.installed,
        now,
        probation_started_at=now,
        baseline_p95_ms=baseline_p95_ms,
        displaced_previous=state.previous.get(upd.model),
        displaced_routing=state.routing.get(upd.model),
    )
    if upd.mode is ServeMode.shadow:  # the candidate answers no caller: its policy waits
        return new
    assert upd.candidate is not None
    current = dict(state.current)
    previous = dict(state.previous)
    old = current.get(upd.model)
    current[upd.model] = upd.candidate
    if old is not None and old.path != upd.candidate.path:
        previous[upd.model] = old
    routing = _with_policy(state.routing, upd.model, upd.desired.get("routing"))
    return new.model_copy(update={"current": current, "previous": previous, "routing": routing})


def passed(state: DeviceState, now: datetime) -> DeviceState:
    """probation -> succeeded; a serve-mode success raises the model's release floor."""
    new = _step(state, UpdateEvent.passed, now, reason=None)
    upd = new.update
    assert upd is not None
    if upd.mode is ServeMode.shadow:
        return new
    floor = dict(new.release_floor)
    floor[upd.model] = max(floor.get(upd.model, 0), upd.release)
    return new.model_copy(update={"release_floor": floor})


def fail(state: DeviceState, now: datetime, reason: str) -> DeviceState:
    """downloading|verifying|installing|probation -> failed.

    Failing a serve-mode probation would leave a bad model serving, so it is refused: use
    :func:`revert`. Shadow probation may fail (the serving model never changed).
    """
    upd = state.update
    if upd is not None and upd.phase is UpdatePhase.probation and upd.mode is ServeMode.serve:
        raise IllegalTransition(upd.phase, UpdateEvent.fail)
    return _step(state, UpdateEvent.fail, now, reason=reason)


def revert(state: DeviceState, now: datetime, reason: str) -> DeviceState:
    """probation -> rolled_back: the last known good model serves again, under its own routing policy."""
    upd = state.update
    if upd is None:
        raise IllegalTransition(UpdatePhase.idle, UpdateEvent.revert)
    new = _step(state, UpdateEvent.revert, now, reason=reason)
    if upd.mode is ServeMode.shadow:
        return new
    current = dict(state.current)
    previous = dict(state.previous)
    good = previous.get(upd.model)
    if good is not None:
        current[upd.model] = good
    else:  # first install of this model: nothing to go back to
        current.pop(upd.model, None)
    if upd.displaced_previous is not None:
        previous[upd.model] = upd.displaced_previous
    else:
        previous.pop(upd.model, None)
    routing = _with_policy(state.routing, upd.model, upd.displaced_routing if good is not None else None)
    return new.model_copy(update={"current": current, "previous": previous, "routing": routing})


def cancel(state: DeviceState, now: datetime, reason: str) -> DeviceState:
    """downloading|verifying|probation -> cancelled (a newer desired state supersedes this one).

    Cancelling a serve-mode probation keeps the candidate serving; the next update replaces it.
    """
    return _step(state, UpdateEvent.cancel, now, reason=reason)


def retry_verify(state: DeviceState, now: datetime) -> DeviceState:
    """verifying|installing -> verifying after a crash; counts an attempt."""
    upd = state.update
    if upd is None:
        raise IllegalTransition(UpdatePhase.idle, UpdateEvent.retry_verify)
    return _step(state, UpdateEvent.retry_verify, now, attempts=upd.attempts + 1, candidate=None)


def finish(state: DeviceState) -> DeviceState:
    """outcome -> idle, once the outcome report was handed to the transport."""
    if state.update is None:
        raise IllegalTransition(UpdatePhase.idle, UpdateEvent.finish)
    next_phase(state.update.phase, UpdateEvent.finish)
    return state.model_copy(update={"update": None})


def set_routing(state: DeviceState, model: str, policy: dict[str, Any] | None) -> DeviceState:
    """The routing policy of the serving ``model`` replaced (None: removed), no update involved: a
    DesiredState that changes only the policy of the version that already serves."""
    return state.model_copy(update={"routing": _with_policy(state.routing, model, policy)})


def _with_policy(
    routing: dict[str, dict[str, Any]], model: str, policy: dict[str, Any] | None
) -> dict[str, dict[str, Any]]:
    out = {k: v for k, v in routing.items() if k != model}
    if policy is not None:
        out[model] = policy
    return out


def allocate_report_seq(state: DeviceState) -> tuple[DeviceState, int]:
    """Reserve the next device-monotonic report seq (persist the state before sending)."""
    seq = state.report_seq + 1
    return state.model_copy(update={"report_seq": seq}), seq


# --------------------------------------------------------------------------- crash recovery


class RecoveryKind(StrEnum):
    nothing = "nothing"
    resume_download = "resume_download"
    restart_verify = "restart_verify"
    fail = "fail"
    revert = "revert"
    report_outcome = "report_outcome"


@dataclass(frozen=True)
class RecoveryAction:
    kind: RecoveryKind
    reason: str = ""


def recovery_action(state: DeviceState, *, bundle_present: bool, max_attempts: int = 2) -> RecoveryAction:
    """What to do after a restart with ``state`` freshly loaded.

    ``bundle_present`` says whether the complete download (``update.bundle_path``) still exists.
    The models in ``state.current`` are the ones to load first in every case except ``revert``
    (where :func:`apply_recovery` fixes ``current`` before anything is loaded).
    """
    upd = state.update
    if upd is None:
        return RecoveryAction(RecoveryKind.nothing)
    phase = upd.phase
    if phase in OUTCOMES:
        return RecoveryAction(RecoveryKind.report_outcome, upd.reason or phase.value)
    if phase is UpdatePhase.downloading:
        return RecoveryAction(RecoveryKind.resume_download)
    if phase in (UpdatePhase.verifying, UpdatePhase.installing):
        if not bundle_present:
            return RecoveryAction(RecoveryKind.fail, f"crashed during {phase.value}; download is gone")
        if upd.attempts >= max_attempts:
            return RecoveryAction(
                RecoveryKind.fail, f"crashed during {phase.value} {upd.attempts} times; giving up"
            )
        return RecoveryAction(RecoveryKind.restart_verify, f"crashed during {phase.value}")
    if phase is UpdatePhase.probation:
        if upd.mode is ServeMode.shadow:
            return RecoveryAction(RecoveryKind.fail, "crashed during shadow probation")
        return RecoveryAction(RecoveryKind.revert, "crashed during probation")
    raise AssertionError(f"unhandled phase {phase}")  # pragma: no cover


def apply_recovery(state: DeviceState, action: RecoveryAction, now: datetime) -> DeviceState:
    """The state after taking ``action`` (pure); downloads and verification then run as usual."""
    if action.kind is RecoveryKind.restart_verify:
        return retry_verify(state, now)
    if action.kind is RecoveryKind.fail:
        return fail(state, now, action.reason)
    if action.kind is RecoveryKind.revert:
        return revert(state, now, action.reason)
    return state
