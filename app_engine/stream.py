"""The stream of megabatches (APP_SPEC.md section 1): which samples the learner sees at step t.

The training pool (all training indices, or the few-shot subset) is shuffled once with the run seed
and cut into ``N`` megabatches of equal size; each megabatch is split into a train part and a
validation part. The replay mode then decides what the learner trains and selects on at step t:

=========  ============================================  ==================================
replay     training indices at step t                    validation indices at step t
=========  ============================================  ==================================
full       train parts of megabatches 1..t               val parts of 1..t
none       train part of megabatch t                     val part of t
previous   train parts of t-1 and t                      val parts of t-1 and t
buffer     train part of t + a reservoir (at most        val part of t only: model selection
           ``buffer_size``) of train samples of 1..t-1   judges the data that just arrived
=========  ============================================  ==================================

Everything is a pure function of ``(n_train, spec, seed, pool)`` and t: a resumed run rebuilds the
same stream and gets the same indices, including the reservoir, which is recomputed from scratch.
All indices are int64 positions in the dataset's training split.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import torch

from app_common.spec import SCORE_SOURCES, StreamSpec
from app_engine.errors import SpecInputError

logger = logging.getLogger(__name__)

# Salts separate the random streams drawn from one run seed (the shuffle, the reservoir, the
# scoring samples, few-shot selection), so that changing how one is used never shifts another.
_SALT_SHUFFLE = 0
_SALT_RESERVOIR = 1
_SALT_SCORE = 2
_SALT_FEW_SHOT = 3


def _generator(seed: int, *salt: int) -> torch.Generator:
    """A torch generator for ``seed`` and a salt path, mixed by numpy's SeedSequence."""
    state = np.random.SeedSequence([seed, *salt]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


@dataclass(frozen=True, eq=False)
class Megabatch:
    """One megabatch: ``index`` is 1-based; the index tensors point into the training split."""

    index: int
    train_idx: torch.Tensor
    val_idx: torch.Tensor

    @property
    def size(self) -> int:
        return int(self.train_idx.numel() + self.val_idx.numel())


class Stream:
    """A seeded partition of the training pool into megabatches, with replay-dependent views.

    ``pool`` (int64 indices into the training split, e.g. a few-shot subset) restricts the stream
    to those samples; by default the pool is ``0..n_train-1``. The megabatch size defaults to
    ``len(pool) // spec.megabatches``; samples beyond ``N * size`` are never used. Each megabatch
    holds ``round(size * val_fraction)`` (at least 1) validation samples and the rest for training.
    """

    def __init__(self, n_train: int, spec: StreamSpec, seed: int, pool: torch.Tensor | None = None) -> None:
        self.spec = spec
        self.seed = seed
        self.pool = _check_pool(n_train, pool)
        n_mega = spec.megabatches
        n_pool = int(self.pool.numel())
        size = spec.megabatch_size if spec.megabatch_size is not None else n_pool // n_mega
        if size * n_mega > n_pool:
            raise SpecInputError(
                f"stream.megabatch_size: {n_mega} megabatches of {size} samples need {size * n_mega}, "
                f"but the training pool holds {n_pool}"
            )
        n_val = max(1, round(size * spec.val_fraction))
        if size - n_val < 1:
            raise SpecInputError(
                f"stream.megabatch_size: megabatches of {size} samples leave no training samples after "
                f"{n_val} for validation (pool {n_pool}, {n_mega} megabatches, val_fraction {spec.val_fraction})"
            )
        self.megabatch_size = size
        order = self.pool[torch.randperm(n_pool, generator=_generator(seed, _SALT_SHUFFLE))]
        self.megabatches: list[Megabatch] = []
        for t in range(1, n_mega + 1):
            chunk = order[(t - 1) * size : t * size]
            self.megabatches.append(Megabatch(t, chunk[: size - n_val].clone(), chunk[size - n_val :].clone()))
        logger.debug(
            "stream: %d megabatches of %d (%d train + %d val) from a pool of %d, replay %s",
            n_mega,
            size,
            size - n_val,
            n_val,
            n_pool,
            spec.replay,
        )

    def __len__(self) -> int:
        return len(self.megabatches)

    def megabatch(self, t: int) -> Megabatch:
        """Megabatch ``t`` (1-based)."""
        if not 1 <= t <= len(self.megabatches):
            raise ValueError(f"megabatch {t} is outside the stream 1..{len(self.megabatches)}")
        return self.megabatches[t - 1]

    def train_indices(self, t: int) -> torch.Tensor:
        """Indices the learner trains on at step ``t``, according to ``spec.replay``."""
        current = self.megabatch(t)
        replay = self.spec.replay
        if replay == "full":
            return torch.cat([m.train_idx for m in self.megabatches[:t]])
        if replay == "none":
            return current.train_idx.clone()
        if replay == "previous":
            return torch.cat([m.train_idx for m in self.megabatches[max(0, t - 2) : t]])
        if replay == "buffer":
            return torch.cat([current.train_idx, self.reservoir(t)])
        raise ValueError(f"stream.replay: unknown replay '{replay}'")

    def val_indices(self, t: int) -> torch.Tensor:
        """Indices used for model selection (best epoch) at step ``t``."""
        current = self.megabatch(t)
        replay = self.spec.replay
        if replay == "full":
            return torch.cat([m.val_idx for m in self.megabatches[:t]])
        if replay in ("none", "buffer"):
            return current.val_idx.clone()
        if replay == "previous":
            return torch.cat([m.val_idx for m in self.megabatches[max(0, t - 2) : t]])
        raise ValueError(f"stream.replay: unknown replay '{replay}'")

    def reservoir(self, t: int) -> torch.Tensor:
        """The replay buffer at step ``t``: a uniform sample of at most ``spec.buffer_size`` train
        samples of megabatches 1..t-1, kept by reservoir sampling (Vitter's algorithm R).

        Algorithm R over the sequence s_0, s_1, ... of those samples: the first K fill the buffer;
        item i >= K draws j uniform in 0..i and, if j < K, replaces slot j. Every item then ends in
        the buffer with probability K / n. The draws of megabatch m come from a generator seeded by
        (seed, m), so they do not depend on t: the buffer at t is exactly the buffer at t-1 updated
        with megabatch t-1, and recomputing it from scratch (after a resume) gives the same result.
        """
        self.megabatch(t)
        capacity = self.spec.buffer_size
        earlier = self.megabatches[: t - 1]
        if not earlier:
            return torch.empty(0, dtype=torch.int64)
        items = torch.cat([m.train_idx for m in earlier])
        n = int(items.numel())
        if n <= capacity:
            return items
        # u_i uniform in [0, 1) for every item, drawn per megabatch; j_i = floor(u_i * (i + 1)).
        uniforms = torch.cat(
            [
                torch.rand(
                    m.train_idx.numel(),
                    generator=_generator(self.seed, _SALT_RESERVOIR, m.index),
                    dtype=torch.float64,
                )
                for m in earlier
            ]
        )
        position = torch.arange(n, dtype=torch.float64)
        slots = torch.floor(uniforms * (position + 1)).to(torch.int64)
        slots[:capacity] = torch.arange(capacity)  # the first K items fill the buffer in order
        writes = torch.nonzero(slots < capacity).squeeze(1)  # item positions that write, in order
        # Several items may write the same slot; the latest one (largest position) is what remains.
        slot_of_write = slots[writes].numpy()
        reversed_slots = slot_of_write[::-1]
        _, first_in_reversed = np.unique(reversed_slots, return_index=True)
        last_write = writes.numpy()[len(reversed_slots) - 1 - first_in_reversed]  # sorted by slot
        return items[torch.from_numpy(last_write)]

    def score_indices(self, t: int, fraction: float, source: str = "current") -> torch.Tensor:
        """Samples a pruner scores on before training on megabatch ``t``.

        ``k = ceil(fraction * megabatch_size)`` (at least 1, at most what is available): the first k
        of megabatch t's train part (``"current"``; that part is already in seeded random order), a
        seeded sample of k from the train parts of megabatches 1..t (``"cumulative"``), or the first
        k of megabatch 1's train part whatever t (``"first"``, the APP reference's choice).
        """
        current = self.megabatch(t)
        if not 0.0 < fraction <= 1.0:
            raise SpecInputError(f"sparsity.score_fraction must be in (0, 1], got {fraction}")
        # The epsilon keeps 0.1 * 30 = 3.0000000000000004 from rounding up to 4.
        k = max(1, math.ceil(fraction * self.megabatch_size - 1e-9))
        if source == "current":
            return current.train_idx[:k].clone()
        if source == "first":
            return self.megabatches[0].train_idx[:k].clone()
        if source == "cumulative":
            pool = torch.cat([m.train_idx for m in self.megabatches[:t]])
            pick = torch.randperm(pool.numel(), generator=_generator(self.seed, _SALT_SCORE, t))[:k]
            return pool[pick]
        raise SpecInputError(f"sparsity.score_source must be one of {SCORE_SOURCES}, got '{source}'")


def _check_pool(n_train: int, pool: torch.Tensor | None) -> torch.Tensor:
    if n_train < 1:
        raise ValueError(f"the training split is empty (n_train={n_train})")
    if pool is None:
        return torch.arange(n_train, dtype=torch.int64)
    if pool.dim() != 1 or pool.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"pool must be a 1-dim integer tensor, got {pool.dtype} {tuple(pool.shape)}")
    pool = pool.to(torch.int64)
    if pool.numel() == 0:
        raise ValueError("pool is empty")
    if int(pool.min()) < 0 or int(pool.max()) >= n_train:
        raise ValueError(f"pool indices must lie in 0..{n_train - 1}")
    if torch.unique(pool).numel() != pool.numel():
        raise ValueError("pool indices must be unique")
    return pool


def few_shot_indices(labels: torch.Tensor, per_class: int, seed: int) -> torch.Tensor:
    """Sorted indices of a seeded choice of ``per_class`` samples of each class (all of a class
    that has fewer). ``labels`` is the int label tensor of the training split."""
    if per_class < 1:
        raise ValueError(f"dataset.few_shot must be at least 1, got {per_class}")
    if labels.dim() != 1:
        raise ValueError(f"labels must be 1-dim, got shape {tuple(labels.shape)}")
    chosen = []
    for c in torch.unique(labels).tolist():
        idx = torch.nonzero(labels == c).squeeze(1)
        if idx.numel() > per_class:
            # Salted by the class so that adding a class never changes another class's choice.
            idx = idx[torch.randperm(idx.numel(), generator=_generator(seed, _SALT_FEW_SHOT, int(c)))[:per_class]]
        chosen.append(idx)
    if not chosen:
        return torch.empty(0, dtype=torch.int64)
    return torch.sort(torch.cat(chosen)).values
