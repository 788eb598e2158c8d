"""Pure rollout policy: stage membership, stage sizes, gate evaluation (docs/architecture.md,
"Rollouts and gates"), and the robust aggregation of the stage devices' health that the gates judge.

Nothing here touches the database or the clock; the engine feeds it numbers.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from statistics import median_low

from pydantic import BaseModel, ConfigDict, Field, model_validator

from server.health.sums import DeviceHealth


class Stage(BaseModel):
    """One stage: a cumulative share (``percent``) or number (``count``) of the selected devices."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    percent: float | None = Field(default=None, gt=0, le=100)
    count: int | None = Field(default=None, ge=1)
    soak_s: float = Field(default=60.0, ge=0, le=30 * 86400)
    #: the new model runs beside the serving one and never answers; gated on agreement
    shadow: bool = False
    #: once this stage passes its gates the rollout pauses: the next stage starts only when an
    #: operator resumes it (an approval); ignored on the last stage
    pause_after: bool = False

    @model_validator(mode="after")
    def _one_size(self) -> Stage:
        if (self.percent is None) == (self.count is None):
            raise ValueError("a stage needs exactly one of percent or count")
        return self

    def size(self, total: int) -> int:
        if self.count is not None:
            return min(self.count, total)
        assert self.percent is not None
        return min(total, max(1, math.ceil(total * self.percent / 100)))


