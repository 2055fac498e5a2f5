"""app_engine.train: the LR schedule, batching, the optimizer's options and one megabatch of training."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from app_common.events import EpochEnded
from app_common.spec import TrainingSpec
from app_engine.train import batch_bounds, lr_at, make_optimizer, resolve_runtime, train_megabatch


def spec(**kw: object) -> TrainingSpec:
    return TrainingSpec.model_validate({"epochs": 10, "lr": 0.1, "gamma": 0.1, **kw})


def test_lr_steps_down_at_each_milestone_like_multisteplr() -> None:
    s = spec(milestones=[3, 7])
    got = [lr_at(s, epoch, 0, 5) for epoch in range(10)]
    expected = [0.1] * 3 + [0.01] * 4 + [0.001] * 3
    assert got == pytest.approx(expected)
    # The same as torch's scheduler stepped once per epoch.
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[3, 7], gamma=0.1)
    theirs = []
    for _ in range(10):
        theirs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert got == pytest.approx(theirs)


def test_default_milestones_are_40_and_80_percent() -> None:
    s = spec()
    assert s.resolved_milestones == [4, 8]
    assert lr_at(s, 3, 0, 1) == pytest.approx(0.1) and lr_at(s, 4, 0, 1) == pytest.approx(0.01)
    assert lr_at(s, 8, 0, 1) == pytest.approx(0.001)


def test_warmup_rises_linearly_per_step_then_holds() -> None:
    s = spec(warmup_epochs=2, milestones=[8])
    steps = 4
    ramp = [lr_at(s, e, k, steps) for e in range(2) for k in range(steps)]
    assert ramp == pytest.approx([0.1 * (i + 1) / 8 for i in range(8)])
    assert lr_at(s, 2, 0, steps) == pytest.approx(0.1)
    assert lr_at(s, 9, 3, steps) == pytest.approx(0.01)


@pytest.mark.parametrize(
    ("n", "bs", "expected"),
    [
        (10, 4, [(0, 4), (4, 8), (8, 10)]),
        (9, 4, [(0, 4), (4, 9)]),  # a tail of one joins the batch before
        (72, 71, [(0, 72)]),  # the case: 72 scoring samples in batches of 71
        (1, 4, [(0, 1)]),  # a single sample has nothing to join
        (8, 4, [(0, 4), (4, 8)]),
        (0, 4, []),
    ],
)
def test_batch_bounds_merge_a_tail_of_one(n: int, bs: int, expected: list[tuple[int, int]]) -> None:
    assert batch_bounds(n, bs) == expected


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))


def test_biases_and_norms_are_exempt_from_decay_unless_asked() -> None:
    model = tiny_model()
    default = make_optimizer(model, spec(weight_decay=1e-3))
    assert [g["weight_decay"] for g in default.param_groups] == [1e-3, 0.0]
    assert {id(p) for p in default.param_groups[1]["params"]} == {id(p) for p in model.parameters() if p.dim() == 1}
    everything = make_optimizer(model, spec(weight_decay=1e-3, decay_norms_and_biases=True))
    assert [g["weight_decay"] for g in everything.param_groups] == [1e-3, 1e-3]


def _train(model: nn.Module, state: dict | None, momentum_carry: bool) -> tuple[dict, list[EpochEnded]]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(40, 4, generator=gen)
    y = torch.randint(0, 3, (40,), generator=gen)
    events: list[EpochEnded] = []
    trained = train_megabatch(
        model, apply_masks=lambda: None, x=x, y=y, train_idx=torch.arange(30), val_idx=torch.arange(30, 40),
        spec=spec(epochs=2, batch_size=8, momentum_carry=momentum_carry), augment_mode="none",
        rt=resolve_runtime("cpu", "fp32"), gen=gen, megabatch=1, emit=events.append, optimizer_state=state,
    )
    assert trained.optimizer_state is not None
    return trained.optimizer_state, events


def test_a_carried_optimizer_state_continues_the_momentum() -> None:
    first, events = _train(tiny_model(), None, True)
    assert [e.epoch for e in events] == [1, 2]
    buffers = [s["momentum_buffer"] for s in first["state"].values()]
    assert buffers and all(b is not None for b in buffers)
    fresh = tiny_model()
    carried = tiny_model()
    fresh_state, _ = _train(fresh, None, False)
    carried_state, _ = _train(carried, first, True)
    # Same data and start, different momentum at the first step: the weights part ways.
    assert not all(torch.equal(a, b) for a, b in zip(fresh.parameters(), carried.parameters(), strict=True))


def test_a_stop_raised_by_emit_ends_training() -> None:
    class Stop(Exception):
        pass

    def emit(event: EpochEnded) -> None:
        raise Stop

    with pytest.raises(Stop):
        train_megabatch(
            tiny_model(), apply_masks=lambda: None, x=torch.randn(20, 4), y=torch.randint(0, 3, (20,)),
            train_idx=torch.arange(16), val_idx=torch.arange(16, 20), spec=spec(epochs=3, batch_size=8),
            augment_mode="none", rt=resolve_runtime("cpu", "fp32"), gen=torch.Generator(), megabatch=1, emit=emit,
        )


def test_a_diverging_run_is_an_input_error_that_names_the_lr() -> None:
    """NaN loss is deterministic for a given spec: it is the input's fault (RunInputError, so the
    service fails the job instead of retrying it) and the message says what to change."""
    from sklearn.datasets import load_digits

    from app_engine.errors import RunInputError, TrainingDiverged

    digits = load_digits()
    # Pixels scaled by 1e20 and lr 10: the first step sends the weights to ~1e22 and the next
    # logits past float32's range.
    x = torch.tensor(digits.data[:128], dtype=torch.float32) * 1e20
    y = torch.tensor(digits.target[:128], dtype=torch.int64)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 10))
    s = spec(epochs=2, lr=10.0, momentum=0.0, precision="fp32")
    rt = resolve_runtime("cpu", "fp32")
    idx = torch.arange(128)
    with pytest.raises(TrainingDiverged, match="training.lr") as info:
        train_megabatch(
            model, apply_masks=lambda: None, x=x, y=y, train_idx=idx[:96], val_idx=idx[96:], spec=s,
            augment_mode="none", rt=rt, gen=torch.Generator().manual_seed(0), megabatch=1, emit=lambda event: None,
        )
    assert isinstance(info.value, RunInputError)
