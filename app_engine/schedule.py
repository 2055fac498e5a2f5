"""Density schedules: the fraction of prunable weights kept after pruning at each megabatch.

The three methods differ only in their schedule (APP_SPEC section 2):

- ``dense``: nothing is pruned, density 1 throughout;
- ``osp`` (anytime one-shot pruning): the target density from the first megabatch on;
- ``app`` (Anytime Progressive Pruning): with the paper's sparsity level ``tau``,
  ``s_t = linspace(1, tau, N)[t]`` and ``keep_t = 0.8 ** s_t``, so the first megabatch keeps 80 %
  and the last one reaches the target ``0.8 ** tau``. Where ``tau < 1`` the first step would
  already be sparser than the target, so the schedule is constant at the target.

A schedule is non-increasing, which is what makes nested masks possible. :class:`PruneSchedule`
adds *when* to prune: APP before every megabatch, OSP once before the first, dense never.
"""

from __future__ import annotations

from dataclasses import dataclass

from app_common.spec import KEEP_BASE, METHODS, SparsitySpec


def density_schedule(method: str, tau: float, megabatches: int) -> list[float]:
    """Density to prune to before training on each megabatch ``t = 1..megabatches``.

    ``tau`` is the paper's sparsity level (target density ``0.8 ** tau``); ``megabatches`` is the
    stream length N. Returns N floats in (0, 1].
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {', '.join(METHODS)}")
    if megabatches < 1:
        raise ValueError(f"megabatches must be at least 1, got {megabatches}")
    if not tau >= 0.0:  # also rejects NaN
        raise ValueError(f"tau must be >= 0, got {tau}")

    target = KEEP_BASE**tau
    if method == "dense":
        return [1.0] * megabatches
    if method == "osp" or megabatches == 1 or tau < 1.0:
        return [target] * megabatches

    # s_t = linspace(1, tau, N): s_0 = 1 and s_{N-1} = tau exactly (the end points are pinned so that
    # the last density is bit-for-bit the target, not 0.8 ** (tau - ulp)).
    last = megabatches - 1
    levels = [1.0 + (tau - 1.0) * t / last for t in range(megabatches)]
    levels[0], levels[-1] = 1.0, tau
    return [KEEP_BASE**s for s in levels]


def schedule_for(spec_sparsity: SparsitySpec, method: str, megabatches: int) -> list[float]:
    """The schedule of a job's sparsity section (target sparsity or tau, resolved to tau)."""
    return density_schedule(method, spec_sparsity.resolved_tau, megabatches)


@dataclass(frozen=True)
class PruneSchedule:
    """When the runner prunes, and to which density: ``prune_to(t)`` is the density to prune to
    before training on megabatch ``t`` (1-based), or None when ``t`` is not a pruning step."""

    densities: tuple[float, ...]  # the density schedule, one per megabatch
    steps: frozenset[int]  # the megabatches before which the model is pruned

    @classmethod
    def for_method(cls, method: str, tau: float, megabatches: int) -> PruneSchedule:
        densities = tuple(density_schedule(method, tau, megabatches))
        if method == "app":
            steps = frozenset(range(1, megabatches + 1))
        elif method == "osp":
            steps = frozenset({1})
        else:
            steps = frozenset()
        return cls(densities, steps)

    def __len__(self) -> int:
        return len(self.densities)

    def target(self, t: int) -> float:
        """The schedule's density for megabatch ``t`` (1.0 throughout for dense)."""
        return self.densities[t - 1]

    def prune_to(self, t: int) -> float | None:
        return self.densities[t - 1] if t in self.steps else None
