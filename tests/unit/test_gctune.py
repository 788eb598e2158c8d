"""server/gctune.py: the young-generation threshold goes up and start-up state is frozen."""

from __future__ import annotations

import gc
import weakref

import pytest

from server.gctune import GEN0_THRESHOLD, tune_gc


@pytest.fixture
def restore_gc():
    threshold = gc.get_threshold()
    yield
    gc.set_threshold(*threshold)
    gc.unfreeze()


def test_tune_gc_raises_the_young_threshold_and_keeps_the_older_ones(restore_gc) -> None:
    gc.set_threshold(700, 11, 12)
    tune_gc(freeze=False)
    assert gc.get_threshold() == (GEN0_THRESHOLD, 11, 12)


def test_tune_gc_freezes_what_is_alive_and_collects_garbage_first(restore_gc) -> None:
    class Node:
        pass

    gc.unfreeze()
    before = gc.get_freeze_count()
    cycle = Node()
    cycle.self = cycle  # garbage only a collection reclaims
    gone = weakref.ref(cycle)
    alive = [Node() for _ in range(100)]
    del cycle
    tune_gc()
    assert gone() is None  # collected, not frozen forever
    assert gc.get_freeze_count() >= before + len(alive)
    assert not any(o is alive[0] for o in gc.get_objects())  # frozen: no generation holds it