class Gates(BaseModel):
    """Health gates, judged once a stage's soak has ended and it has enough evidence."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_failure_ratio: float = Field(default=0.1, ge=0, le=1)
    max_error_rate: float | None = Field(default=0.05, ge=0, le=1)
    max_p95_ms: float | None = Field(default=None, gt=0)
    max_p95_ratio: float | None = Field(default=1.5, gt=0)
    min_agreement: float | None = Field(default=0.95, ge=0, le=1)
    #: hybrid routing, judged on serve stages: the share of requests escalated to the cloud, the
    #: same against the same devices' baseline (like ``max_p95_ratio``), and how often the edge
    #: answer matched the cloud's (absolute; a stage waits for the figure, like ``min_agreement``)
    max_escalation_rate: float | None = Field(default=None, ge=0, le=1)
    max_escalation_ratio: float | None = Field(default=None, gt=0)
    min_cloud_agreement: float | None = Field(default=None, ge=0, le=1)
    #: CPU time per request against the same devices' baseline (like ``max_p95_ratio``); windows
    #: without a CPU time (older devices) do not count, and no CPU time at all is not judged
    max_cpu_ratio: float | None = Field(default=None, gt=0)
    #: requests the stage's devices must have reported for the new version (each device counted
    #: up to the median device's count) before the gates are judged; 0 lets idle devices pass on
    #: install success and their (empty) health windows alone
    min_requests: int = Field(default=100, ge=0)
    #: devices of the stage that must have succeeded and reported health for the new version
    #: before the gates are judged: the larger of this and ``min_succeeded_percent`` of the
    #: stage's devices, at most the stage's devices
    min_succeeded: int = Field(default=1, ge=1)
    min_succeeded_percent: float = Field(default=0.0, ge=0, le=100)
    #: how long a soaked stage waits for that evidence before the rollout pauses
    stage_timeout_s: float = Field(default=3600.0, gt=0, le=30 * 86400)


def check_stages(stages: Sequence[Stage], total: int) -> tuple[list[Stage], list[int]]:
    """The stages as run on a selection of ``total`` devices and their cumulative device counts.

    Percent stages whose percents grow but that resolve to the same number of devices on this
    selection (1% and 10% of 8 devices are both 1 device) are merged: the later stage is kept (its
    percent, soak and shadow), the earlier one dropped, so ``1,10,50,100`` runs as one stage on a
    single device; the merged stage pauses for approval if either asked to (``pause_after``). A
    shadow stage followed by a serve stage is never merged: the serve stage may cover the same
    devices (it switches them from shadowing to serving), so a shadow canary still runs on a fleet
    of one. Anything else raises ValueError unless the counts strictly grow
    (percents or counts given in an order that does not grow, a count no larger than the stage
    before) and the last stage takes every selected device (a rollout never leaves part of its
    selection out: narrow the selector for that)."""
    if not stages:
        raise ValueError("a rollout needs at least one stage")
    kept: list[Stage] = []
    sizes: list[int] = []
    numbers: list[int] = []  # 1-based position of each kept stage in the request, for messages
    for i, stage in enumerate(stages, start=1):
        size = stage.size(total)
        if kept:
            prev = kept[-1]
            to_serve = prev.shadow and not stage.shadow  # the same devices may go on to serve
            if (
                size == sizes[-1]
                and not to_serve
                and stage.percent is not None
                and prev.percent is not None
                and stage.percent > prev.percent
            ):
                if prev.pause_after and not stage.pause_after:  # an approval asked for is kept
                    stage = stage.model_copy(update={"pause_after": True})
                kept[-1], numbers[-1] = stage, i  # the same devices: one stage, the later one's
                continue
            if size < sizes[-1] or (size == sizes[-1] and not to_serve):
                raise ValueError(
                    f"stages must grow: stage {i} covers {size} device(s), "
                    f"not more than stage {numbers[-1]}'s {sizes[-1]} (of {total} selected)"
                )
        kept.append(stage)
        sizes.append(size)
        numbers.append(i)
    if sizes[-1] != total:
        raise ValueError(
            f"the last stage covers {sizes[-1]} of the {total} selected devices; it must cover them all "
            "(percent 100, or a count of at least the selection); narrow the selector to deploy to fewer"
        )
    return kept, sizes


def membership_order(rollout_id: str, device_ids: Iterable[str]) -> list[str]:
    """Devices ordered by sha256(rollout_id/device_id): stable for a rollout, random across rollouts."""
    return sorted(device_ids, key=lambda d: hashlib.sha256(f"{rollout_id}/{d}".encode()).digest())


def assign_stages(rollout_id: str, device_ids: Iterable[str], sizes: Sequence[int]) -> dict[str, int]:
    """device id -> index of the first stage that includes it."""
    order = membership_order(rollout_id, device_ids)
    result: dict[str, int] = {}
    start = 0
    for stage, end in enumerate(sizes):
        for d in order[start:end]:
            result[d] = stage
        start = end
    return result


#: share of the devices dropped at each end before a stage's health numbers are averaged
TRIM_SHARE = 0.1


@dataclass(frozen=True)
class HealthAggregate:
    """Health of a set of devices over a time span.

    From :func:`robust_health` (the gates): ``requests`` counts each device up to the median
    device's count, ``errors`` is the sum reported, ``error_rate``, ``p95_ms``, ``agreement``,
    ``escalation_rate`` and ``cloud_agreement`` are trimmed means of the devices' own numbers.
    From :func:`aggregate`: plain sums and request-weighted means of the windows."""

    requests: int = 0
    errors: int = 0
    p95_ms: float | None = None
    shadow_requests: int = 0
    agreement: float | None = None
    #: errors / requests when not given
    error_rate: float | None = None
    #: devices that reported at least one window, and the requests they reported (uncapped)
    devices: int = 0
    requests_reported: int = 0
    #: hybrid routing: escalations over the requests of windows that reported them; edge answers
    #: compared with the cloud's (each device capped at the median's) and how often they matched
    escalation_rate: float | None = None
    cloud_compared: int = 0
    cloud_agreement: float | None = None
    #: mean CPU time per request (trimmed mean of the devices' own request-weighted means)
    cpu_ms_per_request: float | None = None

    def __post_init__(self) -> None:
        if self.error_rate is None and self.requests:
            object.__setattr__(self, "error_rate", self.errors / self.requests)


def aggregate(windows: Iterable[tuple[int, int, float | None, int | None, float | None]]) -> HealthAggregate:
    """Aggregate ``(requests, errors, p95_ms, shadow_requests, agreement)`` windows.

    p95 is the request-weighted mean of the windows' p95 (a window p95 is all a device reports);
    agreement is weighted by shadow requests.
    """
    req = err = sreq = 0
    p95_sum = p95_w = agree_sum = 0.0
    for requests, errors, p95, shadow_requests, agreement in windows:
        req += requests
        err += errors
        if p95 is not None and requests:
            p95_sum += p95 * requests
            p95_w += requests
        if shadow_requests and agreement is not None:
            sreq += shadow_requests
            agree_sum += agreement * shadow_requests
    return HealthAggregate(
        requests=req,
        errors=err,
        p95_ms=p95_sum / p95_w if p95_w else None,
        shadow_requests=sreq,
        agreement=agree_sum / sreq if sreq else None,
        requests_reported=req,
    )


def trim_count(n: int) -> int:
    """Devices dropped at each end of ``n`` sorted values: ``ceil(TRIM_SHARE * n)``, but at least
    one value is always left (none dropped of 1 or 2, one of 3 to 10, two of 11 to 20...)."""
    return max(0, min(math.ceil(n * TRIM_SHARE), (n - 1) // 2))


def robust_mean(points: Sequence[tuple[float, int]]) -> float | None:
    """Trimmed, capped-weight mean of per-device ``(value, weight)`` pairs (weights > 0).

    The :func:`trim_count` lowest and highest values are dropped; the rest are averaged, each
    weighted by its device's requests capped at the median device's (``median_low``). With one
    value dropped at each end, a single device can never move the result outside the range of
    the other devices' values; the cap keeps a device with far more requests than the others
    from outweighing them."""
    if not points:
        return None
    cap = median_low([w for _, w in points])
    k = trim_count(len(points))
    kept = sorted(points, key=lambda p: p[0])[k : len(points) - k]
    total = sum(min(w, cap) for _, w in kept)
    return sum(v * min(w, cap) for v, w in kept) / total


def capped_sum(counts: Iterable[int]) -> int:
    """Sum of the positive counts, each capped at their median (``median_low``): the evidence a
    set of devices holds, which no single device can inflate by more than a typical device's."""
    positive = [c for c in counts if c > 0]
    if not positive:
        return 0
    cap = median_low(positive)
    return sum(min(c, cap) for c in positive)


