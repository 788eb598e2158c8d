"""Garbage-collector settings for the long-running processes (server, ingest workers, simulator).

:func:`tune_gc` freezes what is alive after start-up (``gc.freeze()``: never walked again) and
raises the young-generation threshold to :data:`GEN0_THRESHOLD`, so the short-lived objects of a
batch die before they are promoted and full collections become rare; cycles created while serving
are still reclaimed. Why and what it changed: docs/benchmarks.md, "Server at scale".
"""

from __future__ import annotations

import gc

#: young-generation threshold: container allocations (net of frees) between young collections
GEN0_THRESHOLD = 50_000


def tune_gc(*, freeze: bool = True) -> None:
    """Raise the young-generation threshold; with ``freeze``, collect once and freeze what is left.

    Call it when a process has finished starting up (and again after a phase that built long-lived
    state, such as a simulator connecting its devices): what is frozen is never scanned again.
    """
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(GEN0_THRESHOLD, gen1, gen2)
    if freeze:
        gc.collect()
        gc.freeze()


__all__ = ["GEN0_THRESHOLD", "tune_gc"]
