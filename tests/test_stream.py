"""The megabatch stream: partition, replay views, reservoir, scoring samples, few-shot selection."""

from __future__ import annotations

import math

import pytest
import torch

from app_common.spec import StreamSpec
from app_engine.stream import Stream, few_shot_indices


def stream_spec(**kw: object) -> StreamSpec:
    return StreamSpec.model_validate({"megabatches": 4, **kw})


def as_set(t: torch.Tensor) -> set[int]:
    return set(t.tolist())


def test_partition_is_disjoint_and_covers_n_times_size() -> None:
    stream = Stream(1000, stream_spec(megabatches=4, megabatch_size=200), seed=1)
    assert len(stream) == 4 and [m.index for m in stream.megabatches] == [1, 2, 3, 4]
    parts = [torch.cat([m.train_idx, m.val_idx]) for m in stream.megabatches]
    everything = torch.cat(parts)
    assert everything.numel() == 800 and torch.unique(everything).numel() == 800
    assert int(everything.min()) >= 0 and int(everything.max()) < 1000
    for m in stream.megabatches:
        assert m.size == 200 and m.train_idx.dtype == torch.int64 and m.val_idx.dtype == torch.int64
        assert m.val_idx.numel() == 20 and m.train_idx.numel() == 180  # val_fraction 0.1


def test_default_size_is_pool_over_n_and_val_fraction() -> None:
    stream = Stream(1003, stream_spec(megabatches=4, val_fraction=0.25), seed=2)
    assert stream.megabatch_size == 1003 // 4 == 250
    assert all(m.val_idx.numel() == round(250 * 0.25) for m in stream.megabatches)
    # Tiny megabatches still get one validation sample.
    tiny = Stream(12, stream_spec(megabatches=4, val_fraction=0.01), seed=2)
    assert [(m.train_idx.numel(), m.val_idx.numel()) for m in tiny.megabatches] == [(2, 1)] * 4


def test_pool_restricts_the_stream() -> None:
    pool = torch.arange(0, 400, 4)  # 100 indices
    stream = Stream(400, stream_spec(megabatches=5), seed=3, pool=pool)
    used = torch.cat([torch.cat([m.train_idx, m.val_idx]) for m in stream.megabatches])
    assert stream.megabatch_size == 20 and as_set(used) == as_set(pool)
    with pytest.raises(ValueError, match="pool indices must lie in 0..399"):
        Stream(400, stream_spec(), seed=3, pool=torch.tensor([0, 400]))
    with pytest.raises(ValueError, match="unique"):
        Stream(400, stream_spec(), seed=3, pool=torch.tensor([1, 1, 2, 3, 4, 5, 6, 7]))


def test_bad_megabatch_size_names_the_field() -> None:
    with pytest.raises(ValueError, match=r"^stream\.megabatch_size: 4 megabatches of 300 samples need 1200"):
        Stream(1000, stream_spec(megabatch_size=300), seed=1)
    with pytest.raises(ValueError, match=r"^stream\.megabatch_size: .*no training samples"):
        Stream(7, stream_spec(megabatches=4), seed=1)  # default size 1: nothing left after validation
    with pytest.raises(ValueError, match=r"^stream\.megabatch_size: .*no training samples"):
        Stream(100, stream_spec(megabatches=4, megabatch_size=2, val_fraction=0.9), seed=1)


def test_seeded_shuffle() -> None:
    a = Stream(500, stream_spec(), seed=1)
    b = Stream(500, stream_spec(), seed=1)
    c = Stream(500, stream_spec(), seed=2)
    for ma, mb in zip(a.megabatches, b.megabatches, strict=True):
        assert torch.equal(ma.train_idx, mb.train_idx) and torch.equal(ma.val_idx, mb.val_idx)
    assert not torch.equal(a.megabatches[0].train_idx, c.megabatches[0].train_idx)
    # A shuffle, not the identity order.
    assert not torch.equal(a.megabatches[0].train_idx, torch.sort(a.megabatches[0].train_idx).values)


