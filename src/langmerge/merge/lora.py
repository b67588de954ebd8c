"""Merging LoRA experts module by module: exact ΔW, factored KnOTS, re-factorisation to LoRA.

A LoRA expert's update of one module is ΔW = s·B·A (B: out×r, A: r×in, s = α/r). The default
space merges the exact ΔWᵢ with the methods of `methods.py`. KnOTS aligns the experts in the SVD
basis of their concatenation, computed from the factors (QR + SVD of a small core) without ever
forming the dense concatenation. `space: factors` reproduces PEFT's `add_weighted_adapter`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from langmerge.errors import ConfigError, InputError
from langmerge.merge.methods import (
    MergeParams,
    Method,
    Rescale,
    check_inputs,
    generator,
    get_method,
    merge_tensor,
    topk_mask,
)
from langmerge.merge.params import check_density

Factors = tuple[Tensor, Tensor]  # (B, A)
POWER_ITERS = 1  # of the randomized truncated SVD: within a few % of the best error, see bench/


@dataclass
class LoraUpdate:
    """A merged update in LoRA form: ΔW ≈ B @ A, with the relative error of the approximation
    and the Frobenius norm of the exact merged ΔW."""

    B: Tensor
    A: Tensor
    rel_error: float
    norm: float

    @property
    def rank(self) -> int:
        return self.A.shape[0]


def _check_factors(factors: Sequence[Factors], scalings: Sequence[float] | None) -> list[float]:
    if not factors:
        raise ConfigError("no LoRA factors to merge")
    shapes = {(B.shape[0], A.shape[1]) for B, A in factors}
    if len(shapes) > 1:
        raise InputError(f"LoRA experts update modules of different shapes: {sorted(shapes)}")
    for i, (B, A) in enumerate(factors):
        if B.dim() != 2 or A.dim() != 2 or B.shape[1] != A.shape[0]:
            raise InputError(
                f"expert {i}: B {tuple(B.shape)} and A {tuple(A.shape)} are not LoRA factors "
                "(need B: out×r, A: r×in)"
            )
    s = list(scalings) if scalings is not None else [1.0] * len(factors)
    if len(s) != len(factors):
        raise ConfigError(f"got {len(s)} scalings for {len(factors)} experts")
    return s


def _params(
    method: Method, n: int, weights: Sequence[float] | None, **settings: Any
) -> tuple[list[float], MergeParams]:
    check_inputs(method, n, weights)
    w = list(weights) if weights is not None else [1.0] * n
    return w, MergeParams.from_settings(n, **settings)


def knots_basis(
    factors: Sequence[Factors], scalings: Sequence[float]
) -> tuple[Tensor, Tensor, list[Tensor]]:
    """U, Σ and the per-expert blocks Vᵢᵀ of the SVD of [s₁B₁A₁ … sₙBₙAₙ], from the factors.

    [ΔW₁ … ΔWₙ] = B_cat · blockdiag(Aᵢ) with B_cat = [s₁B₁ … sₙBₙ]. With B_cat = Q·R and
    Aᵢᵀ = Qᵢ·Rᵢ, it equals Q · (R · blockdiag(Rᵢᵀ)) · blockdiag(Qᵢᵀ): the SVD of the small core
    gives the SVD of the concatenation, truncated to its rank bound ≤ Σ rᵢ. In float64: the
    singular vectors of nearby singular values are sensitive, and TIES acts on their entries.
    """
    b_cat = torch.cat([s * B.double() for s, (B, _) in zip(scalings, factors, strict=True)], 1)
    q_b, r_b = torch.linalg.qr(b_cat)
    blocks, q_as, col = [], [], 0
    for B, A in factors:
        q_a, r_a = torch.linalg.qr(A.double().T)
        blocks.append(r_b[:, col : col + B.shape[1]] @ r_a.T)
        q_as.append(q_a)
        col += B.shape[1]
    u_k, sigma, vh_k = torch.linalg.svd(torch.cat(blocks, dim=1), full_matrices=False)
    v_blocks, col = [], 0
    for q_a in q_as:
        v_blocks.append((vh_k[:, col : col + q_a.shape[1]] @ q_a.T).float())
        col += q_a.shape[1]
    return (q_b @ u_k).float(), sigma.float(), v_blocks


def _knots(
    method: Method, factors, scalings, w, params: MergeParams, name: str
) -> tuple[Tensor, Tensor]:
    """(U·Σ, V_mergedᵀ): the KnOTS merge in factored form."""
    u, sigma, v_blocks = knots_basis(factors, scalings)
    v_merged = merge_tensor(method, v_blocks, w, params, f"{name}#knots")
    return u * sigma, v_merged


def merge_lora(
    method: str,
    factors: Sequence[Factors],
    *,
    scalings: Sequence[float] | None = None,
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
    """Merge LoRA experts of one module; returns the dense merged ΔW (float32, out×in).

    Each expert is a (B, A) pair with scaling sᵢ (α/r), so ΔWᵢ = sᵢ·Bᵢ·Aᵢ exactly. KnOTS
    methods work on the factors; every other method merges the exact ΔWᵢ.
    """
    m = get_method(method)
    if m.data_aware:
        raise ConfigError(f"{method} needs Gram matrices: call merge.regmean.regmean_lora")
    s = _check_factors(factors, scalings)
    w, params = _params(
        m,
        len(factors),
        weights,
        density=density,
        lam=lam,
        seed=seed,
        normalize=normalize,
        gamma=gamma,
        epsilon=epsilon,
        t=t,
        rescale=rescale,
    )
    if m.knots:
        us, v = _knots(m, factors, s, w, params, name)
        return us @ v
    deltas = [(si * B.float()) @ A.float() for si, (B, A) in zip(s, factors, strict=True)]
    return merge_tensor(m, deltas, w, params, name, None if base is None else base.float())


def product_norm(B: Tensor, A: Tensor) -> float:
    """‖B·A‖_F from the small Gram matrices: ‖BA‖² = trace((BᵀB)(AAᵀ))."""
    gram = (B.double().T @ B.double()) * (A.double() @ A.double().T)
    return math.sqrt(max(0.0, float(gram.sum())))


def exact(B: Tensor, A: Tensor, rank: int) -> LoraUpdate:
    """B·A as a LoRA of rank `rank`: zero-padded when it fits, else its best truncation."""
    if B.shape[1] > rank:
        return factor_product(B, A, rank)
    return _pad(LoraUpdate(B, A, 0.0, product_norm(B, A)), rank)


def factor_product(B: Tensor, A: Tensor, rank: int) -> LoraUpdate:
    """Best rank-`rank` LoRA of B @ A via the SVD of a small core (exact when rank ≥ its rank)."""
    q_b, r_b = torch.linalg.qr(B.double())
    q_a, r_a = torch.linalg.qr(A.double().T)
    u, sigma, vh = torch.linalg.svd(r_b @ r_a.T, full_matrices=False)
    k = min(rank, sigma.numel())
    total = float(sigma.square().sum())
    tail = float(sigma[k:].square().sum())
    new_b = (q_b @ (u[:, :k] * sigma[:k])).float()
    new_a = (vh[:k] @ q_a.T).float()
    rel = math.sqrt(tail / total) if total > 0 else 0.0
    return _pad(LoraUpdate(new_b, new_a, rel, math.sqrt(total)), rank)


def truncated_svd(
    delta: Tensor,
    rank: int,
    *,
    start: Tensor | None = None,
    oversample: int = 16,
    power_iters: int = POWER_ITERS,
) -> LoraUpdate:
    """A rank-`rank` LoRA of a dense ΔW, with its relative Frobenius error.

    Large matrices: a randomized range finder with `power_iters` power iterations (Halko,
    Martinsson and Tropp, 2011), far cheaper than a full SVD. `start` (columns spanning a guess
    of the subspace of ΔW's short side, e.g. the experts' own LoRA factors) replaces the random
    sketch, and brings the error to within a fraction of a percent of the best rank-k error.
    Matrices with a short side ≤ 1024 get the exact top singular vectors (eigendecomposition of
    the small Gram matrix). The error reported is that of the returned factors:
    ‖ΔW − B·A‖ / ‖ΔW‖ = √(‖ΔW‖² − ‖A‖²) / ‖ΔW‖, B having orthonormal columns.
    """
    d = delta.float()
    transpose = d.shape[0] > d.shape[1]
    if transpose:  # work on the wide orientation: the short side first
        d = d.T
    short, long_ = d.shape
    k = min(rank, short)
    norm = float(d.norm())
    if short <= 1024 or k + oversample >= short:
        _, vecs = torch.linalg.eigh((d @ d.T).double())
        q = vecs[:, short - k :].flip(1).float()
        coef = q.T @ d  # k × long: the best coefficients for the orthonormal basis q
    else:
        y = start.float() if start is not None else d.new_empty(short, 0)
        missing = k + oversample - y.shape[1]
        if missing > 0:
            gen = torch.Generator().manual_seed(0)
            y = torch.cat([y, d @ torch.randn(long_, missing, generator=gen)], dim=1)
        q = torch.linalg.qr(y).Q
        for _ in range(power_iters):
            q = torch.linalg.qr(d @ torch.linalg.qr(d.T @ q).Q).Q
        small = q.T @ d
        u = torch.linalg.svd(small.double(), full_matrices=False).U[:, :k].float()
        q, coef = q @ u, u.T @ small
    kept = float(coef.double().square().sum())
    err = math.sqrt(max(0.0, norm**2 - kept)) / norm if norm > 0 else 0.0
    if 0 < err < 0.03:  # the difference of squares cannot resolve small errors: measure them
        err = float((d - q @ coef).norm()) / norm
    b, a = (q, coef) if not transpose else (coef.T, q.T)
    return _pad(LoraUpdate(b.contiguous(), a.contiguous(), err, norm), rank)


def _pad(up: LoraUpdate, rank: int) -> LoraUpdate:
    """Zero-pad a LoRA of lower rank to `rank` columns so every module has the same r."""
    k = up.rank
    if k >= rank:
        return up
    b = torch.cat([up.B, up.B.new_zeros(up.B.shape[0], rank - k)], dim=1)
    a = torch.cat([up.A, up.A.new_zeros(rank - k, up.A.shape[1])], dim=0)
    return LoraUpdate(b, a, up.rel_error, up.norm)


def merge_lora_factored(
    method: str,
    factors: Sequence[Factors],
    *,
    scalings: Sequence[float] | None = None,
    weights: Sequence[float] | None = None,
    density: float | Sequence[float] = 1.0,
    lam: float = 1.0,
    seed: int = 0,
    normalize: bool | None = None,
    gamma: float = 0.01,
    epsilon: float = 0.15,
    rescale: Rescale = "density",
    name: str = "",
    rank: int | None = None,
    power_iters: int = POWER_ITERS,
) -> LoraUpdate:
    """Merge LoRA experts of one module into one LoRA of rank `rank` (default Σ rᵢ).

    Exact for linear / task_arithmetic (concatenation) and KnOTS (factored SVD) when `rank` is at
    least their natural rank; otherwise the best truncation, with its relative error reported.
    """
    m = get_method(method)
    if m.data_aware:
        raise ConfigError(f"{method} needs Gram matrices: call merge.regmean.regmean_lora")
    s = _check_factors(factors, scalings)
    w, params = _params(
        m,
        len(factors),
        weights,
        density=density,
        lam=lam,
        seed=seed,
        normalize=normalize,
        gamma=gamma,
        epsilon=epsilon,
        rescale=rescale,
    )
    if m.combine == "slerp":
        raise ConfigError("slerp interpolates full weights; it cannot output a LoRA adapter")
    r = rank if rank is not None else sum(B.shape[1] for B, _ in factors)
    if r < 1:
        raise ConfigError(f"adapter rank must be ≥ 1, got {r}")
    if m.knots:
        us, v = _knots(m, factors, s, w, params, name)
        return exact(us, v, r)
    if m.sparsify == "none" and m.combine == "sum":
        normalize = m.normalize if params.normalize is None else params.normalize
        total = math.fsum(w) if normalize else 1.0
        if total == 0.0:
            raise ConfigError(f"weights {w} sum to zero; a normalized merge divides by it")
        coef = [lam * wi * si / total for wi, si in zip(w, s, strict=True)]
        b = torch.cat([c * B.float() for c, (B, _) in zip(coef, factors, strict=True)], dim=1)
        a = torch.cat([A.float() for _, A in factors], dim=0)
        return exact(b, a, r)
    deltas = [(si * B.float()) @ A.float() for si, (B, A) in zip(s, factors, strict=True)]
    out_dim, in_dim = deltas[0].shape
    # the merged ΔW is assembled entry by entry from the ΔWᵢ: their own column (or row) spaces
    # are the natural first guess of its dominant subspace
    start = (
        torch.cat([B for B, _ in factors], dim=1)
        if out_dim <= in_dim
        else torch.cat([A.T for _, A in factors], dim=1)
    )
    merged = merge_tensor(m, deltas, w, params, name)
    return truncated_svd(merged, r, start=start, power_iters=power_iters)


# ---------------------------------------------------------------------------------------------
# `space: factors`: PEFT's add_weighted_adapter semantics, for users who need parity with it.

PEFT_METHODS = ("linear", "ties", "dare_ties", "dare_linear", "magnitude_prune")


def _peft_prune(x: Tensor, density: float, kind: str, gen: torch.Generator | None) -> Tensor:
    if density >= 1.0:
        return x
    if kind == "magnitude":  # PEFT keeps int(d·numel) entries, possibly none
        k = int(density * x.numel())
        return x * topk_mask(x.abs(), k) if k > 0 else torch.zeros_like(x)
    return (x * (torch.rand(x.shape, generator=gen) < density)) / density


def _peft_combine(
    method: str, xs: list[Tensor], w: list[float], density: float, seed: int, name: str
) -> Tensor:
    """PEFT's merge of one factor: prune, then weighted sum or (unweighted vote, count mean)."""
    kind = "random" if method.startswith("dare") else "magnitude"
    if method == "linear":
        pruned = xs
    else:
        pruned = [
            _peft_prune(x, density, kind, generator(seed, name, i) if kind == "random" else None)
            for i, x in enumerate(xs)
        ]
    stacked = torch.stack(pruned)
    weighted = stacked * torch.tensor(w).view(-1, *([1] * (stacked.dim() - 1)))
    if method in ("linear", "magnitude_prune", "dare_linear"):
        return weighted.sum(0)
    majority = torch.where(stacked.sum(0) >= 0, 1.0, -1.0)
    agree = stacked.sign() == majority
    return (weighted * agree).sum(0) / agree.sum(0).clamp(min=1)


