"""How experts' task vectors relate: norms, cosine similarities (overall, per layer, per module
type) and sign conflicts, computed one module at a time in float64 from LoRA factors (and the
saved tensors against the base), never forming more than one dense ΔW at once."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import torch
from torch import Tensor

from langmerge.errors import InputError
from langmerge.merge.io import Adapter, LoraModule, ModelFiles

Pair = tuple[str, str]
HEAD = "head"  # the module type of every saved (modules_to_save) tensor
_LAYER = re.compile(r"(?:^|\.)(\d+)\.")
SIGN_CHUNK = 1 << 20  # entries per chunk when counting signs (≤ 2²⁴ keeps float32 counts exact)


def lora_inner(a: LoraModule, b: LoraModule) -> float:
    """⟨ΔWa, ΔWb⟩_F from the factors, never forming ΔW: O(r²·(m+n)), accumulated in float64.

    ⟨sa·Ba·Aa, sb·Bb·Ab⟩ = sa·sb·trace((Baᵀ Bb)(Ab Aaᵀ)) = sa·sb·Σ (Baᵀ Bb) ⊙ (Aa Abᵀ).
    """
    if a.B.shape[0] != b.B.shape[0] or a.A.shape[1] != b.A.shape[1]:
        raise InputError(
            f"LoRA modules of different shapes: {a.B.shape[0]}×{a.A.shape[1]} and "
            f"{b.B.shape[0]}×{b.A.shape[1]}"
        )
    bb = a.B.double().T @ b.B.double()  # ra × rb
    aa = a.A.double() @ b.A.double().T  # ra × rb
    return a.scaling * b.scaling * float((bb * aa).sum())


def layer_of(name: str) -> int | None:
    """The transformer layer of a weight: its first all-digit name component, else None."""
    m = _LAYER.search(name)
    return int(m[1]) if m else None


def type_of(name: str) -> str:
    """The module type of a LoRA-adapted weight: the last name component before `.weight`."""
    return name.removesuffix(".weight").rsplit(".", 1)[-1]


@dataclass
class VectorStats:
    """Similarity of experts' task vectors. Every pair dict holds all ordered pairs of
    `languages`, self-pairs included, so `d[(a, b)] == d[(b, a)]`.

    A cosine where either vector's norm is 0 is 0.0 (also a zero expert with itself). Per-layer
    keys are layer indices (None for weights outside a numbered layer); per-type keys are the
    module types of `type_of`, with every saved (modules_to_save) tensor under "head".
    A sign-conflict rate is conflicts / entries where both experts are nonzero (0.0 if none);
    `sign_conflict_all` is, among entries where at least two experts are nonzero, the fraction
    whose nonzero experts do not all share one sign. `skipped` names saved tensors left out of
    every statistic, with the reason.
    """

    languages: list[str]
    norms: dict[str, float]
    cosine: dict[Pair, float]
    by_layer: dict[Pair, dict[int | None, float]]
    by_type: dict[Pair, dict[str, float]]
    sign_conflict: dict[Pair, float]
    sign_conflict_all: float
    skipped: list[str] = field(default_factory=list)

    def matrix(
        self, values: dict[Pair, float] | None = None
    ) -> tuple[list[str], list[list[float]]]:
        """(languages, n×n rows) of a pair dict, by default the overall cosine; its diagonal is
        1.0 (0.0 for a zero expert)."""
        values = self.cosine if values is None else values
        return self.languages, [[values[(a, b)] for b in self.languages] for a in self.languages]

    def to_json(self) -> dict:
        """JSON values (pair dicts as [a, b, value] lists); `from_json` reads them back."""

        def pairs(d: dict) -> list:
            return [[a, b, v] for (a, b), v in d.items()]

        return {
            "languages": self.languages, "norms": self.norms, "cosine": pairs(self.cosine),
            "by_layer": [[a, b, list(m.items())] for (a, b), m in self.by_layer.items()],
            "by_type": pairs(self.by_type), "sign_conflict": pairs(self.sign_conflict),
            "sign_conflict_all": self.sign_conflict_all, "skipped": self.skipped,
        }  # fmt: skip

    @classmethod
    def from_json(cls, d: dict) -> VectorStats:
        """The statistics `to_json` wrote."""

        def pairs(rows: list) -> dict:
            return {(a, b): v for a, b, v in rows}

        return cls(
            languages=d["languages"], norms=d["norms"], cosine=pairs(d["cosine"]),
            by_layer={(a, b): dict((k, v) for k, v in m) for a, b, m in d["by_layer"]},
            by_type=pairs(d["by_type"]), sign_conflict=pairs(d["sign_conflict"]),
            sign_conflict_all=d["sign_conflict_all"], skipped=d["skipped"],
        )  # fmt: skip


def _cosines(gram: Tensor, langs: list[str]) -> dict[Pair, float]:
    """Cosine of every ordered pair from a float64 Gram matrix of inner products."""
    out = {}
    for i, a in enumerate(langs):
        for j, b in enumerate(langs):
            denom = math.sqrt(float(gram[i, i]) * float(gram[j, j]))
            cos = float(gram[i, j]) / denom if denom > 0 else 0.0
            out[(a, b)] = 1.0 if i == j and denom > 0 else max(-1.0, min(1.0, cos))
    return out


def _count_signs(
    idx: list[int], signs: Tensor, overlap: Tensor, conflict: Tensor, totals: list[int]
) -> None:
    """Add one module's sign counts, given the signs (k × entries, int8) of experts `idx`:
    pairwise (both nonzero, and of those opposite) and over all experts (entries with ≥ 2
    nonzero, and of those not all one sign). Per chunk, with S the signs and |S| their
    magnitudes, |S|·|S|ᵀ counts the entries where both are nonzero and S·Sᵀ counts agreements
    minus conflicts; float32 is exact for counts under 2²⁴."""
    at = torch.tensor(idx)[:, None], torch.tensor(idx)[None, :]
    for start in range(0, signs.shape[1], SIGN_CHUNK):
        s = signs[:, start : start + SIGN_CHUNK].float()
        nz = s.abs()
        both, dot = (nz @ nz.T).long(), (s @ s.T).long()
        overlap[at] += both
        conflict[at] += (both - dot) // 2
        totals[0] += int((nz.sum(0) >= 2).sum())
        totals[1] += int(((s > 0).any(0) & (s < 0).any(0)).sum())


def _zeros(n: int, dtype: torch.dtype = torch.float64) -> Tensor:
    return torch.zeros(n, n, dtype=dtype)


def _dense_sign(m: LoraModule) -> Tensor:
    """Signs (int8, flattened) of ΔW = s·B·A, formed in float32 as the merge forms it."""
    return ((m.scaling * m.B.float()) @ m.A.float()).sign().to(torch.int8).reshape(-1)


def compare_experts(adapters: dict[str, Adapter], base: ModelFiles | None = None) -> VectorStats:
    """Compare the task vectors of `adapters` (language → expert), in the dict's order.

    A task vector is every LoRA module's ΔW = s·B·A plus every saved tensor's `saved − base`
    (which needs `base`; saved tensors without a base, missing from it or shaped unlike it are
    skipped). An expert lacking a module contributes zero there. Inner products come from the
    factors (`lora_inner`); signs need the entries, so each module's dense ΔW is formed (float32,
    as the merge sees it) one module at a time and freed before the next.
    """
    langs, experts, n = list(adapters), list(adapters.values()), len(adapters)
    total = _zeros(n)
    layer_gram: dict[int | None, Tensor] = {}
    type_gram: dict[str, Tensor] = {}
    overlap, conflict = _zeros(n, torch.int64), _zeros(n, torch.int64)
    totals = [0, 0]  # entries with ≥ 2 nonzero experts; of those, entries with mixed signs
    skipped: list[str] = []

    def add(name: str, kind: str, gram: Tensor, idx: list[int], signs: Tensor) -> None:
        total.add_(gram)
        layer_gram.setdefault(layer_of(name), _zeros(n)).add_(gram)
        type_gram.setdefault(kind, _zeros(n)).add_(gram)
        _count_signs(idx, signs, overlap, conflict, totals)

    for name in dict.fromkeys(k for e in experts for k in e.modules):
        mods = {i: e.modules[name] for i, e in enumerate(experts) if name in e.modules}
        shapes = {langs[i]: (m.B.shape[0], m.A.shape[1]) for i, m in mods.items()}
        if len(set(shapes.values())) > 1:
            raise InputError(f"experts adapt {name} with different shapes: {shapes}")
        gram = _zeros(n)
        for i, mi in mods.items():
            for j, mj in mods.items():
                if j >= i:
                    gram[i, j] = gram[j, i] = lora_inner(mi, mj)
        rows, cols = next(iter(shapes.values()))
        signs = torch.empty(len(mods), rows * cols, dtype=torch.int8)
        for row, m in zip(signs, mods.values()):
            row.copy_(_dense_sign(m))  # one dense ΔW at a time
        add(name, type_of(name), gram, list(mods), signs)

    for name in dict.fromkeys(k for e in experts for k in e.saved):
        if base is None:
            skipped.append(f"{name}: no base model given")
            continue
        if name not in base.tensors:
            skipped.append(f"{name}: not in the base model")
            continue
        theta = base.read(name).double()
        held = {i: e.saved[name] for i, e in enumerate(experts) if name in e.saved}
        if any(t.shape != theta.shape for t in held.values()):
            skipped.append(f"{name}: shaped unlike the base's {tuple(theta.shape)}")
            continue
        deltas = {i: (t.double() - theta).reshape(-1) for i, t in held.items()}
        gram = _zeros(n)
        for i, di in deltas.items():
            for j, dj in deltas.items():
                gram[i, j] = float(di @ dj)
        signs = torch.stack([d.sign().to(torch.int8) for d in deltas.values()])
        add(name, HEAD, gram, list(deltas), signs)

    pairs = [(a, b, i, j) for i, a in enumerate(langs) for j, b in enumerate(langs)]
    layers = {k: _cosines(g, langs) for k, g in layer_gram.items()}
    types = {k: _cosines(g, langs) for k, g in type_gram.items()}
    return VectorStats(
        languages=langs,
        norms={a: math.sqrt(max(float(total[i, i]), 0.0)) for i, a in enumerate(langs)},
        cosine=_cosines(total, langs),
        by_layer={(a, b): {k: c[(a, b)] for k, c in layers.items()} for a, b, _, _ in pairs},
        by_type={(a, b): {k: c[(a, b)] for k, c in types.items()} for a, b, _, _ in pairs},
        sign_conflict={
            (a, b): int(conflict[i, j]) / int(overlap[i, j]) if overlap[i, j] else 0.0
            for a, b, i, j in pairs
        },
        sign_conflict_all=totals[1] / totals[0] if totals[0] else 0.0,
        skipped=skipped,
    )
