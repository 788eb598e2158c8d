"""CPU time per request and per-variant gates: the ``max_cpu_ratio`` gate on the robust per-device
health (server/rollouts/policy.py), per-variant judgement (server/rollouts/variants.py), and what
the ingest refuses and the rollup sums of the new window fields (server/health/)."""

from __future__ import annotations

from datetime import UTC, datetime
from types import SimpleNamespace

import pytest

from device_client.protocol import HealthWindow
from server.health.plausibility import Limits, implausible
from server.health.rollup import fold_batch
from server.health.tables import RESOURCE_FIELDS, ROUTING_FIELDS
from server.rollouts.policy import (
    DeviceHealth,
    Gates,
    HealthAggregate,
    StageCounts,
    evaluate_stage,
    robust_health,
)
from server.rollouts.variants import by_variant, evaluate_variants

SETTLED = StageCounts(total=10, succeeded=10, failed=0, in_flight=0)
#: only the CPU gate on: nothing else can explain a verdict
CPU_ONLY = {"max_error_rate": None, "max_p95_ratio": None, "min_agreement": None, "max_cpu_ratio": 1.5}
NOW = datetime(2030, 5, 1, 12, 0, tzinfo=UTC)
LIMITS = Limits(1000.0, 600.0, 300.0)


def dev(cpu_ms: float | None, requests: int = 100, variant: str | None = None, **kw) -> DeviceHealth:
    cpu_req = requests if cpu_ms is not None else 0
    return DeviceHealth(windows=1, requests=requests, cpu_requests=cpu_req,
                        cpu_weighted_ms=(cpu_ms or 0.0) * cpu_req, variant=variant, **kw)  # fmt: skip


@pytest.mark.parametrize(("cpu", "passed"), [(2.9, True), (3.0, True), (3.1, False), (8.0, False)])
def test_max_cpu_ratio_against_the_same_devices_baseline(cpu, passed):
    health = robust_health({f"d{i}": dev(cpu) for i in range(10)})
    baseline = robust_health({f"d{i}": dev(2.0) for i in range(10)})
    verdict = evaluate_stage(Gates(**CPU_ONLY), SETTLED, health, baseline, shadow=False)
    assert verdict.passed is passed, verdict.reasons
    assert verdict.numbers["cpu_ms_per_request"] == cpu
    assert verdict.numbers["baseline_cpu_ms_per_request"] == 2.0
    assert verdict.numbers["cpu_ratio"] == round(cpu / 2.0, 3)
    if not passed:
        assert verdict.reasons == [f"CPU per request {cpu / 2.0:.2f}x the same devices' baseline > 1.5x"]


def test_windows_without_cpu_time_do_not_count_and_no_cpu_at_all_is_not_judged():
    # old devices (no CPU time) beside new ones: only the new ones' CPU time is judged
    mixed = {**{f"old{i}": dev(None, 1000) for i in range(5)}, **{f"new{i}": dev(5.0) for i in range(5)}}
    base = {**{f"old{i}": dev(None, 1000) for i in range(5)}, **{f"new{i}": dev(1.0) for i in range(5)}}
    verdict = evaluate_stage(
        Gates(**CPU_ONLY), SETTLED, robust_health(mixed), robust_health(base), shadow=False
    )
    assert verdict.reasons == ["CPU per request 5.00x the same devices' baseline > 1.5x"]
    old = {f"old{i}": dev(None) for i in range(5)}
    for health, baseline in ((old, base), (mixed, old)):  # no CPU time on either side: no data
        verdict = evaluate_stage(
            Gates(**CPU_ONLY), SETTLED, robust_health(health), robust_health(baseline), shadow=False
        )
        assert verdict.passed
        assert "cpu_ratio" not in verdict.numbers
    # a shadow stage's windows carry no CPU time of the candidate: never judged
    assert evaluate_stage(
        Gates(**CPU_ONLY), SETTLED, robust_health(mixed), robust_health(base), shadow=True
    ).passed


def test_one_lying_device_cannot_trip_the_cpu_gate():
    health = {**{f"d{i}": dev(2.0) for i in range(9)}, "liar": dev(10_000.0, 1_000_000)}
    baseline = {f"d{i}": dev(2.0) for i in [*range(9)]} | {"liar": dev(2.0)}
    verdict = evaluate_stage(
        Gates(**CPU_ONLY), SETTLED, robust_health(health), robust_health(baseline), shadow=False
    )
    assert verdict.passed
    assert verdict.numbers["cpu_ratio"] == 1.0


def test_cpu_gate_is_off_by_default_and_positive():
    assert Gates().max_cpu_ratio is None
    assert Gates.model_validate({"max_cpu_ratio": "1.3"}).max_cpu_ratio == 1.3  # as `--gate` sends it
    for bad in (0, -1):
        with pytest.raises(ValueError, match="max_cpu_ratio"):
            Gates(max_cpu_ratio=bad)
    health = HealthAggregate(requests=100, cpu_ms_per_request=100.0)
    verdict = evaluate_stage(Gates(), SETTLED, health, HealthAggregate(cpu_ms_per_request=1.0), shadow=False)
    assert verdict.passed
    assert "cpu_ratio" not in verdict.numbers


def p95(ms: float, variant: str | None, requests: int = 100, errors: int = 0) -> DeviceHealth:
    return DeviceHealth(windows=1, requests=requests, errors=errors, p95_requests=requests,
                        p95_weighted_ms=ms * requests, variant=variant)  # fmt: skip


