"""Low-priority loading: a load runs in a short-lived thread of its own at a low CPU priority
(``SCHED_IDLE``, else a nice value), so it never preempts the requests the serving model answers."""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .loader import LoadedModel


def _lower_priority(nice: int, idle: bool) -> None:
    """Lower the calling thread's CPU priority: ``SCHED_IDLE`` if asked and allowed, else nice."""
    if idle:
        try:
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))  # 0: the calling thread
            return
        except (OSError, AttributeError):
            pass  # not Linux, or refused (seccomp, RLIMIT): fall back to nice
    if nice > 0:
        with contextlib.suppress(OSError, AttributeError):
            tid = threading.get_native_id()
            os.setpriority(os.PRIO_PROCESS, tid, os.getpriority(os.PRIO_PROCESS, tid) + nice)


def run_low_priority(fn: Callable[[Path], LoadedModel], arg: Path, nice: int, idle: bool) -> LoadedModel:
    """Run ``fn(arg)`` in a fresh thread at a lower CPU priority (Linux: per-thread policy and nice).

    On a small device a load competes with live requests for the same cores. By default
    (``load_idle``) the thread runs under Linux's ``SCHED_IDLE`` policy: it gets a core only when no
    normal thread wants it, so a load never preempts a request. A nice value alone (``load_nice``,
    used where ``SCHED_IDLE`` is off or refused) is not enough: the scheduler still gives a niced
    thread whole time slices of a few milliseconds, and a request that waits behind one misses its
    p99 (``bench/swap.py`` measured a swap-window p99 ratio of 2.1-2.8 with nice 10 against 1.3-2.1
    with ``SCHED_IDLE``). The price: a device whose cores are saturated by requests installs slowly,
    which is the right order for a device whose job is to answer. onnxruntime releases the GIL while
    it builds and runs the session, so the loader holds the GIL only for its short Python steps.
    The thread ends with the load, so no other work inherits the priority."""
    box: dict[str, Any] = {}

    def target() -> None:
        _lower_priority(nice, idle)
        try:
            box["result"] = fn(arg)
        except BaseException as exc:
            box["error"] = exc

    thread = threading.Thread(target=target, name="fleet-loader", daemon=True)
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box["result"]