def robust_health(devices: Mapping[str, DeviceHealth]) -> HealthAggregate:
    """The health the gates judge, from each device's own numbers (see :func:`robust_mean`)."""
    rows = [devices[d] for d in sorted(devices)]
    compared = [r for r in rows if r.cloud_compared]
    return HealthAggregate(
        requests=capped_sum(r.requests for r in rows),
        errors=sum(r.errors for r in rows),
        error_rate=robust_mean([(r.errors / r.requests, r.requests) for r in rows if r.requests]),
        p95_ms=robust_mean(
            [(r.p95_weighted_ms / r.p95_requests, r.p95_requests) for r in rows if r.p95_requests]
        ),
        shadow_requests=capped_sum(r.shadow_requests for r in rows),
        agreement=robust_mean(
            [(r.agreement_weighted / r.shadow_requests, r.shadow_requests) for r in rows if r.shadow_requests]
        ),
        devices=len(rows),
        requests_reported=sum(r.requests for r in rows),
        escalation_rate=robust_mean(
            [(r.escalations / r.routed_requests, r.routed_requests) for r in rows if r.routed_requests]
        ),
        cloud_compared=capped_sum(r.cloud_compared for r in rows),
        cloud_agreement=robust_mean(
            [(r.cloud_agreement_weighted / r.cloud_compared, r.cloud_compared) for r in compared]
        ),
        cpu_ms_per_request=robust_mean(
            [(r.cpu_weighted_ms / r.cpu_requests, r.cpu_requests) for r in rows if r.cpu_requests]
        ),
    )


@dataclass(frozen=True)
class StageCounts:
    """Deployments of a stage by outcome (offline devices that have not moved are excluded)."""

    total: int
    succeeded: int
    failed: int  # failed + rolled_back + timed_out
    in_flight: int
    offline_waiting: int = 0

    @property
    def settled(self) -> bool:
        return self.in_flight == 0

    @property
    def failure_ratio(self) -> float:
        judged = self.succeeded + self.failed
        return self.failed / judged if judged else 0.0


@dataclass(frozen=True)
class Verdict:
    passed: bool
    reasons: list[str] = field(default_factory=list)
    numbers: dict[str, float | int | None] = field(default_factory=dict)


def required_succeeded(gates: Gates, stage_devices: int) -> int:
    """Devices that must have succeeded and reported health before a stage of ``stage_devices``
    devices is judged (``min_succeeded``, ``min_succeeded_percent``; at most the stage's)."""
    share = math.ceil(stage_devices * gates.min_succeeded_percent / 100 - 1e-9)
    return min(max(gates.min_succeeded, share), stage_devices)


