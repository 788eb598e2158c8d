"""Health and gates per variant of a rollout's version (docs/architecture.md, "Per-variant gates").

The devices of a stage are grouped by the variant the server signed for them (the engine), or
else by the one their health windows for the new version name (windows without one:
``default``). With one variant the stage is judged as a whole, as
:func:`server.rollouts.policy.evaluate_stage` does. With several, each variant's devices are judged
against their own baseline (the same devices' health before the rollout), and a breach names the
variant. Deployment outcomes (failures, nothing finished) are judged over the whole stage.

Pure: the engine feeds per-device sums.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from server.health.sums import DeviceHealth
from server.rollouts.policy import (
    Gates,
    HealthAggregate,
    StageCounts,
    Verdict,
    count_reasons,
    evaluate_stage,
    health_reasons,
    robust_health,
)

#: the variant of a device whose windows name none (older devices)
DEFAULT_VARIANT = "default"


def by_variant(
    per_device: Mapping[str, DeviceHealth], assigned: Mapping[str, str] | None = None
) -> dict[str, dict[str, DeviceHealth]]:
    """Per-device health grouped by variant, variants sorted: the variant ``assigned`` to each
    device (the one the server signed for it; a device not in it: ``default``), else (None) the
    one its windows name."""
    groups: dict[str, dict[str, DeviceHealth]] = {}
    for device_id in sorted(per_device):
        h = per_device[device_id]
        variant = h.variant if assigned is None else assigned.get(device_id)
        groups.setdefault(variant or DEFAULT_VARIANT, {})[device_id] = h
    return dict(sorted(groups.items()))


def variant_summary(health: HealthAggregate) -> dict[str, float | int | None]:
    """What a status view shows of one variant's health."""
    return {
        "devices_reporting": health.devices,
        "requests": health.requests_reported,
        "errors": health.errors,
        "error_rate": None if health.error_rate is None else round(health.error_rate, 4),
        "p95_ms": None if health.p95_ms is None else round(health.p95_ms, 3),
        "cpu_ms_per_request": (
            None if health.cpu_ms_per_request is None else round(health.cpu_ms_per_request, 4)
        ),
    }


@dataclass(frozen=True)
class VariantVerdict:
    """A stage's verdict, and each variant's numbers (empty with a single variant)."""

    verdict: Verdict
    variants: dict[str, dict[str, float | int | None]] = field(default_factory=dict)


def evaluate_variants(
    gates: Gates,
    counts: StageCounts,
    per_device: Mapping[str, DeviceHealth],
    baseline_per_device: Mapping[str, DeviceHealth],
    *,
    shadow: bool,
    assigned: Mapping[str, str] | None = None,
) -> VariantVerdict:
    """Judge a stage per variant of the new version (:func:`evaluate_stage` when there is one).

    ``per_device``: the stage devices' health for the new version; ``baseline_per_device``: the
    same devices' baseline; ``assigned``: the variant the server signed for each device, which
    groups them (:func:`by_variant`). The verdict's numbers are the whole stage's (as with one
    variant); each variant's reasons are prefixed ``variant <name>: ``."""
    groups = by_variant(per_device, assigned)
    whole = evaluate_stage(
        gates, counts, robust_health(per_device), robust_health(baseline_per_device), shadow=shadow
    )
    if len(groups) <= 1:
        return VariantVerdict(whole)
    reasons = count_reasons(gates, counts)
    variants: dict[str, dict[str, float | int | None]] = {}
    for name, devices in groups.items():
        base = robust_health({d: baseline_per_device[d] for d in devices if d in baseline_per_device})
        numbers: dict[str, float | int | None] = {}
        found = health_reasons(gates, robust_health(devices), base, numbers, shadow=shadow)
        variants[name] = numbers
        reasons += [f"variant {name}: {r}" for r in found]
    verdict = Verdict(passed=not reasons, reasons=reasons, numbers=whole.numbers)
    return VariantVerdict(verdict, variants)
