"""Garbage-collector settings for the long-running processes (server, ingest workers, simulator).

CPython's cyclic collector runs a full (generation 2) collection whenever the objects that survived
younger collections reach a quarter of the long-lived ones, and a full collection walks every
container object the process holds. A server holds a few hundred thousand long-lived objects after
start-up (modules, SQLAlchemy metadata and compiled-statement caches, pydantic schemas, the
FastAPI app); under a fan-out burst the young objects (messages waiting in a batch, rows being
built) survive a young collection or two and push a full one every second or two. Measured on the
2-core dev machine during a 10,000-device fan-out: the ingest process ran a full collection every
~1.5 s at 120-340 ms each (about a fifth of its time), the server process stopped for 300-640 ms at
a time, and the simulator workers for 400-670 ms.

:func:`tune_gc` applies the two usual remedies:

* ``gc.freeze()`` after start-up moves everything alive at that point into the permanent
  generation, which collections never walk again (those objects live as long as the process
  anyway; a reference cycle among them would not be reclaimed, and none is expected of start-up
  state);
* a larger generation-0 threshold (``GEN0_THRESHOLD`` allocations instead of 700), so that the
  short-lived objects of a batch die before a young collection sees them and are never promoted:
  young collections become rarer, and full collections rarer still.

Collection still runs, so cycles created while serving are reclaimed as before.
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
