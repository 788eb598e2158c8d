"""The ingest supervisor's restart back-off (server/mqtt/workers.py): 1 s after a long life,
doubling up to 30 s while a child keeps dying young (a crash loop does not spin)."""

from __future__ import annotations

import time
from types import SimpleNamespace

from server.mqtt.workers import RESTART_DELAY_MAX_S, RESTART_DELAY_S, STABLE_S, IngestProcesses


def test_quick_deaths_double_the_delay_up_to_the_cap_and_a_long_life_resets_it():
    ctx = SimpleNamespace(settings=SimpleNamespace(shared_subscriptions=False))
    sup = IngestProcesses(ctx, 1)  # type: ignore[arg-type]  # nothing is started
    sup._started[0] = time.monotonic()  # it just started, and dies at once, again and again
    delays = [sup._backoff(0) for _ in range(7)]
    assert delays == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
    assert (delays[0], delays[-1]) == (RESTART_DELAY_S, RESTART_DELAY_MAX_S)
    sup._started[0] = time.monotonic() - STABLE_S - 1  # the next one ran for a minute
    assert sup._backoff(0) == RESTART_DELAY_S
    sup._started[0] = time.monotonic()  # restarted, and died young again
    assert sup._backoff(0) == 2 * RESTART_DELAY_S