def test_replay_full_grows() -> None:
    stream = Stream(800, stream_spec(replay="full"), seed=1)
    previous: set[int] = set()
    for t in range(1, 5):
        train, val = as_set(stream.train_indices(t)), as_set(stream.val_indices(t))
        assert train == set().union(*(as_set(m.train_idx) for m in stream.megabatches[:t]))
        assert val == set().union(*(as_set(m.val_idx) for m in stream.megabatches[:t]))
        assert len(train) == 180 * t and len(val) == 20 * t and previous < train and not train & val
        previous = train


def test_replay_none_is_the_current_megabatch() -> None:
    stream = Stream(800, stream_spec(replay="none"), seed=1)
    for t, m in enumerate(stream.megabatches, start=1):
        assert torch.equal(stream.train_indices(t), m.train_idx)
        assert torch.equal(stream.val_indices(t), m.val_idx)


def test_replay_previous_is_t_minus_1_and_t() -> None:
    stream = Stream(800, stream_spec(replay="previous"), seed=1)
    mbs = stream.megabatches
    assert as_set(stream.train_indices(1)) == as_set(mbs[0].train_idx)
    for t in range(2, 5):
        assert as_set(stream.train_indices(t)) == as_set(mbs[t - 2].train_idx) | as_set(mbs[t - 1].train_idx)
        assert as_set(stream.val_indices(t)) == as_set(mbs[t - 2].val_idx) | as_set(mbs[t - 1].val_idx)
        assert stream.train_indices(t).numel() == 360


def test_replay_buffer_is_bounded_and_from_earlier_megabatches() -> None:
    spec = stream_spec(megabatches=6, replay="buffer", buffer_size=250)
    stream = Stream(1200, spec, seed=4)  # megabatches of 200: 180 train + 20 val
    mbs = stream.megabatches
    assert torch.equal(stream.train_indices(1), mbs[0].train_idx)
    assert as_set(stream.train_indices(2)) == as_set(mbs[0].train_idx) | as_set(mbs[1].train_idx)  # 180 < 250
    for t in range(1, 7):
        train = stream.train_indices(t)
        buffer = stream.reservoir(t)
        earlier = set().union(set(), *(as_set(m.train_idx) for m in mbs[: t - 1]))
        assert buffer.numel() == min(250, 180 * (t - 1)) and torch.unique(buffer).numel() == buffer.numel()
        assert as_set(buffer) <= earlier
        assert train.numel() <= 250 + 180 and as_set(train) == as_set(mbs[t - 1].train_idx) | as_set(buffer)
        assert torch.equal(stream.val_indices(t), mbs[t - 1].val_idx)
    # Algorithm R: an item that left the buffer never comes back, and the buffer at t is the buffer
    # at t-1 updated with megabatch t-1 only.
    for t in range(3, 7):
        old, new = as_set(stream.reservoir(t - 1)), as_set(stream.reservoir(t))
        assert new - old <= as_set(mbs[t - 2].train_idx)
    # Recomputed from scratch (a resumed run) and in another order: identical. Another seed: different.
    again = Stream(1200, spec, seed=4)
    assert torch.equal(again.reservoir(6), stream.reservoir(6))
    assert torch.equal(again.train_indices(5), stream.train_indices(5))
    other = Stream(1200, spec, seed=5)
    assert as_set(other.reservoir(6)) != as_set(stream.reservoir(6))


def test_reservoir_is_uniform_over_earlier_samples() -> None:
    # Each of the 900 train samples of megabatches 1..5 ends in a buffer of 300 with probability 1/3:
    # per megabatch, the expected count is 60; across 40 seeds the mean is within a few samples.
    spec = stream_spec(megabatches=6, replay="buffer", buffer_size=300)
    counts = torch.zeros(5)
    for seed in range(40):
        stream = Stream(1200, spec, seed=seed)
        buffer = as_set(stream.reservoir(6))
        for m in stream.megabatches[:5]:
            counts[m.index - 1] += len(buffer & as_set(m.train_idx))
    means = counts / 40
    assert means.sum().item() == pytest.approx(300)
    assert torch.all((means - 60).abs() < 4), means


