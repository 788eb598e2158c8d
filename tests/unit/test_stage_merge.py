"""check_stages: percent stages that resolve to the same devices on a small selection are merged."""

from __future__ import annotations

import pytest

from server.rollouts.policy import Stage, check_stages


def pct(*percents: float, **kw) -> list[Stage]:
    return [Stage(percent=p, **kw) for p in percents]


@pytest.mark.parametrize(
    ("total", "kept", "sizes"),
    [
        (1, [100], [1]),
        (2, [50, 100], [1, 2]),
        (8, [10, 50, 100], [1, 4, 8]),
        (10, [10, 50, 100], [1, 5, 10]),
        (11, [1, 10, 50, 100], [1, 2, 6, 11]),
        (1000, [1, 10, 50, 100], [10, 100, 500, 1000]),
    ],
)
def test_the_default_stages_on_any_fleet_size(total, kept, sizes):
    stages, got = check_stages(pct(1, 10, 50, 100), total)
    assert [s.percent for s in stages] == kept
    assert got == sizes


def test_the_later_stage_of_a_merged_pair_is_kept_whole():
    given = [Stage(percent=1, soak_s=600), Stage(percent=20, soak_s=30), Stage(percent=100)]
    stages, sizes = check_stages(given, 4)
    assert stages == [given[1], given[2]]
    assert sizes == [1, 4]
    shadows = [Stage(percent=1, shadow=True), Stage(percent=20, soak_s=30, shadow=True), Stage(percent=100)]
    assert check_stages(shadows, 4) == ([shadows[1], shadows[2]], [1, 4])


def test_a_merged_stage_keeps_an_approval_either_stage_asked_for():
    given = [Stage(percent=1, pause_after=True), Stage(percent=10), Stage(percent=100)]
    stages, sizes = check_stages(given, 8)  # 1% and 10% of 8 devices: the same one device
    assert sizes == [1, 8]
    assert [(s.percent, s.pause_after) for s in stages] == [(10, True), (100, False)]
    assert given[1].pause_after is False  # the request itself is left as it was
    later = [Stage(percent=1), Stage(percent=10, pause_after=True), Stage(percent=100)]
    assert [s.pause_after for s in check_stages(later, 8)[0]] == [True, False]


@pytest.mark.parametrize("total", [1, 4])
def test_a_shadow_stage_is_not_merged_into_the_serve_stage_after_it(total):
    """The serve stage may cover the same devices: it switches them from shadowing to serving."""
    given = [Stage(percent=1, shadow=True), Stage(percent=10), Stage(percent=50), Stage(percent=100)]
    stages, sizes = check_stages(given, total)
    assert stages[0] == given[0]
    assert not any(s.shadow for s in stages[1:])
    assert sizes[:2] == [1, 1]
    assert sizes[-1] == total
    counts = [Stage(count=2, shadow=True), Stage(count=2), Stage(percent=100)]
    assert check_stages(counts, 10) == (counts, [2, 2, 10])


def test_merging_follows_a_chain_of_equal_sizes():
    stages, sizes = check_stages(pct(5, 10, 20, 60, 100), 5)
    assert [s.percent for s in stages] == [20, 60, 100]
    assert sizes == [1, 3, 5]


@pytest.mark.parametrize(
    ("given", "total", "message"),
    [
        (pct(50, 50, 100), 10, "stage 2 covers 5 device(s), not more than stage 1's 5"),
        (pct(50, 40, 100), 10, "stage 2 covers 4"),
        (pct(100, 100), 1, "stage 2 covers 1"),  # equal percents are refused even on one device
        ([Stage(count=2), Stage(count=2), Stage(percent=100)], 10, "stage 2 covers 2"),
        ([Stage(percent=10), Stage(count=1), Stage(percent=100)], 10, "stage 2 covers 1"),
        ([Stage(count=1), Stage(percent=10), Stage(percent=100)], 10, "stage 2 covers 1"),
        ([Stage(percent=50), Stage(count=3)], 10, "stage 2 covers 3"),
        (pct(1, 10, 50, 100, 100), 10, "stage 5 covers 10 device(s), not more than stage 4's 10"),
    ],
)
def test_stages_that_do_not_grow_as_given_are_refused(given, total, message):
    with pytest.raises(ValueError, match="stages must grow") as exc:
        check_stages(given, total)
    assert message in str(exc.value)


def test_the_last_stage_must_still_cover_the_selection():
    with pytest.raises(ValueError, match="covers 5 of the 10"):
        check_stages(pct(10, 50), 10)
    with pytest.raises(ValueError, match="at least one stage"):
        check_stages([], 10)
