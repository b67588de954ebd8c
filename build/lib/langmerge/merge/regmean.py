"""RegMean (Jin et al., 2023): merge linear maps so that they best reproduce every expert's outputs
on its own inputs.

For a linear module with weight W (out × in, PyTorch's layout) and each expert's input Gram
matrix Gᵢ = XᵢᵀXᵢ (in × in, over that expert's training data), the least-squares merge is
W* = (Σᵢ wᵢ Wᵢ Ĝᵢ)(Σᵢ wᵢ Ĝᵢ)⁻¹, where Ĝᵢ = α·Gᵢ + (1 − α)·diag(Gᵢ) shrinks the off-diagonal
entries (α = 1: the plain least-squares solution). Written with deltas Wᵢ = W₀ + ΔWᵢ the base
cancels: ΔW* = (Σ wᵢ ΔWᵢ Ĝᵢ)(Σ wᵢ Ĝᵢ)⁻¹. For LoRA experts (ΔWᵢ = sᵢBᵢAᵢ) this is exactly a
LoRA of rank ≤ Σrᵢ: B* = [s₁B₁ … sₙBₙ], A*ᵢ = Aᵢ Ĝᵢ (ΣĜ)⁻¹, found by solving with ΣĜ (in × r
right-hand sides) without forming any out × in matrix. Pure tensor code; no I/O.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from langmerge.errors import ConfigError, InputError

ALPHA = 0.9
"""Default share of the off-diagonal Gram entries kept. The paper tunes α on validation data and
reports values near 0.9 for transformer language models; α < 1 also makes ΣĜ invertible."""


def shrink(gram: Tensor, alpha: float) -> Tensor:
    """Ĝ = α·G + (1 − α)·diag(G): a new float64 tensor the caller owns."""
    out = gram.to(torch.float64, copy=True)
    if alpha != 1.0:
        diag = out.diagonal().clone()
        out.mul_(alpha).diagonal().add_(diag, alpha=1.0 - alpha)
    return out


def _check(grams: Sequence[Tensor], weights: Sequence[float] | None, n: int, dim: int) -> list:
    if len(grams) != n:
        raise ConfigError(f"regmean needs one Gram matrix per expert: got {len(grams)} for {n}")
    for i, g in enumerate(grams):
        if g.shape != (dim, dim):
            raise InputError(
                f"expert {i}: Gram matrix of shape {tuple(g.shape)} for a module whose input "
                f"has {dim} features (need {dim}×{dim}): statistics of another model?"
            )
    w = list(weights) if weights is not None else [1.0] * n
    if any(x < 0 for x in w) or not any(x > 0 for x in w):
        raise ConfigError(f"regmean weights must be ≥ 0 and not all 0, got {w}")
    return w


def _solve_right(total: Tensor, rhs: Tensor) -> Tensor:
    """X with total · X = rhs for a symmetric positive semi-definite `total` (float64).

    Cholesky when `total` is positive definite; otherwise the least-norm solution, which leaves
    the directions no expert's inputs ever reach unchanged (a zero delta there)."""
    chol, info = torch.linalg.cholesky_ex(total)
    if int(info) == 0:
        return torch.cholesky_solve(rhs, chol)
    return torch.linalg.pinv(total, hermitian=True) @ rhs


def regmean(
    deltas: Sequence[Tensor],
    grams: Sequence[Tensor],
    *,
    weights: Sequence[float] | None = None,
    alpha: float = ALPHA,
) -> Tensor:
    """The merged ΔW* (float32, out × in) of dense deltas ΔWᵢ with input Gram matrices Gᵢ."""
    if not deltas:
        raise ConfigError("no deltas to merge")
    dim = deltas[0].shape[1]
    w = _check(grams, weights, len(deltas), dim)
    total = torch.zeros(dim, dim, dtype=torch.float64)
    numerator = torch.zeros(deltas[0].shape, dtype=torch.float64)
    for wi, delta, gram in zip(w, deltas, grams, strict=True):
        if wi == 0:
            continue
        g = shrink(gram, alpha).mul_(wi)
        total += g
        numerator += delta.double() @ g
    # ΔW* = N · T⁻¹  ⇔  T · ΔW*ᵀ = Nᵀ (T symmetric)
    return _solve_right(total, numerator.T).T.float()


def regmean_lora(
    factors: Sequence[tuple[Tensor, Tensor]],
    scalings: Sequence[float],
    grams: Sequence[Tensor],
    *,
    weights: Sequence[float] | None = None,
    alpha: float = ALPHA,
) -> tuple[Tensor, Tensor]:
    """(B*, A*): the RegMean merge of LoRA experts (Bᵢ, Aᵢ, sᵢ) as one LoRA of rank Σrᵢ, exactly:
    ΔW* = B* @ A*. Never forms an out × in matrix."""
    if not factors:
        raise ConfigError("no LoRA factors to merge")
    dim = factors[0][1].shape[1]
    w = _check(grams, weights, len(factors), dim)
    total = torch.zeros(dim, dim, dtype=torch.float64)
    parts = []  # Ĝᵢ Aᵢᵀ: one Gram matrix in memory at a time besides the total
    for wi, gram, (_, A) in zip(w, grams, factors, strict=True):
        g = shrink(gram, alpha).mul_(wi)
        total += g
        parts.append(g @ A.double().T)
    rhs = torch.cat(parts, dim=1)
    a_new = _solve_right(total, rhs).T  # row block i: Aᵢ Ĝᵢ (ΣĜ)⁻¹
    b_cat = torch.cat([s * B.double() for s, (B, _) in zip(scalings, factors, strict=True)], 1)
    return b_cat.float(), a_new.float()