def missing_evidence(
    gates: Gates,
    counts: StageCounts,
    health: HealthAggregate,
    succeeded_reporting: int,
    *,
    stage: int,
    shadow: bool,
) -> list[str]:
    """Why a settled, soaked stage (``stage``: its index) cannot be judged yet; empty when it can.

    ``succeeded_reporting``: the stage's succeeded devices that reported health for the new
    version since the stage started. A stage left without any device (every one decommissioned)
    has nothing to wait for: it passes empty, and the next stage needs its own evidence."""
    if counts.total == 0:
        return []
    reasons: list[str] = []
    need = required_succeeded(gates, counts.total)
    if succeeded_reporting < need:
        offline = f" ({counts.offline_waiting} offline)" if counts.offline_waiting else ""
        if counts.succeeded == 0 and counts.in_flight == 0 and counts.offline_waiting:
            reasons.append(f"no device of stage {stage + 1} is online{offline}")
        else:
            reasons.append(
                f"{succeeded_reporting} of the {need} device(s) needed have succeeded and reported "
                f"health{offline}"
            )
    if health.requests < gates.min_requests:
        reasons.append(f"{health.requests} requests reported (min_requests {gates.min_requests})")
    if shadow and gates.min_agreement is not None and health.agreement is None:
        reasons.append("no shadow agreement reported")
    if not shadow and gates.min_cloud_agreement is not None and health.cloud_agreement is None:
        reasons.append("no cloud agreement reported")
    return reasons


def evaluate_stage(
    gates: Gates,
    counts: StageCounts,
    health: HealthAggregate,
    baseline: HealthAggregate,
    *,
    shadow: bool,
) -> Verdict:
    """Whether a settled, soaked stage with enough evidence (:func:`missing_evidence`) may be
    promoted."""
    numbers = count_numbers(counts)
    reasons = count_reasons(gates, counts)
    reasons += health_reasons(gates, health, baseline, numbers, shadow=shadow)
    return Verdict(passed=not reasons, reasons=reasons, numbers=numbers)


def count_numbers(counts: StageCounts) -> dict[str, float | int | None]:
    """The deployment outcomes of a stage, as a verdict records them."""
    return {
        "devices": counts.total,
        "succeeded": counts.succeeded,
        "failed": counts.failed,
        "offline_waiting": counts.offline_waiting,
        "failure_ratio": round(counts.failure_ratio, 4),
    }


def count_reasons(gates: Gates, counts: StageCounts) -> list[str]:
    """Why a stage's deployment outcomes fail it (empty: they pass)."""
    reasons: list[str] = []
    if counts.succeeded + counts.failed == 0 and counts.total > counts.offline_waiting:
        reasons.append("no device of the stage finished")
    if counts.failure_ratio > gates.max_failure_ratio:
        reasons.append(f"failure ratio {counts.failure_ratio:.3f} > {gates.max_failure_ratio}")
    return reasons


def health_reasons(
    gates: Gates,
    health: HealthAggregate,
    baseline: HealthAggregate,
    numbers: dict[str, float | int | None],
    *,
    shadow: bool,
) -> list[str]:
    """Why the health of a stage's devices (or of one variant's) fails the gates (empty: it
    passes); its numbers go into ``numbers``."""
    reasons: list[str] = []
    numbers |= {
        "devices_reporting": health.devices,
        "requests": health.requests,
        "requests_reported": health.requests_reported,
        "error_rate": None if health.error_rate is None else round(health.error_rate, 4),
        "p95_ms": None if health.p95_ms is None else round(health.p95_ms, 3),
        "baseline_p95_ms": None if baseline.p95_ms is None else round(baseline.p95_ms, 3),
        "agreement": None if health.agreement is None else round(health.agreement, 4),
    }
    if (
        gates.max_error_rate is not None
        and health.error_rate is not None
        and health.error_rate > gates.max_error_rate
    ):
        reasons.append(f"error rate {health.error_rate:.4f} > {gates.max_error_rate}")
    if gates.max_p95_ms is not None and health.p95_ms is not None and health.p95_ms > gates.max_p95_ms:
        reasons.append(f"p95 {health.p95_ms:.2f} ms > {gates.max_p95_ms} ms")
    if gates.max_p95_ratio is not None and health.p95_ms is not None and baseline.p95_ms:
        ratio = health.p95_ms / baseline.p95_ms
        numbers["p95_ratio"] = round(ratio, 3)
        if ratio > gates.max_p95_ratio:
            reasons.append(f"p95 {ratio:.2f}x the same devices' baseline > {gates.max_p95_ratio}x")
    if shadow and gates.min_agreement is not None:
        if health.agreement is None:
            reasons.append("no shadow agreement reported")
        elif health.agreement < gates.min_agreement:
            reasons.append(f"shadow agreement {health.agreement:.3f} < {gates.min_agreement}")
    if not shadow:
        reasons += cpu_reasons(gates, health, baseline, numbers)
        reasons += hybrid_reasons(gates, health, baseline, numbers)
    return reasons


