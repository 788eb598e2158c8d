"""Pure rollout policy (server/rollouts/policy.py): the p95 gates and stage membership."""

from __future__ import annotations

import pytest

from server.rollouts.policy import (
    Gates,
    HealthAggregate,
    StageCounts,
    assign_stages,
    evaluate_stage,
    membership_order,
)

SETTLED = StageCounts(total=4, succeeded=4, failed=0, in_flight=0)
BASELINE = HealthAggregate(requests=400, errors=0, p95_ms=10.0)
#: only the gate under test is on: the others cannot explain a verdict
ONLY_P95_MS = Gates(max_error_rate=None, max_p95_ratio=None, min_agreement=None, max_p95_ms=20.0)
ONLY_P95_RATIO = Gates(max_error_rate=None, max_p95_ratio=1.5, min_agreement=None)


def health(p95_ms: float | None) -> HealthAggregate:
    return HealthAggregate(requests=400, errors=0, p95_ms=p95_ms)


@pytest.mark.parametrize(
    ("p95", "passed"), [(19.99, True), (20.0, True), (20.01, False), (35.0, False)]
)
def test_max_p95_ms_trips_above_the_limit_only(p95, passed):
    verdict = evaluate_stage(ONLY_P95_MS, SETTLED, health(p95), BASELINE, shadow=False)
    assert verdict.passed is passed, verdict.reasons
    assert verdict.numbers["p95_ms"] == round(p95, 3)
    if passed:
        assert verdict.reasons == []
    else:
        assert verdict.reasons == [f"p95 {p95:.2f} ms > 20.0 ms"]


def test_max_p95_ms_ignores_the_baseline():
    """An absolute limit: a stage as slow as its own baseline still trips it."""
    slow = HealthAggregate(requests=400, errors=0, p95_ms=30.0)
    verdict = evaluate_stage(ONLY_P95_MS, SETTLED, slow, slow, shadow=False)
    assert not verdict.passed
    assert verdict.reasons == ["p95 30.00 ms > 20.0 ms"]


@pytest.mark.parametrize(
    ("p95", "passed"), [(14.99, True), (15.0, True), (15.01, False), (20.0, False)]
)
def test_max_p95_ratio_trips_against_the_same_devices_baseline(p95, passed):
    verdict = evaluate_stage(ONLY_P95_RATIO, SETTLED, health(p95), BASELINE, shadow=False)
    assert verdict.passed is passed, verdict.reasons
    assert verdict.numbers["baseline_p95_ms"] == 10.0
    assert verdict.numbers["p95_ratio"] == round(p95 / 10.0, 3)
    if passed:
        assert verdict.reasons == []
    else:
        assert verdict.reasons == [f"p95 {p95 / 10.0:.2f}x the same devices' baseline > 1.5x"]


def test_max_p95_ratio_is_relative_not_absolute():
    """200 ms is fine on devices whose baseline was 150 ms, 20 ms is not on ones at 10 ms."""
    fine = evaluate_stage(
        ONLY_P95_RATIO, SETTLED, health(200.0), HealthAggregate(requests=400, p95_ms=150.0), shadow=False
    )
    assert fine.passed, fine.reasons
    assert fine.numbers["p95_ratio"] == pytest.approx(1.333, abs=1e-3)
    assert not evaluate_stage(ONLY_P95_RATIO, SETTLED, health(20.0), BASELINE, shadow=False).passed


@pytest.mark.parametrize(
    ("stage_p95", "baseline_p95"), [(None, 10.0), (50.0, None)], ids=["no-stage-p95", "no-baseline"]
)
def test_max_p95_ratio_without_both_numbers_does_not_judge(stage_p95, baseline_p95):
    """No latency reported by the stage, or no pre-rollout baseline (a first install): nothing to
    compare, so the ratio gate neither trips nor appears in the numbers."""
    verdict = evaluate_stage(
        ONLY_P95_RATIO, SETTLED, health(stage_p95), HealthAggregate(p95_ms=baseline_p95), shadow=False
    )
    assert verdict.passed, verdict.reasons
    assert "p95_ratio" not in verdict.numbers


def test_both_p95_gates_report_together():
    gates = Gates(max_error_rate=None, min_agreement=None, max_p95_ms=20.0, max_p95_ratio=1.5)
    verdict = evaluate_stage(gates, SETTLED, health(40.0), BASELINE, shadow=False)
    assert verdict.reasons == ["p95 40.00 ms > 20.0 ms", "p95 4.00x the same devices' baseline > 1.5x"]


def test_p95_gates_off_let_any_latency_pass():
    gates = Gates(max_error_rate=None, min_agreement=None, max_p95_ms=None, max_p95_ratio=None)
    verdict = evaluate_stage(gates, SETTLED, health(10_000.0), BASELINE, shadow=False)
    assert verdict.passed, verdict.reasons


DEVICES = [f"dev-{i:03d}" for i in range(200)]


def test_membership_is_deterministic_for_a_rollout():
    first = membership_order("rollout-a", DEVICES)
    assert sorted(first) == DEVICES
    assert membership_order("rollout-a", DEVICES) == first
    # the order depends on the ids only, not on how they were listed
    assert membership_order("rollout-a", reversed(DEVICES)) == first
    assert assign_stages("rollout-a", reversed(DEVICES), [2, 20, 200]) == assign_stages(
        "rollout-a", DEVICES, [2, 20, 200]
    )


def test_membership_differs_between_rollouts():
    a = membership_order("rollout-a", DEVICES)
    b = membership_order("rollout-b", DEVICES)
    assert a != b
    assert a[:10] != b[:10]  # not the same canaries
    assert a != DEVICES  # and not simply the listed order


def test_assign_stages_puts_each_device_in_its_first_stage():
    stage_of = assign_stages("rollout-a", DEVICES, [2, 20, 200])
    order = membership_order("rollout-a", DEVICES)
    assert [d for d in order if stage_of[d] == 0] == order[:2]
    assert [d for d in order if stage_of[d] == 1] == order[2:20]
    assert sorted(stage_of.values()).count(2) == 180