def test_score_indices_current_and_cumulative() -> None:
    stream = Stream(1000, stream_spec(megabatch_size=250), seed=1)  # 225 train + 25 val
    k = math.ceil(0.2 * 250)
    for t in range(1, 5):
        current = stream.score_indices(t, 0.2, "current")
        assert torch.equal(current, stream.megabatches[t - 1].train_idx[:k])
        cumulative = stream.score_indices(t, 0.2, "cumulative")
        seen = set().union(*(as_set(m.train_idx) for m in stream.megabatches[:t]))
        assert cumulative.numel() == k and torch.unique(cumulative).numel() == k and as_set(cumulative) <= seen
        rebuilt = Stream(1000, stream_spec(megabatch_size=250), seed=1)
        assert torch.equal(cumulative, rebuilt.score_indices(t, 0.2, "cumulative"))
    # Cumulative samples reach back into earlier megabatches.
    late = as_set(stream.score_indices(4, 0.5, "cumulative"))
    assert late & as_set(stream.megabatches[0].train_idx) and late & as_set(stream.megabatches[3].train_idx)
    # At least one sample; at most the train part; 0.1 * 30 is 3, not 4.
    assert stream.score_indices(1, 1e-6, "current").numel() == 1
    assert stream.score_indices(1, 1.0, "current").numel() == 225
    assert Stream(120, stream_spec(megabatch_size=30), seed=1).score_indices(2, 0.1).numel() == 3
    with pytest.raises(ValueError, match="score_source"):
        stream.score_indices(1, 0.2, "everything")
    with pytest.raises(ValueError, match="outside the stream 1..4"):
        stream.score_indices(5, 0.2)


def test_few_shot_counts_per_class() -> None:
    labels = torch.tensor([0] * 50 + [1] * 3 + [2] * 20 + [3] * 10)
    labels = labels[torch.randperm(83, generator=torch.Generator().manual_seed(0))]
    picked = few_shot_indices(labels, 10, seed=1)
    assert torch.equal(picked, torch.sort(picked).values) and torch.unique(picked).numel() == picked.numel()
    assert torch.bincount(labels[picked], minlength=4).tolist() == [10, 3, 10, 10]
    assert torch.equal(picked, few_shot_indices(labels, 10, seed=1))
    assert not torch.equal(picked, few_shot_indices(labels, 10, seed=2))
    assert torch.equal(few_shot_indices(labels, 100, seed=1), torch.arange(83))
    with pytest.raises(ValueError, match="few_shot"):
        few_shot_indices(labels, 0, seed=1)
    # The stream accepts the few-shot subset as its pool.
    stream = Stream(83, stream_spec(megabatches=3), seed=1, pool=picked)
    used = torch.cat([torch.cat([m.train_idx, m.val_idx]) for m in stream.megabatches])
    assert stream.megabatch_size == 11 and as_set(used) <= as_set(picked)


def test_impossible_megabatch_size_is_a_spec_refusal() -> None:
    from app_engine.errors import SpecInputError

    with pytest.raises(SpecInputError, match="megabatch_size"):
        Stream(100, StreamSpec(megabatches=4, megabatch_size=30), seed=0)


def test_score_source_first_is_the_start_of_megabatch_one_at_every_step() -> None:
    stream = Stream(1000, StreamSpec(megabatches=5), seed=3)
    k = math.ceil(0.2 * stream.megabatch_size)
    first = stream.megabatch(1).train_idx[:k]
    for t in range(1, 6):
        assert torch.equal(stream.score_indices(t, 0.2, "first"), first)
    assert not torch.equal(stream.score_indices(3, 0.2, "current"), first)
