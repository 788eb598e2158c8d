"""The hybrid routing gates (server/rollouts/policy.py): max_escalation_rate, max_escalation_ratio
against the same devices' baseline, min_cloud_agreement, judged on the robust per-device health
(one lying device among ten changes no outcome)."""

from __future__ import annotations

import pytest

from server.rollouts.policy import (
    DeviceHealth,
    Gates,
    HealthAggregate,
    StageCounts,
    evaluate_stage,
    missing_evidence,
    robust_health,
)

SETTLED = StageCounts(total=10, succeeded=10, failed=0, in_flight=0)
#: only the hybrid gates on: nothing else can explain a verdict
OFF = {"max_error_rate": None, "max_p95_ratio": None, "min_agreement": None}


def routed(
    requests: int, rate: float, agreement: float | None = None, compared: int | None = None
) -> DeviceHealth:
    """One device's sums: ``rate`` of ``requests`` escalated, each compared (agreement share)."""
    escalations = round(requests * rate)
    compared = escalations if compared is None else compared
    return DeviceHealth(
        windows=1, requests=requests, routed_requests=requests, escalations=escalations,
        cloud_compared=compared if agreement is not None else 0,
        cloud_agreement_weighted=(agreement or 0.0) * compared if agreement is not None else 0.0,
    )  # fmt: skip


def stage(rate: float, agreement: float | None = None) -> HealthAggregate:
    return HealthAggregate(requests=1000, escalation_rate=rate, cloud_agreement=agreement, cloud_compared=100)


@pytest.mark.parametrize(("rate", "passed"), [(0.29, True), (0.3, True), (0.31, False), (0.9, False)])
def test_max_escalation_rate(rate, passed):
    gates = Gates(**OFF, max_escalation_rate=0.3)
    verdict = evaluate_stage(gates, SETTLED, stage(rate), HealthAggregate(), shadow=False)
    assert verdict.passed is passed
    assert verdict.reasons == ([] if passed else [f"escalation rate {rate:.4f} > 0.3"])
    assert verdict.numbers["escalation_rate"] == rate
    assert verdict.numbers["baseline_escalation_rate"] is None


@pytest.mark.parametrize(("rate", "passed"), [(0.15, True), (0.2, True), (0.21, False)])
def test_max_escalation_ratio_against_the_baseline(rate, passed):
    gates = Gates(**OFF, max_escalation_ratio=2.0)
    baseline = HealthAggregate(requests=1000, escalation_rate=0.1)
    verdict = evaluate_stage(gates, SETTLED, stage(rate), baseline, shadow=False)
    assert verdict.passed is passed, verdict.reasons
    assert verdict.numbers["escalation_ratio"] == round(rate / 0.1, 3)
    assert verdict.numbers["baseline_escalation_rate"] == 0.1
    if not passed:
        assert verdict.reasons == [f"escalation rate {rate / 0.1:.2f}x the same devices' baseline > 2.0x"]


@pytest.mark.parametrize("baseline_rate", [None, 0.0])
def test_the_escalation_ratio_is_not_judged_without_a_baseline_rate(baseline_rate):
    """No baseline (the devices ran without a policy) or one of 0 gives nothing to divide by:
    the ratio is neither judged nor shown (max_escalation_rate bounds the rate itself)."""
    gates = Gates(**OFF, max_escalation_ratio=1.5)
    baseline = HealthAggregate(escalation_rate=baseline_rate)
    verdict = evaluate_stage(gates, SETTLED, stage(0.9), baseline, shadow=False)
    assert verdict.passed
    assert "escalation_ratio" not in verdict.numbers


@pytest.mark.parametrize(
    ("agreement", "reasons"),
    [
        (0.95, []),
        (0.9, []),
        (0.89, ["cloud agreement 0.890 < 0.9"]),
        (None, ["no cloud agreement reported"]),
    ],
)
def test_min_cloud_agreement(agreement, reasons):
    gates = Gates(**OFF, min_cloud_agreement=0.9)
    verdict = evaluate_stage(gates, SETTLED, stage(0.2, agreement), HealthAggregate(), shadow=False)
    assert verdict.reasons == reasons
    assert verdict.numbers["cloud_agreement"] == agreement
    assert verdict.numbers["cloud_compared"] == 100


