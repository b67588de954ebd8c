"""Merge methods as pure tensor functions (the semantics pinned in the README's Merging section).

Every method maps deltas τ₁…τₙ of one tensor (expert − base) to one merged delta τ; the merged
weight is θ₀ + τ. A method is a sparsifier applied to each delta (none, trim, dare, breadcrumbs,
della) followed by a combiner (weighted sum or TIES sign vote), or one of the special methods
(model_stock, slerp). Maths runs in float32; the functions here never do I/O. Their parameters
come in one `merge.params.MergeParams`; each registry entry declares those it takes.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from langmerge.errors import ConfigError
from langmerge.merge.params import PARAMETERS, MergeParams, Rescale, listed


def generator(seed: int, name: str, index: int) -> torch.Generator:
    """A CPU generator keyed by (seed, tensor name, expert index): order-independent randomness."""
    digest = hashlib.blake2b(f"{seed}\0{name}\0{index}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))


# ---------------------------------------------------------------------------------------------
# Sparsifiers: one delta in, one delta out. They may overwrite their input.


CHUNK = 1 << 19  # elements per slice in the elementwise passes: a few slices fit in cache


def _kth_largest(x: Tensor, k: int, absolute: bool = False) -> tuple[Tensor, int, int]:
    """The k-th largest value v of flat `x` (of |x| if `absolute`), and the counts of entries
    above v and at or above v (they differ when several entries equal v).

    Exact, in linear time: quantiles of a sample bracket v, one pass over `x` in cache-sized
    slices counts the entries above the bracket and collects those inside it, and a selection
    inside the (small) bracket finishes the job. A sort would be O(n log n).
    """
    n = x.numel()
    key = torch.abs if absolute else (lambda t: t)
    if n > 1 << 17:
        m = min(1 << 16, n >> 5)  # sample size: the bracket holds ~8/√m of the entries
        idx = torch.randint(n, (m,), generator=torch.Generator().manual_seed(0))
        sample = key(x[idx])
        q = (n - k) / n
        half = 4.0 * math.sqrt(q * (1.0 - q) / m) + 2.0 / m
        lo_i, hi_i = int((q - half) * m), math.ceil((q + half) * m)
        inf = torch.tensor(math.inf)
        lo = torch.kthvalue(sample, lo_i + 1).values if lo_i >= 0 else -inf
        hi = torch.kthvalue(sample, hi_i + 1).values if hi_i < m else inf
        above_lo = above_hi = 0
        parts = []
        for s in range(0, n, CHUNK):
            a = key(x[s : s + CHUNK])
            gt_lo, le_hi = a > lo, a <= hi
            above_lo += int(torch.count_nonzero(gt_lo))
            above_hi += a.numel() - int(torch.count_nonzero(le_hi))
            parts.append(a[gt_lo.logical_and_(le_hi)])
        if above_hi < k <= above_lo:
            band = torch.cat(parts)
            v = torch.kthvalue(band, band.numel() - (k - above_hi) + 1).values
            return (
                v,
                above_hi + int(torch.count_nonzero(band > v)),
                above_hi + int(torch.count_nonzero(band >= v)),
            )
    # small tensors, or the sample missed the answer (rare): select directly
    a = key(x)
    v = torch.kthvalue(a, n - k + 1).values
    return v, int(torch.count_nonzero(a > v)), int(torch.count_nonzero(a >= v))


def topk_mask(a: Tensor, k: int) -> Tensor:
    """Boolean mask of exactly k entries of largest value in `a` (ties broken by lowest index)."""
    flat = a.reshape(-1)
    if k >= flat.numel():
        return torch.ones_like(a, dtype=torch.bool)
    v, above, reached = _kth_largest(flat, k)
    if reached == k:
        return (flat >= v).view(a.shape)
    mask = flat > v
    mask[(flat == v).nonzero().flatten()[: k - above]] = True
    return mask.view(a.shape)


def trim(tau: Tensor, density: float) -> Tensor:
    """Keep exactly max(1, int(d·numel)) entries of largest |τ|; zero the rest."""
    if density >= 1.0:
        return tau
    k = max(1, int(density * tau.numel()))
    return tau.mul_(topk_mask(tau.abs(), k))


def dare(tau: Tensor, density: float, gen: torch.Generator, rescale: Rescale = "density") -> Tensor:
    """Keep each entry with probability d (Bernoulli from `gen`); rescale the kept entries:
    divide them by d (`density`), or scale them to the original L1 norm (`l1`), or not (`none`).
    """
    if density >= 1.0:
        return tau
    flat = tau.reshape(-1)
    sliced = _SlicedDare(flat, density, gen, rescale)
    for s in range(0, flat.numel(), CHUNK):
        sliced(flat[s : s + CHUNK])
    return tau


class _SlicedDare:
    """dare(τ, d) slice by slice, the mask drawn from `gen` one slice at a time (so the whole
    tensor and its slices get the same draws). The L1 rescale needs the kept norm first: one
    pass draws the masks to measure it, then the generator is rewound."""

    def __init__(self, flat: Tensor, density: float, gen: torch.Generator, rescale: Rescale):
        self.density, self.gen, self.rescale, self.scale = density, gen, rescale, 1.0
        if rescale == "l1":
            state = gen.get_state()
            kept = 0.0
            for s in range(0, flat.numel(), CHUNK):
                part = flat[s : s + CHUNK]
                keep = torch.rand(part.shape, generator=gen) < density
                kept += float(part.abs().mul_(keep).sum(dtype=torch.float64))
            gen.set_state(state)
            total = float(flat.abs().sum(dtype=torch.float64))
            self.scale = total / kept if kept > 0 else 1.0

    def __call__(self, part: Tensor) -> Tensor:
        part.mul_(torch.rand(part.shape, generator=self.gen) < self.density)
        if self.rescale == "density":
            return part.div_(self.density)
        return part.mul_(self.scale) if self.rescale == "l1" else part


def breadcrumbs(tau: Tensor, density: float, gamma: float) -> Tensor:
    """Drop the int(γ·numel) largest |τ| (outliers), keep the next int(d·numel), zero the rest.

    At d ≥ 1 nothing is dropped (as for trim and DARE, and as mergekit does)."""
    n = tau.numel()
    skip = int(gamma * n)
    keep = min(max(1, int(density * n)), n - skip)
    if density >= 1.0 or (skip == 0 and keep == n):
        return tau
    a = tau.abs()
    mask = topk_mask(a, skip + keep)
    if skip:
        mask &= ~topk_mask(a, skip)
    return tau.mul_(mask)


def della(
    tau: Tensor, density: float, epsilon: float, gen: torch.Generator, rescale: Rescale = "density"
) -> Tensor:
    """Per row, keep entry j with p = (d − ε) + 2ε·r̂ⱼ (r̂: magnitude rank in [0, 1]); divide the
    kept entries by p (`rescale="l1"`: match the L1 norm instead, as mergekit). No-op at d ≥ 1.

    Rows are processed a block at a time (the ranking needs two argsorts of int64 indices)."""
    if density >= 1.0 or tau.numel() == 0:
        return tau
    rows = tau.reshape(1, -1) if tau.dim() < 2 else tau.reshape(tau.shape[0], -1)
    cols = rows.shape[1]
    out = torch.empty_like(rows)
    step = max(1, CHUNK // cols)
    for r in range(0, rows.shape[0], step):
        block = rows[r : r + step]
        rank = block.abs().argsort(dim=1).argsort(dim=1).to(torch.float32)
        rank_norm = rank / (cols - 1) if cols > 1 else torch.full_like(rank, 0.5)
        p = ((density - epsilon) + 2.0 * epsilon * rank_norm).clamp_(0.0, 1.0)
        keep = torch.rand(block.shape, generator=gen) < p
        if rescale == "density":
            out[r : r + step] = torch.where(keep, block / p.clamp(min=1e-30), 0.0)
        else:
            out[r : r + step] = block * keep
    if rescale == "l1" and out.abs().sum() > 0:
        out.mul_(rows.abs().sum() / out.abs().sum())
    return out.view(tau.shape)


# ---------------------------------------------------------------------------------------------
# Combiners: sparsified deltas and weights in, merged delta out (before λ).


def weighted_sum(deltas: Sequence[Tensor], weights: Sequence[float], normalize: bool) -> Tensor:
    """Σ wᵢτᵢ, divided by Σ wᵢ when `normalize`."""
    out = torch.zeros_like(deltas[0])
    for w, tau in zip(weights, deltas, strict=True):
        out.add_(tau, alpha=w)
    if normalize:
        total = math.fsum(weights)
        if total == 0.0:
            raise ConfigError(
                f"weights {list(weights)} sum to zero; a normalized merge divides by it"
            )
        out.div_(total)
    return out


_ONE = torch.tensor(1.0)


def ties_vote(deltas: Sequence[Tensor], weights: Sequence[float], normalize: bool) -> Tensor:
    """TIES: δᵢ = wᵢτ̂ᵢ; elect s = sign(Σδᵢ) (0 → +1); mean (or sum) of the δᵢ that agree with s.

    The mean divides by the agreeing weights Σ mᵢwᵢ; an entry where that is 0 gets 0.
    """
    weighted = [tau if w == 1.0 else tau.mul_(w) for w, tau in zip(weights, deltas, strict=True)]
    total = weighted[0].clone()
    for d in weighted[1:]:
        total.add_(d)
    elected = torch.copysign(
        _ONE, total
    )  # ±1; only all-zero entries can be −0, and they vote for nothing
    num = torch.zeros_like(total)
    div = torch.zeros_like(total) if normalize else None
    for w, d in zip(weights, weighted, strict=True):
        aligned = d * elected  # > 0 exactly where δᵢ is non-zero and agrees with the vote
        if div is not None:
            div.add_(aligned > 0, alpha=w)
        num.add_(aligned.clamp_(min=0.0))
    num.mul_(elected)
    if div is None:
        return num
    if all(w > 0 for w in weights):  # then div == 0 only where num == 0
        return num.div_(div.clamp_(min=torch.finfo(torch.float32).tiny))
    return torch.where(div != 0, num / torch.where(div != 0, div, 1.0), 0.0)


class _SlicedTrim:
    """trim(τ, d) applied slice by slice: keep |τ| ≥ v, and of the entries equal to v only as
    many (the first ones) as exactly k kept entries allow."""

    def __init__(self, flat: Tensor, k: int):
        self.v, above, reached = _kth_largest(flat, k, absolute=True)
        self.ties_left = None if reached == k else k - above

    def __call__(self, part: Tensor) -> Tensor:
        a = part.abs()
        if self.ties_left is None:
            return part.mul_(a >= self.v)
        keep = a > self.v
        if self.ties_left:
            equal = (a == self.v).nonzero().flatten()[: self.ties_left]
            keep[equal] = True
            self.ties_left -= equal.numel()
        return part.mul_(keep)


def _merge_elementwise(
    method: Method, deltas: list[Tensor], weights: Sequence[float], params: MergeParams, name: str
) -> Tensor:
    """trim, DARE or nothing, then ties/sum, slice by slice so the work stays in cache.

    Gives exactly what sparsifying whole tensors and then combining them gives: the threshold of
    each trim is found first, DARE masks are drawn in the same order, and the slices are visited
    in order.
    """
    normalize = method.normalize if params.normalize is None else params.normalize
    combine = ties_vote if method.combine == "ties" else weighted_sum
    flat = [d.reshape(-1) for d in deltas]
    n = flat[0].numel()
    sparsifiers: list[Callable[[Tensor], Tensor] | None] = []
    for i, f in enumerate(flat):
        d = params.density_of(i)
        k = max(1, int(d * n))
        if method.sparsify == "trim" and k < n:
            sparsifiers.append(_SlicedTrim(f, k))
        elif method.sparsify == "dare" and d < 1.0:
            sparsifiers.append(_SlicedDare(f, d, generator(params.seed, name, i), params.rescale))
        else:
            sparsifiers.append(None)
    out = torch.empty_like(flat[0])
    for s in range(0, n, CHUNK):
        part = [f[s : s + CHUNK] for f in flat]
        part = [p if t is None else t(p) for p, t in zip(part, sparsifiers, strict=True)]
        out[s : s + CHUNK] = combine(part, weights, normalize)
    return out.view(deltas[0].shape)


# ---------------------------------------------------------------------------------------------
# Special methods.


def model_stock(deltas: Sequence[Tensor]) -> Tensor:
    """t·mean(τᵢ) with c the mean pairwise cosine and t = N·c / (1 + (N − 1)·c).

    The Gram matrix of the deltas is accumulated slice by slice in float64, so memory stays at
    the inputs plus one output tensor."""
    n = len(deltas)
    flat = [tau.reshape(-1) for tau in deltas]
    gram = torch.zeros(n, n, dtype=torch.float64)
    for s in range(0, flat[0].numel(), CHUNK):
        block = torch.stack([f[s : s + CHUNK] for f in flat]).double()
        gram += block @ block.T
    norms = gram.diagonal().sqrt().tolist()
    cosines = [
        float(gram[i, j]) / (norms[i] * norms[j]) if norms[i] * norms[j] > 0 else 0.0
        for i in range(n)
        for j in range(i + 1, n)
    ]
    c = min(1.0, max(-1.0, sum(cosines) / len(cosines)))
    denom = 1.0 + (n - 1) * c
    t = n * c / denom if abs(denom) > 1e-12 else 0.0
    out = deltas[0].clone()
    for tau in deltas[1:]:
        out.add_(tau)
    return out.mul_(t / n)


def slerp(a: Tensor, b: Tensor, t: float, threshold: float = 0.9995) -> Tensor:
    """Spherical interpolation of two weight tensors; linear when they are nearly parallel."""
    na, nb = float(a.double().norm()), float(b.double().norm())
    dot = float(a.reshape(-1).double() @ b.reshape(-1).double()) / (na * nb) if na * nb else 1.0
    dot = min(1.0, max(-1.0, dot))
    if abs(dot) > threshold:
        return torch.lerp(a, b, t)
    theta = math.acos(dot)
    s = math.sin(theta)
    return a * (math.sin((1.0 - t) * theta) / s) + b * (math.sin(t * theta) / s)


# ---------------------------------------------------------------------------------------------
# The registry.

Sparsify = Literal["none", "trim", "dare", "breadcrumbs", "della"]


# What the sum and TIES combiners read: λ scales the merged delta, `normalize` divides by the
# weights.
SUM = ("lam", "normalize")


def takes(*names: str) -> frozenset[str]:
    """The parameters a method takes, by their names in `merge.params.PARAMETERS`."""
    return frozenset(names)


@dataclass(frozen=True)
class Method:
    """One entry of the registry: how a method sparsifies and combines, and which parameters it
    takes (`params`, names of `merge.params.PARAMETERS`; a merge config that sets another one
    is refused, see `check_params`)."""

    name: str
    summary: str
    sparsify: Sparsify = "none"
    combine: Literal["sum", "ties", "model_stock", "slerp", "regmean"] = "sum"
    normalize: bool = False  # default for `normalize` when the merge does not set it
    knots: bool = False  # LoRA-only: merge in the KnOTS-aligned basis (see merge/lora.py)
    min_models: int = 1
    max_models: int | None = None
    uses_weights: bool = True
    aliases: tuple[str, ...] = field(default=())
    data_aware: bool = False  # needs each expert's input statistics (see merge/regmean.py)
    params: frozenset[str] = field(kw_only=True)

    def __post_init__(self) -> None:
        unknown = self.params - PARAMETERS.keys()
        if unknown:
            raise ValueError(f"method {self.name}: unknown parameters {sorted(unknown)}")

    @property
    def random(self) -> bool:
        return self.sparsify in ("dare", "della")


METHODS: dict[str, Method] = {
    m.name: m
    for m in [
        Method("linear", "Σ wᵢτᵢ / Σ wᵢ", normalize=True, params=takes(*SUM)),
        Method("task_arithmetic", "λ · Σ wᵢτᵢ", params=takes(*SUM)),
        Method(
            "magnitude_prune",
            "λ · Σ wᵢ·trim(τᵢ, d)",
            sparsify="trim",
            params=takes("density", *SUM),
        ),
        Method(
            "ties",
            "trim, sign vote, disjoint mean",
            "trim",
            "ties",
            normalize=True,
            params=takes("density", *SUM),
        ),
        Method(
            "dare_ties",
            "DARE drop-and-rescale, sign vote, disjoint mean",
            "dare",
            "ties",
            True,
            params=takes("density", "seed", "rescale", *SUM),
        ),
        Method(
            "dare_linear",
            "λ · Σ wᵢ·dare(τᵢ, d)",
            sparsify="dare",
            params=takes("density", "seed", "rescale", *SUM),
        ),
        Method(
            "breadcrumbs",
            "drop outliers and small entries, sum",
            sparsify="breadcrumbs",
            params=takes("density", "gamma", *SUM),
        ),
        Method(
            "breadcrumbs_ties",
            "breadcrumbs, sign vote, disjoint mean",
            "breadcrumbs",
            "ties",
            True,
            params=takes("density", "gamma", *SUM),
        ),
        Method(
            "della",
            "magnitude-ranked random drop, sum",
            sparsify="della",
            params=takes("density", "epsilon", "seed", "rescale", *SUM),
        ),
        Method(
            "della_ties",
            "magnitude-ranked random drop, sign vote",
            "della",
            "ties",
            True,
            params=takes("density", "epsilon", "seed", "rescale", *SUM),
        ),
        Method(
            "knots_ties",
            "TIES in the KnOTS SVD basis (LoRA)",
            "trim",
            "ties",
            True,
            knots=True,
            params=takes("density", *SUM),
        ),
        Method(
            "knots_dare_ties",
            "DARE-TIES in the KnOTS basis (LoRA)",
            "dare",
            "ties",
            True,
            True,
            params=takes("density", "seed", "rescale", *SUM),
        ),
        Method(
            "regmean",
            "least squares on each expert's input Gram matrices (data-aware; linear maps)",
            combine="regmean",
            data_aware=True,
            params=takes("alpha", "fallback", "lam"),  # and what its fallback takes
        ),
        Method(
            "model_stock",
            "t · mean(τᵢ), t from the pairwise cosine",
            combine="model_stock",
            min_models=2,
            uses_weights=False,
            params=takes("lam"),
        ),
        Method(
            "slerp",
            "spherical interpolation of two models at t",
            combine="slerp",
            min_models=2,
            max_models=2,
            uses_weights=False,
            params=takes("t"),
        ),
    ]
}


def get_method(name: str) -> Method:
    """The registry entry for `name`, or an error that lists the valid names."""
    try:
        return METHODS[name]
    except KeyError:
        raise ConfigError(
            f"unknown merge method {name!r}; valid methods: {', '.join(sorted(METHODS))}"
        ) from None


def parameters_of(method: Method, fallback: Method | None = None) -> frozenset[str]:
    """The parameters a merge with `method` takes: its own, and for a data-aware method those of
    its `fallback` (the method for the other tensors)."""
    return method.params | (fallback.params if method.data_aware and fallback else frozenset())


def check_params(method: Method, given: Iterable[str], fallback: Method | None = None) -> None:
    """An error naming the parameters in `given` that `method` does not take, and those it does."""
    takes = parameters_of(method, fallback)
    unused = set(given) - takes
    if unused:
        via = f" with fallback {fallback.name}" if method.data_aware and fallback else ""
        them = "it" if len(unused) == 1 else "them"
        raise ConfigError(
            f"{method.name}{via} does not use {listed(unused)} (it takes {listed(takes)}): "
            f"remove {them}, or choose a method that uses {them}"
        )


def check_inputs(method: Method, n_models: int, weights: Sequence[float] | None) -> None:
    """Errors for a model count or weights the method cannot use."""
    if n_models < method.min_models:
        raise ConfigError(
            f"{method.name} needs at least {method.min_models} experts, got {n_models}"
        )
    if method.max_models is not None and n_models > method.max_models:
        raise ConfigError(
            f"{method.name} takes exactly {method.max_models} experts, got {n_models}"
        )
    if weights is not None:
        if len(weights) != n_models:
            raise ConfigError(f"got {len(weights)} weights for {n_models} experts")
        if not all(math.isfinite(w) for w in weights):
            raise ConfigError(f"weights must be finite numbers, got {list(weights)}")
        if not method.uses_weights and any(w != 1.0 for w in weights):
            raise ConfigError(f"{method.name} does not use weights; remove them")
        if all(w == 0.0 for w in weights):
            raise ConfigError(
                "every weight is 0, so the merge would be the base model: give at least one "
                "expert a nonzero weight"
            )


def sparsify(method: Method, tau: Tensor, i: int, params: MergeParams, name: str) -> Tensor:
    """Apply the method's sparsifier to delta number `i` of tensor `name` (may overwrite `tau`).

    The whole-tensor definition; `merge_tensor` applies trim and DARE slice by slice instead,
    with the same result (tests hold the two together)."""
    d = params.density_of(i)
    if method.sparsify == "trim":
        return trim(tau, d)
    if method.sparsify == "dare":
        return dare(tau, d, generator(params.seed, name, i), params.rescale)
    if method.sparsify == "breadcrumbs":
        return breadcrumbs(tau, d, params.gamma)
    if method.sparsify == "della":
        return della(tau, d, params.epsilon, generator(params.seed, name, i), params.rescale)
    return tau


def merge_tensor(
    method: Method,
    deltas: list[Tensor],
    weights: Sequence[float],
    params: MergeParams,
    name: str = "",
    base: Tensor | None = None,
) -> Tensor:
    """Merge float32 deltas of one tensor. Overwrites `deltas` (callers pass tensors they own)."""
    if method.combine == "slerp":
        if base is None:
            raise ConfigError("slerp interpolates weights: it needs the base tensor")
        return slerp(base + deltas[0], base + deltas[1], params.t).sub_(base)
    if method.combine == "model_stock":
        return model_stock(deltas).mul_(params.lam)
    if method.sparsify in ("none", "trim", "dare"):
        out = _merge_elementwise(method, deltas, weights, params, name)
    else:
        sparse = [sparsify(method, tau, i, params, name) for i, tau in enumerate(deltas)]
        normalize = method.normalize if params.normalize is None else params.normalize
        combine: Callable[..., Tensor] = ties_vote if method.combine == "ties" else weighted_sum
        out = combine(sparse, weights, normalize)
    return out if params.lam == 1.0 else out.mul_(params.lam)


def merge_deltas(
    method: str,
    deltas: Sequence[Tensor],
    *,
    weights: Sequence[float] | None = None,
    density: float | Sequence[float] = 1.0,
    lam: float = 1.0,
    seed: int = 0,
    normalize: bool | None = None,
    gamma: float = 0.01,
    epsilon: float = 0.15,
    t: float = 0.5,
    rescale: Rescale = "density",
    base: Tensor | None = None,
    name: str = "",
) -> Tensor:
    """Merge the deltas of one tensor with `method`; returns the merged delta in float32.

    `name` keys the random methods' generator together with `seed`, so a tensor's result does
    not depend on which other tensors were merged before it. `base` is needed by slerp only.
    """
    m = get_method(method)
    if m.knots:
        raise ConfigError(f"{method} merges LoRA factors: call merge_lora with (B, A) pairs")
    if m.data_aware:
        raise ConfigError(f"{method} needs Gram matrices: call merge.regmean.regmean")
    if not deltas:
        raise ConfigError("no deltas to merge")
    check_inputs(m, len(deltas), weights)
    shapes = {tuple(tau.shape) for tau in deltas}
    if len(shapes) > 1:
        raise ConfigError(f"deltas have different shapes: {sorted(shapes)}")
    params = MergeParams.from_settings(
        len(deltas),
        density=density,
        lam=lam,
        normalize=normalize,
        gamma=gamma,
        epsilon=epsilon,
        t=t,
        rescale=rescale,
        seed=seed,
    )
    owned = [tau.detach().to(torch.float32, copy=True) for tau in deltas]
    base32 = base.detach().to(torch.float32) if base is not None else None
    w = list(weights) if weights is not None else [1.0] * len(deltas)
    return merge_tensor(m, owned, w, params, name, base32)
