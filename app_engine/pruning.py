"""Pruning: score -> select mask -> apply mask (the split of Synaptic-Flow).

- A **pruner** (an entry of :data:`PRUNERS`) only computes scores, one tensor per prunable weight,
  the higher the more a weight deserves to be kept. It never changes the model: pruners that run
  the network work on a deep copy, so weights, BatchNorm running statistics, train/eval mode and
  ``.grad`` of the caller's model are untouched.
- :func:`select_masks` turns scores into new masks that are **nested** (an already pruned weight is
  never revived) and **exact** (the number of kept weights is ``round(keep * total)``), which is
  what keeps the measured density on the APP schedule (APP_SPEC sections 2 and 5).
- :class:`Masks` holds one boolean tensor per prunable parameter name and multiplies them into the
  weights in place (:meth:`Masks.apply_`), which the training loop calls after every optimizer step.
- :func:`prune` chains the three; ``synflow`` is iterative and re-scores many times inside it.

Shapes: a mask, a score and its weight share the weight's shape (``[out, in, kh, kw]`` for a
convolution, ``[out, in]`` for a linear layer). Scoring batches are ``(x, y)`` pairs with ``x`` in the
model's input format (uint8 images or float features, ``[B, ...]``) and ``y`` int64 labels ``[B]``.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Protocol, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from app_common.spec import SCOPES
from app_engine.registry import Registry
from app_engine.schedule import density_schedule

__all__ = [
    "GRASP_TEMPERATURE",
    "ITERATIVE_PRUNERS",
    "PRUNERS",
    "SCOPES",
    "Batch",
    "Masks",
    "ScoreFn",
    "density_schedule",
    "prune",
    "register_pruner",
    "select_masks",
]

log = logging.getLogger(__name__)

Batch = tuple[Tensor, Tensor]
# GraSP divides the logits by this temperature before the loss (Wang et al. 2020, reference code),
# which keeps the softmax away from saturation so that the Hessian-gradient product is informative.
GRASP_TEMPERATURE = 200.0


class ScoreFn(Protocol):
    def __call__(
        self,
        model: nn.Module,
        params: Mapping[str, nn.Parameter],
        masks: Masks,
        batches: Sequence[Batch],
        *,
        seed: int,
    ) -> dict[str, Tensor]: ...


PRUNERS: Registry[ScoreFn] = Registry("pruner")
# Pruners that :func:`prune` applies in many small rounds rather than in one shot.
ITERATIVE_PRUNERS: set[str] = set()


def register_pruner(name: str, *, iterative: bool = False) -> Callable[[ScoreFn], ScoreFn]:
    """Register a score function under ``name`` (the string a job spec uses)."""
    if iterative:
        ITERATIVE_PRUNERS.add(name)
    return PRUNERS.register(name)


# --------------------------------------------------------------------------------------------------
# Masks


class Masks:
    """One boolean mask per prunable parameter, keyed by the parameter's name in the model.

    ``True`` = kept. The float copies that :meth:`apply_` multiplies into the weights are cached per
    target object: pass the same model (or the same dict) on every step. The cache is rebuilt when
    the target object changes or when its weights moved to another device or dtype; it assumes the
    target keeps its ``Parameter`` objects (``model.to(...)``, ``load_state_dict`` and optimizers do).
    """

    def __init__(self, masks: Mapping[str, Tensor]) -> None:
        self._masks: dict[str, Tensor] = {name: m.detach().to(torch.bool) for name, m in masks.items()}
        self._forget()

    @classmethod
    def ones(cls, params: Mapping[str, Tensor]) -> Masks:
        """All-kept masks on the parameters' devices."""
        return cls({name: torch.ones_like(p, dtype=torch.bool) for name, p in params.items()})

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Tensor]) -> Masks:
        return cls(state)

    # -- mapping protocol ---------------------------------------------------------------------
    def __getitem__(self, name: str) -> Tensor:
        return self._masks[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._masks)

    def __len__(self) -> int:
        return len(self._masks)

    def __contains__(self, name: object) -> bool:
        return name in self._masks

    def names(self) -> list[str]:
        return list(self._masks)

    def items(self) -> Iterator[tuple[str, Tensor]]:
        return iter(self._masks.items())

    def __repr__(self) -> str:
        return f"Masks(layers={len(self)}, density={self.density():.4f})"

    # -- applying ---------------------------------------------------------------------------------
    def _forget(self) -> None:
        self._bound: object | None = None
        self._weights: list[Tensor] = []
        self._factors: list[Tensor] = []

    def _bind(self, target: nn.Module | Mapping[str, Tensor]) -> None:
        named = dict(target.named_parameters()) if isinstance(target, nn.Module) else dict(target)
        missing = [name for name in self._masks if name not in named]
        if missing:
            raise KeyError(f"the model has no parameters named {missing}")
        self._weights = [named[name] for name in self._masks]
        self._factors = [
            m.to(device=w.device, dtype=w.dtype) for m, w in zip(self._masks.values(), self._weights, strict=True)
        ]
        self._bound = target

    def apply_(self, target: nn.Module | Mapping[str, Tensor]) -> None:
        """Zero the pruned weights of ``target`` (a model or a name -> parameter dict) in place.

        The hot path (same target as last time) is one fused multiply over all layers, with no
        dictionary look-ups and no host synchronisation.
        """
        if not self._masks:
            return
        if (
            target is not self._bound
            or self._weights[0].device != self._factors[0].device
            or self._weights[0].dtype != self._factors[0].dtype
        ):
            self._bind(target)
        with torch.no_grad():
            torch._foreach_mul_(self._weights, self._factors)

    # -- counting ---------------------------------------------------------------------------------
    def layer_nonzero(self) -> dict[str, int]:
        return {name: int(m.count_nonzero()) for name, m in self._masks.items()}

    def nonzero(self) -> int:
        """Number of kept prunable weights."""
        return sum(self.layer_nonzero().values())

    def total(self) -> int:
        """Number of prunable weights."""
        return sum(m.numel() for m in self._masks.values())

    def density(self) -> float:
        """Kept fraction over all prunable weights (1.0 when there are none)."""
        total = self.total()
        return self.nonzero() / total if total else 1.0

    def layer_density(self) -> dict[str, float]:
        return {name: int(m.count_nonzero()) / max(m.numel(), 1) for name, m in self._masks.items()}

    def is_subset_of(self, other: Masks) -> bool:
        """True when every weight kept here is also kept in ``other`` (same names and shapes)."""
        if self.names() != other.names():
            return False
        return all(
            m.shape == other[name].shape and not bool((m & ~other[name].to(m.device)).any())
            for name, m in self._masks.items()
        )

    # -- state ------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Tensor]:
        """Boolean CPU copies, ready for ``torch.save`` or safetensors."""
        return {name: m.detach().to("cpu", copy=True).contiguous() for name, m in self._masks.items()}

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        """Replace the masks with ``state`` (same names and shapes), keeping the current device."""
        if set(state) != set(self._masks):
            raise KeyError(
                f"mask names differ: missing {sorted(set(self._masks) - set(state))}, "
                f"unexpected {sorted(set(state) - set(self._masks))}"
            )
        for name, m in self._masks.items():
            if tuple(state[name].shape) != tuple(m.shape):
                raise ValueError(f"mask {name!r} has shape {tuple(state[name].shape)}, expected {tuple(m.shape)}")
        self._masks = {
            name: state[name].detach().to(device=m.device, dtype=torch.bool) for name, m in self._masks.items()
        }
        self._forget()

    def to(self, device: torch.device | str) -> Masks:
        """Move the masks to ``device`` in place and return ``self`` (like ``nn.Module.to``)."""
        self._masks = {name: m.to(device) for name, m in self._masks.items()}
        self._forget()
        return self

    def clone(self) -> Masks:
        return Masks({name: m.clone() for name, m in self._masks.items()})


