import math

import pytest

from app_common.spec import METHODS, SparsitySpec
from app_engine.schedule import density_schedule, schedule_for

APP_N8 = [0.8000, 0.7155, 0.6400, 0.5724, 0.5120, 0.4579, 0.4096, 0.3664]
# APP_SPEC prints 0.8000, 0.6167, 0.4755, 0.3664 for N = 4; 0.8 ** linspace(1, 4.5, 4) is
# 0.8 ** [1, 2.1667, 3.3333, 4.5] = 0.80000, 0.61664, 0.47530, 0.36636, so the spec's two middle
# values are off by up to 2e-4 (hand rounding). The exact values are asserted, the spec's loosely.
APP_N4 = [0.8000, 0.6166, 0.4753, 0.3664]
APP_N4_SPEC = [0.8000, 0.6167, 0.4755, 0.3664]


@pytest.mark.parametrize(("megabatches", "expected"), [(8, APP_N8), (4, APP_N4)])
def test_app_schedule_matches_the_spec_numbers(megabatches: int, expected: list[float]) -> None:
    got = density_schedule("app", 4.5, megabatches)
    assert len(got) == megabatches
    assert [round(d, 4) for d in got] == expected


def test_app_schedule_n4_is_within_the_spec_rounding() -> None:
    assert density_schedule("app", 4.5, 4) == pytest.approx(APP_N4_SPEC, abs=2.5e-4)
    assert density_schedule("app", 4.5, 4) == pytest.approx([0.8 ** (1 + 3.5 * t / 3) for t in range(4)], rel=1e-12)


def test_app_schedule_ends_exactly_at_the_target() -> None:
    for n in (2, 3, 7, 8, 100):
        got = density_schedule("app", 4.5, n)
        assert got[0] == 0.8
        assert got[-1] == 0.8**4.5


def test_target_sparsity_resolves_to_the_schedule() -> None:
    got = schedule_for(SparsitySpec(target=0.634), "app", 8)
    assert got[-1] == pytest.approx(0.366, abs=1e-12)
    assert got[0] == pytest.approx(0.8)
    # tau given directly and the default (tau 4.5) agree with the N = 8 numbers.
    assert [round(d, 4) for d in schedule_for(SparsitySpec(tau=4.5), "app", 8)] == APP_N8
    assert [round(d, 4) for d in schedule_for(SparsitySpec(), "app", 8)] == APP_N8
    assert schedule_for(SparsitySpec(target=0.9), "osp", 3) == pytest.approx([0.1] * 3)


def test_app_with_tau_below_one_is_constant_at_the_target() -> None:
    assert density_schedule("app", 0.5, 5) == [0.8**0.5] * 5
    assert density_schedule("app", 0.0, 3) == [1.0] * 3
    assert schedule_for(SparsitySpec(target=0.0), "app", 4) == [1.0] * 4
    # tau exactly 1: linspace(1, 1, N) is constant too.
    assert density_schedule("app", 1.0, 4) == pytest.approx([0.8] * 4)


def test_single_megabatch_goes_straight_to_the_target() -> None:
    assert density_schedule("app", 4.5, 1) == [0.8**4.5]


def test_osp_and_dense() -> None:
    assert density_schedule("osp", 4.5, 8) == [0.8**4.5] * 8
    assert density_schedule("dense", 4.5, 8) == [1.0] * 8


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("tau", [0.0, 0.3, 1.0, 2.0, 4.5, 20.0])
@pytest.mark.parametrize("megabatches", [1, 2, 8, 100])
def test_schedules_are_non_increasing_and_in_range(method: str, tau: float, megabatches: int) -> None:
    got = density_schedule(method, tau, megabatches)
    assert len(got) == megabatches
    assert all(0.0 < d <= 1.0 for d in got)
    assert all(b <= a for a, b in zip(got, got[1:], strict=False))
    if method != "dense":
        assert math.isclose(got[-1], 0.8**tau, rel_tol=1e-12)


def test_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="unknown method"):
        density_schedule("lottery", 4.5, 8)
    with pytest.raises(ValueError, match="megabatches"):
        density_schedule("app", 4.5, 0)
    with pytest.raises(ValueError, match="tau"):
        density_schedule("app", -1.0, 8)
    with pytest.raises(ValueError, match="tau"):
        density_schedule("app", float("nan"), 8)


@pytest.mark.parametrize(
    ("method", "steps"), [("app", [1, 2, 3, 4]), ("osp", [1]), ("dense", [])]
)
def test_the_schedule_decides_when_to_prune(method: str, steps: list[int]) -> None:
    from app_engine.schedule import PruneSchedule

    schedule = PruneSchedule.for_method(method, 4.5, 4)
    assert len(schedule) == 4
    assert [t for t in range(1, 5) if schedule.prune_to(t) is not None] == steps
    assert [schedule.target(t) for t in range(1, 5)] == density_schedule(method, 4.5, 4)
    for t in steps:
        assert schedule.prune_to(t) == schedule.target(t)
