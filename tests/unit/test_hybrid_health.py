"""The hybrid routing fields of a health window: what is plausible (server/health/plausibility.py)
and their exact sums in a rollup (server/health/rollup.py)."""

from __future__ import annotations

from datetime import UTC, datetime
from types import SimpleNamespace

import pytest

from device_client.protocol import HealthWindow
from server.health.plausibility import Limits, implausible, implausible_routing
from server.health.rollup import fold_batch
from server.health.tables import RESOURCE_FIELDS, ROUTING_FIELDS

NOW = datetime(2030, 5, 1, 12, 0, tzinfo=UTC)


def window(**kw) -> HealthWindow:
    fields = {"device_id": "d1", "seq": 1, "at": NOW, "window_s": 10.0, "model": "det", "version": "2.0.0",
              "requests": 100, "errors": 0, "p95_ms": 4.0}  # fmt: skip
    return HealthWindow.build(**{**fields, **kw})


HONEST = {
    "answered_edge": 70, "answered_cloud": 25, "answered_cache": 5, "escalations": 30, "budget_limited": 3,
    "breaker_open": 2, "cloud_failed": 0, "escalation_rate": 0.3, "cloud_p95_ms": 40.0,
    "cloud_compared": 25, "cloud_agreement": 0.92,
}  # fmt: skip


def test_an_honest_routed_window_is_plausible():
    assert implausible(window(**HONEST), NOW, Limits(1000.0, 600.0, 300.0)) is None
    assert implausible_routing(window()) is None  # no routing fields at all
    assert implausible_routing(window(escalations=0, escalation_rate=0.0, cloud_compared=0)) is None


@pytest.mark.parametrize(
    ("fields", "detail"),
    [
        ({"escalations": 101}, "escalations 101 > 100 requests"),
        ({"answered_edge": 150}, "answered_edge 150 > 100 requests"),
        ({"answered_cloud": 101}, "answered_cloud 101 > 100 requests"),
        ({"answered_cache": 200}, "answered_cache 200 > 100 requests"),
        ({"cloud_compared": 101, "cloud_agreement": 0.5}, "cloud_compared 101 > 100 requests"),
        ({"cloud_compared": 0, "cloud_agreement": 1.0}, "cloud_agreement 1.0 with cloud_compared 0"),
        ({"cloud_compared": None, "cloud_agreement": 1.0}, "cloud_agreement 1.0 with cloud_compared None"),
        ({"cloud_compared": 10, "cloud_agreement": None}, "cloud_agreement None with cloud_compared 10"),
    ],
)
def test_implausible_routing_fields_are_refused(fields, detail):
    h = window(**{**HONEST, **fields})
    assert implausible(h, NOW, Limits(1000.0, 600.0, 300.0)) == ("implausible_routing", detail)


def raw(i: int, requests: int, **routing) -> SimpleNamespace:
    fields = dict.fromkeys(ROUTING_FIELDS + RESOURCE_FIELDS) | routing
    return SimpleNamespace(id=i, device_id="d1", model="det", version="2.0.0", mode="serve", at=NOW,
                           requests=requests, errors=0, p95_ms=5.0, shadow_requests=None, agreement=None,
                           **fields)  # fmt: skip


def test_a_rollup_keeps_exact_sums_of_the_routing_fields():
    windows = [
        raw(1, 100, **HONEST),
        raw(
            2,
            300,
            answered_edge=300,
            answered_cloud=0,
            answered_cache=0,
            escalations=0,
            budget_limited=0,
            breaker_open=0,
            cloud_failed=0,
            escalation_rate=0.0,
            cloud_compared=0,
        ),
        raw(
            3,
            50,
            escalations=50,
            answered_cloud=40,
            answered_cache=10,
            cloud_failed=10,
            cloud_compared=40,
            cloud_agreement=0.5,
            cloud_p95_ms=80.0,
        ),
        raw(4, 1000),  # no policy: no routing fields
    ]
    (r,) = fold_batch(windows, 3600)
    assert (r["requests"], r["routed_requests"], r["escalations"]) == (1450, 450, 80)
    assert (r["answered_edge"], r["answered_cloud"], r["answered_cache"]) == (370, 65, 15)
    assert (r["budget_limited"], r["breaker_open"], r["cloud_failed"]) == (3, 2, 10)
    assert r["cloud_compared"] == 65
    assert r["cloud_agreement_weighted"] == pytest.approx(25 * 0.92 + 40 * 0.5)
    assert (r["cloud_p95_calls"], r["cloud_p95_weighted_ms"]) == (65, pytest.approx(25 * 40.0 + 40 * 80.0))
