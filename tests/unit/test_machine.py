"""The rollout and deployment state machines (docs/architecture.md, "State machines")."""

from __future__ import annotations

import itertools

import pytest

from device_client.protocol.messages import DeploymentPhase as P
from server.rollouts.machine import (
    DEPLOYMENT_TRANSITIONS,
    ROLLOUT_TRANSITIONS,
    IllegalTransition,
    deployment_transition,
    rollout_transition,
)
from server.rollouts.tables import RolloutStatus as R

LEGAL_ROLLOUT = {
    (R.draft, R.running), (R.draft, R.aborted),
    (R.running, R.paused), (R.paused, R.running),
    (R.running, R.completed),
    (R.running, R.aborted), (R.paused, R.aborted),
    (R.running, R.rolling_back), (R.paused, R.rolling_back),
    (R.rolling_back, R.rolled_back),
}  # fmt: skip


@pytest.mark.parametrize(("src", "dst"), list(itertools.product(R, R)))
def test_rollout_table_is_exactly_the_design(src, dst):
    if (src, dst) in LEGAL_ROLLOUT:
        assert rollout_transition(src, dst) == dst
    else:
        with pytest.raises(IllegalTransition, match=f"{src.value} -> {dst.value}"):
            rollout_transition(src, dst)


def test_every_status_has_a_row():
    assert set(ROLLOUT_TRANSITIONS) == set(R)
    assert set(DEPLOYMENT_TRANSITIONS) == set(P)


def test_deployment_happy_path_and_skips():
    path = [P.pending, P.notified, P.downloading, P.verifying, P.installing, P.probation, P.succeeded]
    for src, dst in itertools.pairwise(path):
        assert deployment_transition(src, dst) == dst
    assert deployment_transition(P.notified, P.installing) == P.installing  # bundle already on the device
    assert deployment_transition(P.probation, P.rolled_back) == P.rolled_back
    assert deployment_transition(P.succeeded, P.rolled_back) == P.rolled_back  # fleet-wide rollback
    assert deployment_transition(P.timed_out, P.succeeded) == P.succeeded  # a late device finishes


@pytest.mark.parametrize(
    ("src", "dst"),
    [
        (P.succeeded, P.downloading),
        (P.installing, P.downloading),  # no going back
        (P.probation, P.verifying),
        (P.failed, P.succeeded),  # terminal
        (P.rolled_back, P.succeeded),
        (P.cancelled, P.notified),
        (P.pending, P.succeeded),  # must be notified first
        (P.succeeded, P.failed),
    ],
)
def test_illegal_deployment_transitions_raise(src, dst):
    with pytest.raises(IllegalTransition):
        deployment_transition(src, dst)


def test_terminal_phases_have_no_way_out():
    for phase in (P.failed, P.rolled_back, P.cancelled):
        assert DEPLOYMENT_TRANSITIONS[phase] == frozenset()