def test_a_stage_waits_for_a_cloud_agreement_like_for_a_shadow_one():
    gates = Gates(**OFF, min_cloud_agreement=0.9, min_requests=0)
    waiting = missing_evidence(gates, SETTLED, stage(0.2), 10, stage=0, shadow=False)
    assert waiting == ["no cloud agreement reported"]
    assert missing_evidence(gates, SETTLED, stage(0.2, 0.95), 10, stage=0, shadow=False) == []


def test_a_shadow_stage_is_not_judged_on_hybrid_gates():
    """A shadow candidate never answers, so its windows carry no routing figures: a shadow stage
    neither waits for them nor fails on them."""
    gates = Gates(**OFF, max_escalation_rate=0.1, min_cloud_agreement=0.99, min_requests=0)
    shadow = HealthAggregate(requests=1000, agreement=1.0)
    assert missing_evidence(gates, SETTLED, shadow, 10, stage=0, shadow=True) == []
    verdict = evaluate_stage(gates, SETTLED, shadow, HealthAggregate(), shadow=True)
    assert verdict.passed
    assert "escalation_rate" not in verdict.numbers


def test_without_hybrid_gates_or_figures_a_verdict_has_no_hybrid_numbers():
    verdict = evaluate_stage(
        Gates(), SETTLED, HealthAggregate(requests=1000), HealthAggregate(), shadow=False
    )
    assert not {"escalation_rate", "cloud_agreement"} & set(verdict.numbers)


# -- robust aggregation: one lying device among ten ----------------------------------------------
@pytest.mark.parametrize(
    ("honest", "liar", "gates", "passed"),
    [
        # a stage escalating half its requests, one device claiming it never escalates
        (routed(100, 0.5), routed(10**9, 0.0), {"max_escalation_rate": 0.3}, False),
        # a good stage, one device claiming it escalates everything
        (routed(100, 0.1), routed(10**9, 1.0), {"max_escalation_rate": 0.3}, True),
        # edge and cloud disagree often, one device claiming perfect agreement on a billion answers
        (
            routed(100, 0.2, agreement=0.6),
            routed(10**9, 1.0, agreement=1.0),
            {"min_cloud_agreement": 0.9},
            False,
        ),
        # they agree, one device claiming they never do
        (
            routed(100, 0.2, agreement=0.97),
            routed(10**9, 1.0, agreement=0.0),
            {"min_cloud_agreement": 0.9},
            True,
        ),
    ],
    ids=["high-escalation", "low-escalation", "low-agreement", "high-agreement"],
)
def test_one_lying_device_among_ten_does_not_change_the_outcome(honest, liar, gates, passed):
    devices = {f"d{i}": honest for i in range(9)}
    alone = robust_health(devices)
    lied = robust_health({**devices, "liar": liar})
    assert lied.escalation_rate == pytest.approx(alone.escalation_rate)
    if alone.cloud_agreement is not None:
        assert lied.cloud_agreement == pytest.approx(alone.cloud_agreement)
    verdict = evaluate_stage(Gates(**OFF, **gates), SETTLED, lied, HealthAggregate(), shadow=False)
    assert verdict.passed is passed, verdict.reasons


def test_devices_without_routing_figures_do_not_count():
    """Windows without routing counts (no policy yet) add no requests to the escalation rate's
    denominator, and no device without comparisons weighs on the cloud agreement."""
    plain = DeviceHealth(windows=1, requests=100)
    agg = robust_health(
        {"a": routed(100, 0.4, agreement=0.8), "b": plain, "c": routed(100, 0.4, agreement=0.8)}
    )
    assert agg.escalation_rate == pytest.approx(0.4)
    assert agg.cloud_agreement == pytest.approx(0.8)
    assert agg.cloud_compared == 80
    assert robust_health({"b": plain}).escalation_rate is None
