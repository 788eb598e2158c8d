"""Pure rollout policy (server/rollouts/policy.py): the p95 gates, stage membership, the robust
stage health and the evidence a stage needs before it is judged."""

from __future__ import annotations

import pytest

from server.health.sums import DeviceHealth
from server.rollouts.policy import (
    Gates,
    HealthAggregate,
    StageCounts,
    assign_stages,
    capped_sum,
    evaluate_stage,
    membership_order,
    missing_evidence,
    required_succeeded,
    robust_health,
    robust_mean,
    trim_count,
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


# -- the robust stage health the gates judge -----------------------------------------------------
def device(requests: int, errors: int = 0, p95_ms: float | None = 5.0, **kw) -> DeviceHealth:
    p95_requests = requests if p95_ms is not None else 0
    return DeviceHealth(
        windows=1, requests=requests, errors=errors, p95_requests=p95_requests,
        p95_weighted_ms=(p95_ms or 0.0) * p95_requests, **kw,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("n", "k"), [(0, 0), (1, 0), (2, 0), (3, 1), (4, 1), (10, 1), (11, 2), (20, 2), (21, 3), (100, 10)]
)
def test_trim_count_drops_a_tenth_at_each_end_but_leaves_one(n, k):
    assert trim_count(n) == k


def test_robust_mean_drops_the_extremes_and_caps_weights_at_the_median():
    # (value, weight): the extremes go; of the rest 0.4 weighs 200 (its 300 capped at the median)
    points = [(0.0, 100), (0.2, 100), (0.4, 300), (0.5, 200), (0.9, 10_000)]
    assert robust_mean(points) == pytest.approx((0.2 * 100 + 0.4 * 200 + 0.5 * 200) / 500)
    assert robust_mean([]) is None
    assert robust_mean([(0.7, 5)]) == 0.7  # one device: nothing to drop


def test_capped_sum_counts_each_device_up_to_the_median():
    assert capped_sum([100, 100, 100, 2**31 - 1]) == 400
    assert capped_sum([0, 0, 50]) == 50  # idle devices add nothing, and do not lower the cap
    assert capped_sum([]) == 0


@pytest.mark.parametrize(
    ("honest", "liar"),
    [
        (device(100, 0, 5.0), device(2**31 - 1, 2**31 - 1, 10_000.0)),  # a good stage made bad
        (device(100, 30, 50.0), device(2**31 - 1, 0, 0.1)),  # a bad stage made good
    ],
    ids=["good-stage", "bad-stage"],
)
def test_one_device_among_ten_cannot_move_the_stage_health(honest, liar):
    """Request-weighted, the liar's two billion requests would be the whole stage; per device and
    trimmed, its numbers are dropped and the stage reads as its nine honest devices."""
    devices = {f"d{i}": honest for i in range(9)}
    alone = robust_health(devices)
    lied = robust_health({**devices, "liar": liar})
    assert lied.error_rate == pytest.approx(alone.error_rate)
    assert lied.p95_ms == pytest.approx(alone.p95_ms)
    assert lied.requests == 1000  # the liar counts as much as a typical device, no more
    assert (lied.devices, lied.requests_reported) == (10, 900 + 2**31 - 1)


def test_a_minority_of_bad_devices_still_shows():
    """Trimming drops one device at each end of ten, not a real minority: four devices failing
    every request lift the stage's error rate to 3/8."""
    devices = {f"ok{i}": device(100) for i in range(6)} | {f"bad{i}": device(100, 100) for i in range(4)}
    assert robust_health(devices).error_rate == pytest.approx(3 / 8)


def test_agreement_is_judged_per_device_too():
    shadow = {
        f"d{i}": DeviceHealth(windows=1, shadow_requests=50, agreement_weighted=50 * 0.99) for i in range(4)
    }
    liar = DeviceHealth(windows=1, shadow_requests=10**9, agreement_weighted=0.0)
    assert robust_health({**shadow, "liar": liar}).agreement == pytest.approx(0.99)


# -- evidence before a verdict --------------------------------------------------------------------
@pytest.mark.parametrize(
    ("gates", "stage_devices", "need"),
    [
        (Gates(), 10, 1),
        (Gates(min_succeeded=3), 10, 3),
        (Gates(min_succeeded=3), 2, 2),  # never more than the stage has
        (Gates(min_succeeded_percent=25), 10, 3),
        (Gates(min_succeeded=5, min_succeeded_percent=25), 10, 5),
        (Gates(min_succeeded_percent=100), 7, 7),
    ],
)
def test_required_succeeded(gates, stage_devices, need):
    assert required_succeeded(gates, stage_devices) == need


def evidence(counts: StageCounts, health: HealthAggregate, reporting: int, **gates) -> list[str]:
    return missing_evidence(Gates(**gates), counts, health, reporting, stage=0, shadow=False)


def test_a_stage_whose_devices_are_all_offline_has_no_evidence():
    counts = StageCounts(total=1, succeeded=0, failed=0, in_flight=0, offline_waiting=1)
    assert evidence(counts, HealthAggregate(), 0) == [
        "no device of stage 1 is online (1 offline)",
        "0 requests reported (min_requests 100)",
    ]


def test_a_stage_needs_succeeded_devices_that_reported_health_and_requests():
    counts = StageCounts(total=10, succeeded=10, failed=0, in_flight=0)
    busy = HealthAggregate(requests=1000, devices=10)
    assert evidence(counts, busy, 10) == []
    assert evidence(counts, busy, 0) == ["0 of the 1 device(s) needed have succeeded and reported health"]
    assert evidence(counts, busy, 4, min_succeeded_percent=50) == [
        "4 of the 5 device(s) needed have succeeded and reported health"
    ]
    assert evidence(counts, HealthAggregate(requests=99), 10) == ["99 requests reported (min_requests 100)"]
    assert evidence(counts, HealthAggregate(requests=0), 10, min_requests=0) == []  # idle, by choice


def test_a_shadow_stage_needs_agreement_and_an_empty_stage_nothing():
    counts = StageCounts(total=2, succeeded=2, failed=0, in_flight=0)
    health = HealthAggregate(requests=500, devices=2)
    missing = missing_evidence(Gates(), counts, health, 2, stage=0, shadow=True)
    assert missing == ["no shadow agreement reported"]
    assert missing_evidence(Gates(min_agreement=None), counts, health, 2, stage=0, shadow=True) == []
    empty = StageCounts(total=0, succeeded=0, failed=0, in_flight=0)  # every device decommissioned
    assert missing_evidence(Gates(), empty, HealthAggregate(), 0, stage=1, shadow=False) == []
