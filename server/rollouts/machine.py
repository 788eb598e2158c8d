"""Pure state machines (docs/architecture.md, "State machines"): transition tables; illegal moves raise."""

from __future__ import annotations

from collections.abc import Mapping

from device_client.protocol.messages import DeploymentPhase as P
from server.rollouts.tables import RolloutStatus as R


class IllegalTransition(ValueError):
    def __init__(self, kind: str, src: str, dst: str) -> None:
        super().__init__(f"illegal {kind} transition {src} -> {dst}")
        self.src, self.dst = src, dst


ROLLOUT_TRANSITIONS: Mapping[R, frozenset[R]] = {
    R.draft: frozenset({R.running, R.aborted}),
    R.running: frozenset({R.paused, R.completed, R.aborted, R.rolling_back}),
    R.paused: frozenset({R.running, R.aborted, R.rolling_back}),
    R.rolling_back: frozenset({R.rolled_back}),
    R.completed: frozenset(),
    R.aborted: frozenset(),
    R.rolled_back: frozenset(),
}

_ENDINGS = frozenset({P.failed, P.rolled_back, P.timed_out, P.cancelled})
_PROGRESS = (P.notified, P.downloading, P.verifying, P.installing, P.probation, P.succeeded)


def _forward_from(phase: P) -> frozenset[P]:
    """Phases after ``phase`` in the happy path: a device may skip ahead (e.g. a re-sent
    DesiredState for a bundle it already holds goes straight to installing)."""
    return frozenset(_PROGRESS[_PROGRESS.index(phase) + 1 :])


DEPLOYMENT_TRANSITIONS: Mapping[P, frozenset[P]] = {
    P.pending: frozenset({P.notified, P.failed, P.timed_out, P.cancelled}),
    P.notified: _forward_from(P.notified) | _ENDINGS,
    P.downloading: _forward_from(P.downloading) | _ENDINGS,
    P.verifying: _forward_from(P.verifying) | _ENDINGS,
    P.installing: _forward_from(P.installing) | _ENDINGS,
    P.probation: _forward_from(P.probation) | _ENDINGS,
    # a fleet-wide rollback returns a succeeded device to its previous version
    P.succeeded: frozenset({P.rolled_back}),
    # a device that timed out may still finish (late reports are not lost)
    P.timed_out: frozenset(_PROGRESS[1:]) | frozenset({P.failed, P.rolled_back, P.cancelled}),
    P.failed: frozenset(),
    P.rolled_back: frozenset(),
    P.cancelled: frozenset(),
}


def rollout_transition(src: R, dst: R) -> R:
    if dst not in ROLLOUT_TRANSITIONS[src]:
        raise IllegalTransition("rollout", src.value, dst.value)
    return dst


def deployment_transition(src: P, dst: P) -> P:
    if dst not in DEPLOYMENT_TRANSITIONS[src]:
        raise IllegalTransition("deployment", src.value, dst.value)
    return dst


def can_deploy(src: P, dst: P) -> bool:
    return dst in DEPLOYMENT_TRANSITIONS[src]