def test_a_breach_in_one_variant_names_it_and_the_other_passes():
    gates = Gates(max_p95_ratio=1.5, min_agreement=None)
    # int8 devices got slow; fp32 ones are as before. Mixed, the stage's p95 ratio stays below 1.5
    health = {
        **{f"f{i}": p95(10.0, "default") for i in range(5)},
        **{f"i{i}": p95(9.0, "int8") for i in range(5)},
    }
    base = {**{f"f{i}": p95(10.0, None) for i in range(5)}, **{f"i{i}": p95(3.0, None) for i in range(5)}}
    result = evaluate_variants(gates, SETTLED, health, base, shadow=False)
    assert not result.verdict.passed
    assert result.verdict.reasons == ["variant int8: p95 3.00x the same devices' baseline > 1.5x"]
    assert result.variants["int8"]["p95_ratio"] == 3.0
    assert result.variants["default"]["p95_ratio"] == 1.0
    assert set(result.variants) == {"default", "int8"}
    # the verdict's numbers are the whole stage's, as with one variant
    assert result.verdict.numbers["devices"] == 10


def test_errors_and_cpu_per_variant():
    gates = Gates(max_error_rate=0.05, max_p95_ratio=None, min_agreement=None, max_cpu_ratio=2.0)
    health = {
        **{f"f{i}": dev(4.0, variant="default", errors=0) for i in range(4)},
        **{f"i{i}": dev(1.0, variant="int8", errors=20) for i in range(4)},
    }
    base = {**{f"f{i}": dev(1.0) for i in range(4)}, **{f"i{i}": dev(1.0) for i in range(4)}}
    result = evaluate_variants(gates, SETTLED, health, base, shadow=False)
    assert result.verdict.reasons == [
        "variant default: CPU per request 4.00x the same devices' baseline > 2.0x",
        "variant int8: error rate 0.2000 > 0.05",
    ]


def test_a_single_variant_is_judged_as_the_whole_stage():
    gates = Gates(max_p95_ratio=1.5, min_agreement=None)
    health = {f"d{i}": p95(9.0, "int8") for i in range(5)}
    base = {f"d{i}": p95(3.0, None) for i in range(5)}
    result = evaluate_variants(gates, SETTLED, health, base, shadow=False)
    whole = evaluate_stage(gates, SETTLED, robust_health(health), robust_health(base), shadow=False)
    assert result.verdict == whole
    assert result.variants == {}
    assert whole.reasons == ["p95 3.00x the same devices' baseline > 1.5x"]


def test_deployment_failures_are_judged_over_the_whole_stage():
    gates = Gates(max_p95_ratio=None, min_agreement=None, max_failure_ratio=0.1)
    counts = StageCounts(total=10, succeeded=8, failed=2, in_flight=0)
    health = {"a": p95(1.0, "default"), "b": p95(1.0, "int8")}
    result = evaluate_variants(gates, counts, health, {}, shadow=False)
    assert result.verdict.reasons == ["failure ratio 0.200 > 0.1"]


def test_windows_without_a_variant_count_as_default():
    groups = by_variant({"old": p95(1.0, None), "new": p95(1.0, "default"), "q": p95(1.0, "int8")})
    assert {v: sorted(g) for v, g in groups.items()} == {"default": ["new", "old"], "int8": ["q"]}


def window(**kw) -> HealthWindow:
    fields = {"device_id": "d1", "seq": 1, "at": NOW, "window_s": 10.0, "model": "det", "version": "2.0.0",
              "requests": 100, "errors": 0, "p95_ms": 4.0}  # fmt: skip
    return HealthWindow.build(**{**fields, **kw})


def test_an_honest_window_with_cpu_rss_and_variant_is_plausible():
    assert (
        implausible(window(cpu_ms_per_request=3.5, rss_bytes=200 << 20, variant="int8"), NOW, LIMITS) is None
    )


@pytest.mark.parametrize(
    ("fields", "detail"),
    [
        ({"requests": 0, "cpu_ms_per_request": 1.0}, "cpu_ms_per_request 1 without requests"),
        (
            {"cpu_ms_per_request": 200_000.0},
            "cpu_ms_per_request 200000 x 100 requests > 1.024e+07 ms of CPU in 10s",
        ),
        ({"rss_bytes": 1 << 50}, f"rss_bytes {1 << 50} > {1 << 44}"),
    ],
)
def test_absurd_cpu_or_memory_is_refused(fields, detail):
    assert implausible(window(**fields), NOW, LIMITS) == ("implausible_resources", detail)


@pytest.mark.parametrize(
    "fields", [{"cpu_ms_per_request": -1.0}, {"rss_bytes": -5}, {"variant": "Bad Name!"}]
)
def test_negative_values_never_parse(fields):
    with pytest.raises(ValueError):
        window(**fields)


def raw(i: int, requests: int, **fields) -> SimpleNamespace:
    values = dict.fromkeys(ROUTING_FIELDS + RESOURCE_FIELDS) | fields
    return SimpleNamespace(id=i, device_id="d1", model="det", version="2.0.0", mode="serve", at=NOW,
                           requests=requests, errors=0, p95_ms=5.0, shadow_requests=None, agreement=None,
                           **values)  # fmt: skip


def test_a_rollup_keeps_the_request_weighted_cpu_sum_and_the_variant():
    rows = [
        raw(1, 100, cpu_ms_per_request=2.0, variant="int8", rss_bytes=1 << 20),
        raw(2, 300, cpu_ms_per_request=4.0, variant="int8"),
        raw(3, 1000),  # an older device's window: no CPU time, no variant
    ]
    (r,) = fold_batch(rows, 3600)
    assert (r["requests"], r["cpu_requests"]) == (1400, 400)
    assert r["cpu_weighted_ms"] == pytest.approx(2.0 * 100 + 4.0 * 300)
    assert r["variant"] == "int8"
    assert "rss_bytes" not in r
