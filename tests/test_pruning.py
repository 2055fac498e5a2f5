"""Pruning: scores, nested exact masks, and the APP schedule followed exactly (APP_SPEC 2 and 5).

The models here are local and tiny (a conv net with BatchNorm and a 1x1 shortcut, and an MLP with
a ``classifier``), normalising their own input like the registry's models; ``prunable`` picks the
weights the way ``app_engine.models.prunable_parameters`` does. Data: scikit-learn's digits.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import Tensor, nn

from app_common import spec
from app_engine.pruning import (
    GRASP_TEMPERATURE,
    ITERATIVE_PRUNERS,
    PRUNERS,
    SCOPES,
    Masks,
    density_schedule,
    prune,
    select_masks,
)


class Normalize(nn.Module):
    def __init__(self, mean: Tensor, std: Tensor) -> None:
        super().__init__()
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std


class ConvNet(nn.Module):
    """Two 3x3 convolutions with BatchNorm plus a 1x1 shortcut on 1x8x8 digit images."""

    def __init__(self, mean: float, std: float) -> None:
        super().__init__()
        self.normalize = Normalize(torch.tensor(mean), torch.tensor(std))
        self.features = nn.Sequential(
            nn.Conv2d(1, 6, 3, padding=1, bias=False),
            nn.BatchNorm2d(6),
            nn.ReLU(),
            nn.Conv2d(6, 8, 3, padding=1, bias=False),
            nn.BatchNorm2d(8),
        )
        self.shortcut = nn.Conv2d(1, 8, 1, bias=False)
        self.classifier = nn.Linear(8, 10)

    def forward(self, x: Tensor) -> Tensor:
        x = self.normalize(x)
        h = F.relu(self.features(x) + self.shortcut(x))
        return self.classifier(h.mean(dim=(2, 3)))


class MLP(nn.Module):
    def __init__(self, mean: Tensor, std: Tensor, hidden: tuple[int, ...] = (32, 16), *, bias: bool = True) -> None:
        super().__init__()
        self.normalize = Normalize(mean, std)
        widths = (mean.numel(), *hidden)
        self.hidden = nn.ModuleList(nn.Linear(a, b, bias=bias) for a, b in zip(widths, widths[1:], strict=False))
        self.classifier = nn.Linear(widths[-1], 10, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        h = self.normalize(x.flatten(1))
        for layer in self.hidden:
            h = F.relu(layer(h))
        return self.classifier(h)


def prunable(model: nn.Module) -> dict[str, nn.Parameter]:
    """Conv weights; without convs, the linear weights except ``model.classifier``."""
    convs = [m.weight for m in model.modules() if isinstance(m, nn.Conv2d)]
    chosen = convs or [
        m.weight for m in model.modules() if isinstance(m, nn.Linear) and m is not getattr(model, "classifier", None)
    ]
    ids = {id(p) for p in chosen}
    return {name: p for name, p in model.named_parameters() if id(p) in ids}


@pytest.fixture(scope="module")
def digits() -> tuple[Tensor, Tensor]:
    x, y = load_digits(return_X_y=True)
    return torch.tensor(x, dtype=torch.float32), torch.tensor(y, dtype=torch.int64)


def make(arch: str, x: Tensor) -> nn.Module:
    if arch == "conv":
        return ConvNet(float(x.mean()), float(x.std()))
    return MLP(x.mean(0), x.std(0) + 1.0)


def inputs_for(arch: str, x: Tensor) -> Tensor:
    return x.view(-1, 1, 8, 8) if arch == "conv" else x


def batches_of(x: Tensor, y: Tensor, start: int, size: int = 32, count: int = 2) -> list[tuple[Tensor, Tensor]]:
    bounds = [(start + i * size, start + (i + 1) * size) for i in range(count)]
    return [(x[a:b], y[a:b]) for a, b in bounds]


def snapshot(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_state(model: nn.Module, before: dict[str, Tensor]) -> None:
    after = model.state_dict()
    assert list(after) == list(before)
    for k, v in before.items():
        assert torch.equal(after[k], v), f"{k} changed"


# --------------------------------------------------------------------------------------------------
# The central test: an APP schedule followed exactly, for every pruner and scope


@pytest.mark.parametrize("scope", SCOPES)
@pytest.mark.parametrize("pruner", list(PRUNERS))
@pytest.mark.parametrize("arch", ["conv", "mlp"])
def test_app_schedule_is_followed_exactly(arch: str, pruner: str, scope: str, digits: tuple[Tensor, Tensor]) -> None:
    x_all, y_all = digits
    x_all = inputs_for(arch, x_all)
    torch.manual_seed(0)
    model = make(arch, digits[0])
    params = prunable(model)
    fixed = {n: p for n, p in model.named_parameters() if n not in params}
    assert "classifier.weight" in fixed and "classifier.bias" in fixed
    masks = Masks.ones(params)
    total = masks.total()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    schedule = density_schedule("app", 4.5, 8)

    for t, keep in enumerate(schedule, start=1):
        batches = batches_of(x_all, y_all, start=64 * t)
        before = snapshot(model)

        # Scoring alone changes nothing: weights, BN running stats, mode, gradients.
        training = model.training
        scores = PRUNERS[pruner](model, params, masks, batches, seed=t)
        assert_same_state(model, before)
        assert model.training == training
        assert set(scores) == set(params)
        assert all(scores[n].shape == params[n].shape for n in params)

        old = masks.clone()
        masks = prune(
            model, params, masks, pruner=pruner, keep=keep, scope=scope, batches=batches, seed=t, iterations=5
        )

        # Exact density: global keeps round(keep * total) weights, local round(keep * numel) per layer.
        if scope == "global":
            assert abs(masks.nonzero() - keep * total) <= 0.5
            assert all(n >= 1 for n in masks.layer_nonzero().values())
        else:
            for name, n in masks.layer_nonzero().items():
                assert abs(n - keep * params[name].numel()) <= 0.5, name
        assert abs(masks.density() - keep) <= len(masks) / total
        # Nested, and the weights follow the masks: kept weights unchanged, pruned ones zero.
        assert masks.is_subset_of(old)
        for name, p in params.items():
            assert not (masks[name] & ~old[name]).any()
            assert torch.equal(p.detach(), torch.where(masks[name], before[name], torch.zeros(())))
        # Classifier, biases, norms and BN buffers are untouched by pruning.
        for name, p in fixed.items():
            assert torch.equal(p.detach(), before[name]), name
        for name, b in model.named_buffers():
            assert torch.equal(b, before[name]), name

        # Train a little so the next scores see new weights; the masks keep pruned weights at zero.
        model.train()
        for x, y in batches_of(x_all, y_all, start=800 + 64 * t, size=64):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
            masks.apply_(model)
        for name, p in params.items():
            assert not p.detach()[~masks[name]].any(), f"pruned weights of {name} came back"
            assert int(p.detach().count_nonzero()) == masks.layer_nonzero()[name]
        model.eval()

    assert masks.density() == pytest.approx(0.8**4.5, abs=len(masks) / total)


@pytest.mark.parametrize("pruner", list(PRUNERS))
def test_one_shot_to_extreme_sparsity_is_exact_and_no_layer_collapses(
    pruner: str, digits: tuple[Tensor, Tensor]
) -> None:
    x, y = digits
    torch.manual_seed(1)
    model = make("conv", x)
    params = prunable(model)
    masks = prune(
        model, params, Masks.ones(params), pruner=pruner, keep=0.02, scope="global",
        batches=batches_of(inputs_for("conv", x), y, 0), seed=3, iterations=10,
    )
    assert masks.nonzero() == round(0.02 * masks.total())
    assert min(masks.layer_nonzero().values()) >= 1


# --------------------------------------------------------------------------------------------------
# Pruners


def test_registry_matches_the_spec_names() -> None:
    assert tuple(PRUNERS) == spec.PRUNERS
    assert ITERATIVE_PRUNERS == {"synflow"}


@pytest.mark.parametrize("pruner", list(PRUNERS))
@pytest.mark.parametrize("train_mode", [False, True])
def test_scoring_never_changes_the_model(pruner: str, train_mode: bool, digits: tuple[Tensor, Tensor]) -> None:
    x, y = digits
    torch.manual_seed(2)
    model = make("conv", x)
    # Non-trivial BN running stats, so that a reset or an update would show.
    model.train()
    with torch.no_grad():
        model(inputs_for("conv", x[:200]))
    model.train(train_mode)
    params = prunable(model)
    masks = select_masks(PRUNERS["random"](model, params, Masks.ones(params), [], seed=0), Masks.ones(params), 0.5)
    masks.apply_(model)
    before = snapshot(model)
    rng = torch.get_rng_state()
    PRUNERS[pruner](model, params, masks, batches_of(inputs_for("conv", x), y, 0), seed=5)
    assert_same_state(model, before)
    assert all(m.training == train_mode for m in model.modules())
    assert all(p.grad is None for p in model.parameters())
    assert torch.equal(torch.get_rng_state(), rng)


def test_random_is_seeded_by_its_own_generator(digits: tuple[Tensor, Tensor]) -> None:
    model = make("mlp", digits[0])
    params = prunable(model)
    ones = Masks.ones(params)
    rng = torch.get_rng_state()
    a = PRUNERS["random"](model, params, ones, [], seed=7)
    b = PRUNERS["random"](model, params, ones, [], seed=7)
    c = PRUNERS["random"](model, params, ones, [], seed=8)
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(a[n], b[n]) for n in params)
    assert all(not torch.equal(a[n], c[n]) for n in params)
    assert select_masks(a, ones, 0.3).state_dict().keys() == select_masks(b, ones, 0.3).state_dict().keys()
    ma, mb, mc = (select_masks(s, ones, 0.3) for s in (a, b, c))
    assert all(torch.equal(ma[n], mb[n]) for n in params)
    assert not all(torch.equal(ma[n], mc[n]) for n in params)


@pytest.mark.parametrize("scope", SCOPES)
def test_magnitude_keeps_the_largest_weights(scope: str, digits: tuple[Tensor, Tensor]) -> None:
    torch.manual_seed(3)
    model = make("mlp", digits[0])
    params = prunable(model)
    before = {n: p.detach().abs().clone() for n, p in params.items()}
    masks = prune(model, params, Masks.ones(params), pruner="magnitude", keep=0.3, scope=scope)
    groups = [list(params)] if scope == "global" else [[n] for n in params]
    for names in groups:
        kept = torch.cat([before[n][masks[n]] for n in names])
        dropped = torch.cat([before[n][~masks[n]] for n in names])
        assert kept.min() >= dropped.max()


def test_snip_matches_the_closed_form_gradient() -> None:
    # logits = C W x (no nonlinearity, no bias): dL/dW = C^T (softmax(logits) - onehot(y)) x^T,
    # averaged over the samples of both batches; SNIP = |dL/dW * W|.
    torch.manual_seed(4)
    model = nn.Sequential()
    model.hidden = nn.Linear(3, 4, bias=False)
    model.classifier = nn.Linear(4, 2, bias=False)
    params = {"hidden.weight": model.hidden.weight}
    x = torch.randn(5, 3)
    y = torch.tensor([0, 1, 1, 0, 1])
    w, c = model.hidden.weight.detach(), model.classifier.weight.detach()
    p = torch.softmax(x @ w.T @ c.T, dim=1)
    delta = p - F.one_hot(y, 2).float()  # [5, 2]
    grad = (c.T @ delta.T @ x) / 5  # [4, 3]
    expected = (grad * w).abs()
    scores = PRUNERS["snip"](model, params, Masks.ones(params), [(x[:2], y[:2]), (x[2:], y[2:])], seed=0)
    torch.testing.assert_close(scores["hidden.weight"], expected, rtol=1e-5, atol=1e-7)


def test_grasp_is_weight_times_hessian_gradient_product() -> None:
    # Against an explicit Hessian of the temperature-scaled mean loss w.r.t. the prunable weights.
    torch.manual_seed(5)
    model = nn.Sequential()
    model.h1 = nn.Linear(4, 5)
    model.act1 = nn.Tanh()
    model.h2 = nn.Linear(5, 3)
    model.act2 = nn.Tanh()
    model.classifier = nn.Linear(3, 3)
    model.double()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(8.0)  # large weights so that the temperature-200 logits are not all ~0
    params = {"h1.weight": model.h1.weight, "h2.weight": model.h2.weight}
    x = torch.randn(6, 4, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    shapes = [p.shape for p in params.values()]
    sizes = [p.numel() for p in params.values()]
    flat0 = torch.cat([p.detach().flatten() for p in params.values()])

    def loss(flat: Tensor) -> Tensor:
        tensors = {n: t.view(s) for n, t, s in zip(params, flat.split(sizes), shapes, strict=True)}
        logits = torch.func.functional_call(model, tensors, (x,)) / GRASP_TEMPERATURE
        return F.cross_entropy(logits, y)

    g = torch.autograd.functional.jacobian(loss, flat0)
    hess = torch.autograd.functional.hessian(loss, flat0)
    expected = (flat0 * (hess @ g)).split(sizes)
    scores = PRUNERS["grasp"](model, params, Masks.ones(params), [(x[:4], y[:4]), (x[4:], y[4:])], seed=0)
    for s, e, shape in zip(scores.values(), expected, shapes, strict=True):
        assert s.abs().max() > 0
        torch.testing.assert_close(s, e.view(shape), rtol=1e-7, atol=1e-16)


def test_synflow_matches_the_closed_form_path_count() -> None:
    # R = 1^T |C| |W2| |W1| 1, so dR/d|W1|[i, j] = (1^T |C| |W2|)[i] and dR/d|W2|[i, j] =
    # (1^T |C|)[i] (|W1| 1)[j]; masked weights count as 0 (an MLP without biases, ReLU between).
    torch.manual_seed(6)
    model = MLP(torch.full((6,), 3.0), torch.ones(6), hidden=(5, 4), bias=False)
    params = prunable(model)
    masks = select_masks(PRUNERS["random"](model, params, Masks.ones(params), [], seed=1), Masks.ones(params), 0.6)
    masks.apply_(model)
    w1, w2 = (params[n].detach().double().abs() for n in ("hidden.0.weight", "hidden.1.weight"))
    c = model.classifier.weight.detach().double().abs()
    ones_in, ones_out = torch.ones(6, dtype=torch.float64), torch.ones(10, dtype=torch.float64)
    e1 = w1 * torch.outer(ones_out @ c @ w2, ones_in)
    e2 = w2 * torch.outer(ones_out @ c, w1 @ ones_in)
    x = torch.randn(3, 6)
    scores = PRUNERS["synflow"](model, params, masks, [(x, torch.zeros(3, dtype=torch.int64))], seed=0)
    assert scores["hidden.0.weight"].dtype == torch.float64
    torch.testing.assert_close(scores["hidden.0.weight"], e1, rtol=1e-12, atol=0.0)
    torch.testing.assert_close(scores["hidden.1.weight"], e2, rtol=1e-12, atol=0.0)
    assert not scores["hidden.0.weight"][~masks["hidden.0.weight"]].any()


def test_synflow_ignores_input_normalisation(digits: tuple[Tensor, Tensor]) -> None:
    # Digit features have means up to ~14: fed all-ones, (1 - mean) / std is mostly negative and an
    # all-positive first layer would give zero flow everywhere. The signal enters after normalising.
    x, y = digits
    model = make("mlp", x)
    normalised_ones = (1 - model.normalize.mean) / model.normalize.std
    assert float((normalised_ones < 0).float().mean()) > 0.5
    params = prunable(model)
    scores = PRUNERS["synflow"](model, params, Masks.ones(params), batches_of(x, y, 0), seed=0)
    for name, s in scores.items():
        assert bool((s > 0).all()), name


def test_synflow_does_not_overflow_on_deep_nets() -> None:
    # 40 layers of 64 with N(0, 1) weights: R ~ (64 * 0.8) ** 40 ~ 1e68, beyond float32.
    torch.manual_seed(7)
    model = MLP(torch.zeros(64), torch.ones(64), hidden=(64,) * 40, bias=False)
    with torch.no_grad():
        for layer in model.hidden:
            layer.weight.normal_()
    params = prunable(model)
    x = torch.randn(2, 64)
    scores = PRUNERS["synflow"](model, params, Masks.ones(params), [(x, torch.zeros(2, dtype=torch.int64))], seed=0)
    flat = torch.cat([s.flatten() for s in scores.values()])
    assert bool(torch.isfinite(flat).all()) and bool((flat > 0).all())
    assert float(flat.max()) > torch.finfo(torch.float32).max
    assert all(p.dtype == torch.float32 for p in model.parameters())
    total = sum(p.numel() for p in params.values())
    assert select_masks(scores, Masks.ones(params), 0.5).nonzero() == round(0.5 * total)


def test_synflow_default_iterations(digits: tuple[Tensor, Tensor]) -> None:
    x, y = digits
    torch.manual_seed(8)
    model = make("conv", x)
    params = prunable(model)
    masks = Masks.ones(params)
    for keep in (0.5, 0.1):
        old = masks
        masks = prune(
            model, params, masks, pruner="synflow", keep=keep, scope="global",
            batches=batches_of(inputs_for("conv", x), y, 0), seed=0,
        )
        assert masks.nonzero() == round(keep * masks.total())
        assert masks.is_subset_of(old)


def test_pruners_need_batches_when_they_run_the_model(digits: tuple[Tensor, Tensor]) -> None:
    model = make("mlp", digits[0])
    params = prunable(model)
    for name in ("snip", "grasp", "synflow"):
        with pytest.raises(ValueError, match="scoring batch"):
            PRUNERS[name](model, params, Masks.ones(params), [], seed=0)


# --------------------------------------------------------------------------------------------------
# select_masks


def two_layers() -> dict[str, Tensor]:
    return {"a": torch.zeros(4, 5), "b": torch.zeros(3, 2)}


def test_select_is_exact_and_deterministic_with_ties() -> None:
    weights = two_layers()
    ones = Masks.ones(weights)
    scores = {n: torch.ones_like(w) for n, w in weights.items()}
    first = select_masks(scores, ones, 0.37)
    again = select_masks(scores, ones, 0.37)
    assert first.nonzero() == round(0.37 * 26) == 10
    assert all(torch.equal(first[n], again[n]) for n in weights)
    # Ties go to the lowest positions: the first 10 of layer a, except that the layer guard then
    # gives layer b its first weight in place of a's 10th.
    assert first["a"].flatten().nonzero().flatten().tolist() == list(range(9))
    assert first["b"].flatten().nonzero().flatten().tolist() == [0]
    local = select_masks(scores, ones, 0.37, "local")
    assert local.layer_nonzero() == {"a": round(0.37 * 20), "b": round(0.37 * 6)}


def test_select_picks_what_a_stable_sort_picks() -> None:
    # Integer scores with many ties, a partly pruned mask: the kept set is the first k alive
    # positions of a stable descending sort.
    gen = torch.Generator().manual_seed(11)
    weights = {"a": torch.zeros(40, 30), "b": torch.zeros(50)}
    scores = {n: torch.randint(0, 7, w.shape, generator=gen).float() for n, w in weights.items()}
    masks = Masks({n: torch.rand(w.shape, generator=gen) < 0.7 for n, w in weights.items()})
    for scope in SCOPES:
        out = select_masks(scores, masks, 0.33, scope)
        groups = [list(weights)] if scope == "global" else [[n] for n in weights]
        for names in groups:
            vals = torch.cat([scores[n].flatten() for n in names])
            alive = torch.cat([masks[n].flatten() for n in names])
            got = torch.cat([out[n].flatten() for n in names])
            k = int(got.sum())
            order = torch.sort(torch.where(alive, vals, -math.inf), descending=True, stable=True).indices
            expected = torch.zeros_like(got)
            expected[order[:k]] = True
            assert torch.equal(got, expected)


def test_select_never_revives_and_never_grows() -> None:
    weights = two_layers()
    for scope in SCOPES:
        start = select_masks({n: torch.rand(w.shape) for n, w in weights.items()}, Masks.ones(weights), 0.5, scope)
        # Scores that favour exactly the pruned weights: they must still not come back.
        inverted = {n: (~start[n]).float() * 100 + torch.rand(start[n].shape) for n in weights}
        nxt = select_masks(inverted, start, 0.3, scope)
        assert nxt.is_subset_of(start)
        for keep in (0.5, 0.8, 1.0):
            same = select_masks(inverted, start, keep, scope)
            assert all(torch.equal(same[n], start[n]) for n in weights)


def test_select_keeps_the_best_scores_among_the_alive() -> None:
    scores = {"a": torch.arange(20.0).view(4, 5), "b": torch.arange(100.0, 106.0).view(3, 2)}
    masks = Masks({"a": torch.arange(20).view(4, 5) % 2 == 0, "b": torch.ones(3, 2, dtype=torch.bool)})
    out = select_masks(scores, masks, 10 / 26)
    # Alive: b (6, all above a) and even entries of a; the 4 best of those are 18, 16, 14, 12.
    assert out.layer_nonzero() == {"a": 4, "b": 6}
    assert out["a"].flatten().nonzero().flatten().tolist() == [12, 14, 16, 18]


def test_global_scope_never_empties_a_layer() -> None:
    weights = two_layers()
    scores = {"a": torch.rand(4, 5) + 10, "b": torch.rand(3, 2)}
    out = select_masks(scores, Masks.ones(weights), 0.2)  # k = 5 < 20: plain top-k keeps only layer a
    assert out.nonzero() == round(0.2 * 26)
    assert out.layer_nonzero()["b"] == 1
    assert out["b"].flatten()[scores["b"].flatten().argmax()]
    # The best 4 of layer a make room for it.
    assert set(scores["a"][out["a"]].tolist()) == set(scores["a"].flatten().topk(4).values.tolist())
    local = select_masks({"a": torch.rand(4, 5), "b": torch.rand(3, 2)}, Masks.ones(weights), 0.01, "local")
    assert local.layer_nonzero() == {"a": 1, "b": 1}


def test_nan_scores_rank_last_among_the_alive() -> None:
    weights = two_layers()
    scores = {"a": torch.rand(4, 5), "b": torch.full((3, 2), float("nan"))}
    scores["a"][0, 0] = float("inf")
    out = select_masks(scores, Masks.ones(weights), 18 / 26)
    assert out.layer_nonzero() == {"a": 17, "b": 1}
    assert out["a"][0, 0]


def test_select_rejects_bad_arguments() -> None:
    weights = two_layers()
    ones = Masks.ones(weights)
    scores = {n: torch.rand(w.shape) for n, w in weights.items()}
    with pytest.raises(ValueError, match="keep"):
        select_masks(scores, ones, 1.5)
    with pytest.raises(ValueError, match="scope"):
        select_masks(scores, ones, 0.5, "layerwise")
    with pytest.raises(KeyError):
        select_masks({"a": scores["a"]}, ones, 0.5)
    with pytest.raises(ValueError, match="shape"):
        select_masks({"a": scores["a"], "b": torch.rand(6)}, ones, 0.5)
    model = MLP(torch.zeros(64), torch.ones(64))
    with pytest.raises(ValueError, match="unknown pruner"):
        prune(model, prunable(model), Masks.ones(prunable(model)), pruner="lottery", keep=0.5)


# --------------------------------------------------------------------------------------------------
# Masks


def test_apply_zeroes_exactly_the_masked_entries(digits: tuple[Tensor, Tensor]) -> None:
    torch.manual_seed(9)
    model = make("conv", digits[0])
    params = prunable(model)
    masks = Masks({n: torch.rand(p.shape) < 0.4 for n, p in params.items()})
    before = snapshot(model)
    masks.apply_(model)
    for name, value in model.state_dict().items():
        expected = before[name] * masks[name] if name in params else before[name]
        assert torch.equal(value, expected), name
    # Weights that grew back (an optimizer step) are zeroed again, also after a dtype change,
    # and through a name -> parameter dict.
    with torch.no_grad():
        for p in params.values():
            p.add_(1.0)
    masks.apply_(model)
    assert all(torch.equal(p.detach() != 0, masks[n]) for n, p in params.items())
    model.double()
    with torch.no_grad():
        for p in params.values():
            p.add_(1.0)
    masks.apply_(prunable(model))
    assert all(p.dtype == torch.float64 and torch.equal(p.detach() != 0, masks[n]) for n, p in params.items())
    with pytest.raises(KeyError, match="no parameters named"):
        masks.apply_(nn.Linear(2, 2))


def test_densities_and_counts() -> None:
    masks = Masks({"a": torch.tensor([[True, False], [False, False]]), "b": torch.tensor([True, True, True, False])})
    assert masks.nonzero() == 4
    assert masks.total() == 8
    assert masks.density() == 0.5
    assert masks.layer_density() == {"a": 0.25, "b": 0.75}
    assert masks.layer_nonzero() == {"a": 1, "b": 3}
    assert Masks({}).density() == 1.0
    assert Masks.ones({"w": torch.zeros(3, 3)}).density() == 1.0


def test_state_dict_round_trip() -> None:
    weights = two_layers()
    masks = select_masks({n: torch.rand(w.shape) for n, w in weights.items()}, Masks.ones(weights), 0.4)
    state = masks.state_dict()
    assert all(t.dtype == torch.bool and t.device.type == "cpu" for t in state.values())
    restored = Masks.ones(weights)
    restored.load_state_dict(state)
    assert all(torch.equal(restored[n], masks[n]) for n in weights)
    assert all(torch.equal(Masks.from_state_dict(state)[n], masks[n]) for n in weights)
    assert restored.to("cpu") is restored and restored.density() == masks.density()
    with pytest.raises(KeyError, match="missing"):
        restored.load_state_dict({"a": state["a"]})
    with pytest.raises(ValueError, match="shape"):
        restored.load_state_dict({"a": state["a"], "b": torch.ones(6, dtype=torch.bool)})


def test_loaded_masks_are_applied_after_reload() -> None:
    # load_state_dict must drop the cached factors of the old masks.
    layer = nn.Linear(4, 4)
    params = {"weight": layer.weight}
    masks = Masks.ones(params)
    masks.apply_(params)
    assert bool((layer.weight != 0).all())
    masks.load_state_dict({"weight": torch.eye(4, dtype=torch.bool)})
    masks.apply_(params)
    assert torch.equal(layer.weight.detach() != 0, torch.eye(4, dtype=torch.bool))
    assert math.isclose(masks.density(), 0.25)


@pytest.mark.parametrize("arch", ["mlp", "cnn_small"])
def test_grasp_keeps_the_gradient_flow_and_its_negation_collapses_it(arch: str) -> None:
    """GraSP keeps the weights whose removal would reduce the gradient norm ||g||^2 the most
    (keep score ``w * Hg``, largest kept). So keeping by that score must leave ||g||^2 about where
    it was (it may grow), and keeping by its negation must collapse it. Guards the sign: flipping
    it (an old reading of the paper) swaps the two outcomes."""
    from app_common.spec import DatasetSpec
    from app_engine.data import load_dataset
    from app_engine.models import create_model, prunable_parameters
    from app_engine.pruning import grasp_scores

    digits = load_dataset(DatasetSpec(name="digits"), seed=0)
    torch.manual_seed(0)

    def build() -> nn.Module:
        return create_model(arch, input_shape=digits.input_shape, num_classes=10, mean=digits.mean, std=digits.std)

    model = build()
    params = prunable_parameters(model)
    masks = Masks.ones(params)
    x, y = digits.x_train[:256], digits.y_train[:256]

    def grad_norm(kept: Masks) -> float:
        net = build()
        net.load_state_dict(model.state_dict())
        net.train()
        named = dict(net.named_parameters())
        with torch.no_grad():
            for name, mask in kept.items():
                named[name].mul_(mask)
        loss = F.cross_entropy(net(x) / GRASP_TEMPERATURE, y)
        grads = torch.autograd.grad(loss, [named[n] for n in params])
        return float(sum((g * kept[n]).pow(2).sum() for g, n in zip(grads, params, strict=True)))

    scores = grasp_scores(model, params, masks, [(x[:128], y[:128]), (x[128:], y[128:])], seed=0)
    full = grad_norm(masks)
    kept_by_score = grad_norm(select_masks(scores, masks, 0.2))
    kept_by_negation = grad_norm(select_masks({n: -s for n, s in scores.items()}, masks, 0.2))
    assert kept_by_score > 0.8 * full
    assert kept_by_negation < 0.3 * full
    assert kept_by_negation < kept_by_score / 3