# --------------------------------------------------------------------------------------------------
# Selecting masks


def _check_keep(keep: float, scope: str) -> None:
    if not 0.0 <= keep <= 1.0:
        raise ValueError(f"keep must be in [0, 1], got {keep}")
    if scope not in SCOPES:
        raise ValueError(f"unknown scope {scope!r}; expected one of {', '.join(SCOPES)}")


def _alive_scores(score: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Flat positions of the kept weights of one layer and their scores as float64.

    Pruned weights are left out of the ranking altogether, so they can never be revived. NaN
    scores (a numerical failure of a pruner) rank below every real score; infinities are clamped
    so that they still order among the alive weights.
    """
    if tuple(score.shape) != tuple(mask.shape):
        raise ValueError(f"score of shape {tuple(score.shape)} for a mask of shape {tuple(mask.shape)}")
    idx = mask.flatten().nonzero().squeeze(1)
    vals = score.detach().to(device=mask.device, dtype=torch.float64).flatten()[idx]
    big = torch.finfo(torch.float64).max
    return idx, torch.nan_to_num(vals, nan=-big, posinf=big, neginf=-big)


def _top_mask(vals: Tensor, k: int) -> Tensor:
    """Boolean mask of the ``k`` largest of the 1-D ``vals``; ties at the threshold go to the lowest
    positions, i.e. the same set a stable descending sort would give, in O(n) (a selection, not a
    sort: about 10x faster than sorting 15M scores on a CPU)."""
    n = len(vals)
    if k >= n:
        return torch.ones(n, dtype=torch.bool, device=vals.device)
    if k <= 0:
        return torch.zeros(n, dtype=torch.bool, device=vals.device)
    threshold = torch.kthvalue(vals, n - k + 1).values  # the k-th largest value
    out = vals > threshold
    ties = vals == threshold
    need = k - int(out.sum())  # >= 1: the threshold itself is among the k largest
    return out | (ties & (torch.cumsum(ties, 0) <= need))


def select_masks(scores: Mapping[str, Tensor], masks: Masks, keep: float, scope: str = "global") -> Masks:
    """New masks keeping a fraction ``keep`` of all prunable weights, chosen by highest score.

    - Nested: only currently kept weights compete; the result is a subset of ``masks``.
    - Exact: ``global`` keeps ``k = round(keep * total)`` weights over all layers; ``local`` keeps
      ``k_l = round(keep * numel_l)`` in every layer. Ties are broken by position (layer order, then
      row-major), so equal inputs give equal masks.
    - Never grows: where ``keep`` asks for more weights than are still kept (globally, or in a layer
      in local scope) the current mask is kept as it is.
    - Layer guard: no layer is pruned to zero while it still has weights, because an empty layer
      disconnects the network (layer collapse). In ``global`` scope a layer that the plain top-k
      would empty keeps its best-scored weight, and the lowest-ranked kept weights elsewhere make
      room for it so the total stays exactly ``k`` (skipped when ``k`` is smaller than the number of
      layers); in ``local`` scope ``k_l`` is at least 1. This changes the result only at extreme
      sparsity.
    """
    _check_keep(keep, scope)
    missing = [name for name in masks if name not in scores]
    if missing:
        raise KeyError(f"no scores for {missing}")
    names = masks.names()
    alive = [_alive_scores(scores[name], masks[name]) for name in names]
    new: dict[str, Tensor] = {}

    if scope == "local":
        for name, (idx, vals) in zip(names, alive, strict=True):
            mask = masks[name]
            k = min(len(idx), max(1 if len(idx) else 0, round(keep * mask.numel())))
            flat = torch.zeros(mask.numel(), dtype=torch.bool, device=mask.device)
            flat[idx[_top_mask(vals, k)]] = True
            new[name] = flat.view(mask.shape)
        return Masks(new)

    counts = [len(idx) for idx, _ in alive]
    k = round(keep * masks.total())
    if k >= sum(counts):
        return masks.clone()

    vals = torch.cat([v for _, v in alive])
    kept = _top_mask(vals, k)
    live = [i for i, c in enumerate(counts) if c > 0]
    if k >= len(live):
        per_layer = torch.stack([seg.sum() for seg in torch.split(kept, counts)]).tolist()
        if any(per_layer[i] == 0 for i in live):
            # Lift every live layer's best weight (argmax takes the first maximum, as the selection
            # does) above all scores and select again: a layer that kept weights keeps its best one
            # anyway, so only the emptied layers gain a weight, and the k-th best weights make room.
            starts = [0]
            for c in counts[:-1]:
                starts.append(starts[-1] + c)
            best = torch.tensor([starts[i] + int(alive[i][1].argmax()) for i in live], device=vals.device)
            lifted = vals.clone()
            lifted[best] = math.inf
            kept = _top_mask(lifted, k)

    for name, (idx, _), seg in zip(names, alive, torch.split(kept, counts), strict=True):
        mask = masks[name]
        flat = torch.zeros(mask.numel(), dtype=torch.bool, device=mask.device)
        flat[idx[seg.to(idx.device)]] = True
        new[name] = flat.view(mask.shape)
    return Masks(new)


# --------------------------------------------------------------------------------------------------
# Pruners (score functions)


def _scoring_copy(
    model: nn.Module, params: Mapping[str, Tensor], masks: Masks, *, dtype: torch.dtype | None = None
) -> tuple[nn.Module, list[Tensor]]:
    """A deep copy of ``model`` with ``masks`` applied and its prunable weights (in ``params``
    order) requiring grad; the caller's model, buffers and mode stay untouched."""
    net = copy.deepcopy(model)
    net.zero_grad(set_to_none=True)
    if dtype is not None:
        net.to(dtype)
    named = dict(net.named_parameters())
    missing = [name for name in params if name not in named]
    if missing:
        raise KeyError(f"prunable parameters {missing} are not parameters of the model")
    weights: list[Tensor] = [named[name] for name in params]
    with torch.no_grad():
        for name, w in zip(params, weights, strict=True):
            w.mul_(masks[name].to(device=w.device, dtype=w.dtype))
    for w in weights:
        w.requires_grad_(True)
    return net, weights


def _device_of(weights: Sequence[Tensor]) -> torch.device:
    return weights[0].device if weights else torch.device("cpu")


def _need_batches(batches: Sequence[Batch], pruner: str) -> None:
    if not batches:
        raise ValueError(f"pruner {pruner!r} needs at least one scoring batch")


def _mean_loss_grads(
    net: nn.Module,
    weights: Sequence[Tensor],
    batches: Sequence[Batch],
    *,
    temperature: float = 1.0,
    create_graph: bool = False,
) -> Iterator[tuple[Tensor, ...]]:
    """Per batch, the gradient of that batch's share of the mean cross-entropy over all scoring
    samples: the per-batch gradients add up to the gradient of the mean loss."""
    device = _device_of(weights)
    n_total = sum(len(y) for _, y in batches)
    for x, y in batches:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        logits = net(x) / temperature
        loss = F.cross_entropy(logits, y, reduction="sum") / n_total
        grads = torch.autograd.grad(loss, weights, create_graph=create_graph, allow_unused=True)
        # A weight that does not reach the loss has gradient zero, not None.
        yield tuple(torch.zeros_like(w) if g is None else g for g, w in zip(grads, weights, strict=True))


@register_pruner("snip")
def snip_scores(
    model: nn.Module, params: Mapping[str, nn.Parameter], masks: Masks, batches: Sequence[Batch], *, seed: int
) -> dict[str, Tensor]:
    """SNIP (Lee et al. 2019): ``|dL/dw * w|``, the loss change from removing each weight to first
    order, with L the mean cross-entropy over the scoring batches, model in train mode."""
    del seed  # deterministic given the batches
    _need_batches(batches, "snip")
    net, weights = _scoring_copy(model, params, masks)
    net.train()
    total = [torch.zeros_like(w) for w in weights]
    for grads in _mean_loss_grads(net, weights, batches):
        torch._foreach_add_(total, [g.detach() for g in grads])
    return {name: (g * w.detach()).abs() for name, g, w in zip(params, total, weights, strict=True)}


@register_pruner("magnitude")
def magnitude_scores(
    model: nn.Module, params: Mapping[str, nn.Parameter], masks: Masks, batches: Sequence[Batch], *, seed: int
) -> dict[str, Tensor]:
    """``|w|``."""
    del model, masks, batches, seed
    return {name: p.detach().abs() for name, p in params.items()}


@register_pruner("random")
def random_scores(
    model: nn.Module, params: Mapping[str, nn.Parameter], masks: Masks, batches: Sequence[Batch], *, seed: int
) -> dict[str, Tensor]:
    """Uniform scores from a CPU generator seeded with ``seed`` (the same on every device; the
    global RNG is never touched)."""
    del model, masks, batches
    gen = torch.Generator(device="cpu").manual_seed(seed)
    return {
        name: torch.rand(p.shape, generator=gen, dtype=torch.float32).to(p.device) for name, p in params.items()
    }


@register_pruner("grasp")
def grasp_scores(
    model: nn.Module, params: Mapping[str, nn.Parameter], masks: Masks, batches: Sequence[Batch], *, seed: int
) -> dict[str, Tensor]:
    """GraSP (Wang et al. 2020), as a keep score: ``w * Hg``.

    ``g`` is the gradient of the mean loss over the scoring batches (logits divided by
    :data:`GRASP_TEMPERATURE`), ``Hg`` the Hessian-gradient product, computed per batch as the
    gradient of ``g_const . grad(L_b)`` (double backward). GraSP's own score is
    ``S = -w * Hg`` and it *removes* the weights with the largest ``S`` (reference code: kept where
    ``S <= threshold``), i.e. it keeps the largest ``w * Hg``; with our "higher = keep" convention
    the score is therefore ``-S = w * Hg``. Model in train mode, as in the reference.
    """
    del seed
    _need_batches(batches, "grasp")
    net, weights = _scoring_copy(model, params, masks)
    net.train()
    g = [torch.zeros_like(w) for w in weights]
    for grads in _mean_loss_grads(net, weights, batches, temperature=GRASP_TEMPERATURE):
        torch._foreach_add_(g, [gi.detach() for gi in grads])
    hg = [torch.zeros_like(w) for w in weights]
    for grads in _mean_loss_grads(net, weights, batches, temperature=GRASP_TEMPERATURE, create_graph=True):
        z = cast(Tensor, sum((gi * grad).sum() for gi, grad in zip(g, grads, strict=True)))
        # Weights that do not reach the loss (or a purely linear path) give no second-order term.
        hvp = torch.autograd.grad(z, weights, allow_unused=True)
        torch._foreach_add_(hg, [torch.zeros_like(w) if h is None else h for h, w in zip(hvp, weights, strict=True)])
    return {name: w.detach() * h for name, w, h in zip(params, weights, hg, strict=True)}


def _inject_ones_at_first(net: nn.Module, params: Mapping[str, Tensor]) -> Callable[[], None]:
    """Make the first prunable layer to run see an all-ones input; returns the hook remover.

    Our models normalise their own input, ``(x - mean) / std``; fed all-ones, that can be negative
    (features with a mean above 1), and an all-positive first layer then maps it to zero after the
    ReLU and every score vanishes. SynFlow's all-ones signal is meant for the network proper, which
    starts at the first prunable layer, so the signal is injected there.
    """
    owners = {name.rpartition(".")[0] for name in params}
    fired = False

    def hook(_module: nn.Module, args: tuple[object, ...]) -> tuple[object, ...] | None:
        nonlocal fired
        if fired or not args or not isinstance(args[0], Tensor):
            return None
        fired = True
        return (torch.ones_like(args[0], dtype=torch.float64), *args[1:])

    handles = [net.get_submodule(owner).register_forward_pre_hook(hook) for owner in sorted(owners)]

    def remove() -> None:
        for handle in handles:
            handle.remove()

    return remove


@register_pruner("synflow", iterative=True)
def synflow_scores(
    model: nn.Module, params: Mapping[str, nn.Parameter], masks: Masks, batches: Sequence[Batch], *, seed: int
) -> dict[str, Tensor]:
    """One round of SynFlow (Tanaka et al. 2020): ``|w * dR/dw|`` with the synaptic flow
    ``R = 1^T |W_L| ... |W_1| 1``, data-free.

    On a float64 copy (products of hundreds of weights overflow float32) every parameter and
    buffer is replaced by its absolute value (masked weights stay 0), BatchNorm runs in eval mode,
    and the input is all ones of one sample's shape (taken from the first batch; see
    :func:`_inject_ones_at_first`). :func:`prune` calls this repeatedly (``iterations`` rounds).
    """
    del seed
    _need_batches(batches, "synflow")
    net, weights = _scoring_copy(model, params, masks, dtype=torch.float64)
    net.eval()
    with torch.no_grad():
        for t in net.state_dict().values():
            if t.is_floating_point():
                t.abs_()
    x = torch.ones((1, *batches[0][0].shape[1:]), dtype=torch.float64, device=_device_of(weights))
    remove = _inject_ones_at_first(net, params)
    try:
        flow = net(x).sum()
    finally:
        remove()
    grads = torch.autograd.grad(flow, weights, allow_unused=True)
    return {
        name: torch.zeros_like(w) if g is None else (g * w).detach().abs()
        for name, g, w in zip(params, grads, weights, strict=True)
    }


# --------------------------------------------------------------------------------------------------
# Pruning = score -> select -> apply


def prune(
    model: nn.Module,
    params: Mapping[str, nn.Parameter],
    masks: Masks,
    *,
    pruner: str,
    keep: float,
    scope: str = "global",
    batches: Sequence[Batch] = (),
    seed: int = 0,
    iterations: int = 100,
) -> Masks:
    """Prune ``params`` (the prunable weights of ``model``) to density ``keep`` and return the masks.

    One-shot pruners score once and select. Iterative pruners (``synflow``) run ``iterations``
    rounds of score -> select, the density falling exponentially from the current one to ``keep``
    (round ``i`` of ``n`` keeps ``d0 * (keep / d0) ** (i / n)``); each round scores the network as
    masked by the previous round. The new masks are applied to the model in place.
    """
    if pruner not in PRUNERS:
        raise ValueError(f"unknown pruner {pruner!r}; expected one of {', '.join(PRUNERS)}")
    _check_keep(keep, scope)
    if iterations < 1:
        raise ValueError(f"iterations must be at least 1, got {iterations}")
    score = PRUNERS[pruner]
    start = masks.density()
    if keep >= start and scope == "global":
        new = masks.clone()
    elif pruner in ITERATIVE_PRUNERS and start > 0:
        new = masks
        for i in range(1, iterations + 1):
            step_keep = keep if i == iterations else start * (keep / start) ** (i / iterations)
            new = select_masks(score(model, params, new, batches, seed=seed), new, step_keep, scope)
    else:
        new = select_masks(score(model, params, masks, batches, seed=seed), masks, keep, scope)
    new.apply_(params)
    log.info(
        "pruned with %s (%s): density %.4f -> %.4f (target %.4f)", pruner, scope, start, new.density(), keep
    )
    if keep < start and not math.isclose(new.density(), keep, abs_tol=len(new) / max(new.total(), 1)):
        log.warning("density %.6f is off the target %.6f by more than one weight per layer", new.density(), keep)
    return new