def merge_lora_peft(
    method: str,
    factors: Sequence[Factors],
    *,
    scalings: Sequence[float] | None = None,
    weights: Sequence[float] | None = None,
    density: float = 1.0,
    seed: int = 0,
    name: str = "",
) -> LoraUpdate:
    """PEFT-parity merge: the method applied to the A factors and to the B factors separately.

    Each expert's A is weighted by sign(w·s)·√|w·s| and its B by √|w·s| (PEFT 0.21); the product
    of the merged factors has cross terms BᵢAⱼ, which is why this is not the default space.
    """
    if method not in PEFT_METHODS:
        raise ConfigError(
            f"space 'factors' supports PEFT's {', '.join(PEFT_METHODS)}; got {method!r}"
        )
    s = _check_factors(factors, scalings)
    w = list(weights) if weights is not None else [1.0] * len(factors)
    check_inputs(get_method(method), len(factors), w)
    check_density(density)
    ranks = {A.shape[0] for _, A in factors}
    if len(ranks) > 1:
        raise InputError(
            f"space 'factors' needs experts of one rank (as PEFT), got {sorted(ranks)}"
        )
    ws = [wi * si for wi, si in zip(w, s, strict=True)]
    w_a = [math.copysign(math.sqrt(abs(x)), x) if x != 0 else 0.0 for x in ws]
    w_b = [math.sqrt(abs(x)) for x in ws]
    a = _peft_combine(method, [A.float() for _, A in factors], w_a, density, seed, f"{name}#A")
    b = _peft_combine(method, [B.float() for B, _ in factors], w_b, density, seed, f"{name}#B")
    return LoraUpdate(b, a, 0.0, product_norm(b, a))