def _r4(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def cpu_reasons(
    gates: Gates, health: HealthAggregate, baseline: HealthAggregate, numbers: dict[str, float | int | None]
) -> list[str]:
    """The ``max_cpu_ratio`` gate of a serve stage, judged like ``max_p95_ratio``: not judged
    without CPU times of the new version or of the baseline. Its numbers go into ``numbers``
    whenever the gate asks for them or the devices reported them."""
    cpu, base = health.cpu_ms_per_request, baseline.cpu_ms_per_request
    if gates.max_cpu_ratio is not None or cpu is not None:
        numbers["cpu_ms_per_request"] = _r4(cpu)
        numbers["baseline_cpu_ms_per_request"] = _r4(base)
    if gates.max_cpu_ratio is None or cpu is None or not base:
        return []
    ratio = cpu / base
    numbers["cpu_ratio"] = round(ratio, 3)
    if ratio > gates.max_cpu_ratio:
        return [f"CPU per request {ratio:.2f}x the same devices' baseline > {gates.max_cpu_ratio}x"]
    return []


def hybrid_reasons(
    gates: Gates, health: HealthAggregate, baseline: HealthAggregate, numbers: dict[str, float | int | None]
) -> list[str]:
    """The hybrid routing gates of a serve stage: why they fail (empty: they pass). Their numbers
    go into ``numbers`` whenever a gate asks for them or the devices reported them."""
    esc_gated = gates.max_escalation_rate is not None or gates.max_escalation_ratio is not None
    if esc_gated or health.escalation_rate is not None or baseline.escalation_rate is not None:
        numbers["escalation_rate"] = _r4(health.escalation_rate)
        numbers["baseline_escalation_rate"] = _r4(baseline.escalation_rate)
    if gates.min_cloud_agreement is not None or health.cloud_agreement is not None:
        numbers["cloud_agreement"] = _r4(health.cloud_agreement)
        numbers["cloud_compared"] = health.cloud_compared
        numbers["baseline_cloud_agreement"] = _r4(baseline.cloud_agreement)
    reasons: list[str] = []
    rate = health.escalation_rate
    if gates.max_escalation_rate is not None and rate is not None and rate > gates.max_escalation_rate:
        reasons.append(f"escalation rate {rate:.4f} > {gates.max_escalation_rate}")
    if gates.max_escalation_ratio is not None and rate is not None and baseline.escalation_rate:
        ratio = rate / baseline.escalation_rate
        numbers["escalation_ratio"] = round(ratio, 3)
        if ratio > gates.max_escalation_ratio:
            reasons.append(
                f"escalation rate {ratio:.2f}x the same devices' baseline > {gates.max_escalation_ratio}x"
            )
    if gates.min_cloud_agreement is not None:
        if health.cloud_agreement is None:
            reasons.append("no cloud agreement reported")
        elif health.cloud_agreement < gates.min_cloud_agreement:
            reasons.append(f"cloud agreement {health.cloud_agreement:.3f} < {gates.min_cloud_agreement}")
    return reasons


def early_trip(gates: Gates, counts: StageCounts, stage_size: int) -> bool:
    """Trip before the soak ends once failures alone already exceed the gate for the whole stage."""
    return stage_size > 0 and counts.failed / stage_size > gates.max_failure_ratio
