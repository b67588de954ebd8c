"""How sure a score is on a finite test set: percentile-bootstrap intervals of a mean over
examples, and paired comparisons of two models on the same examples (a paired bootstrap of the
per-example differences; McNemar's exact test for right/wrong outcomes). Pure functions,
seeded: the same inputs give the same interval every time."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

RESAMPLES = 2000
LEVEL = 0.95
SEED = 0
METHOD = f"95% interval: percentile bootstrap over the examples, {RESAMPLES} resamples, seed {SEED}"


def _means(values: np.ndarray, resamples: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    n = len(values)
    out = np.empty(resamples)
    for start in range(0, resamples, 256):  # bounded memory for large test sets
        idx = rng.integers(0, n, size=(min(256, resamples - start), n))
        out[start : start + len(idx)] = values[idx].mean(axis=1)
    return out


def interval(
    values: Sequence[float], resamples: int = RESAMPLES, seed: int = SEED, level: float = LEVEL
) -> tuple[float, float]:
    """The `level` percentile-bootstrap interval of the mean of per-example `values` (e.g. 1/0
    for right/wrong); a single example or identical values give a degenerate interval."""
    v = np.asarray(values, dtype=np.float64)
    if len(v) == 0:
        raise ValueError("no examples: an interval needs at least one")
    if np.all(v == v[0]):
        return float(v[0]), float(v[0])
    return _percentiles(_means(v, resamples, seed), level)


def _percentiles(boot: np.ndarray, level: float) -> tuple[float, float]:
    """The central `level` interval of bootstrap replicates."""
    tail = (1.0 - level) / 2
    low, high = np.quantile(boot, [tail, 1.0 - tail])
    return float(low), float(high)


def _two_sided_p(boot: np.ndarray) -> float:
    """The bootstrap's two-sided p-value of "no difference": twice the smaller tail at 0."""
    return min(1.0, 2 * min(float((boot <= 0).mean()), float((boot >= 0).mean())))


@dataclass(frozen=True)
class Comparison:
    """Model a minus model b on the same examples."""

    difference: float  # mean(a) − mean(b)
    low: float
    high: float
    p: float  # two-sided
    test: str  # which test gave p
    n: int

    def significant(self, alpha: float) -> bool:
        return self.p < alpha


def compare(
    a: Sequence[float],
    b: Sequence[float],
    resamples: int = RESAMPLES,
    seed: int = SEED,
    level: float = LEVEL,
) -> Comparison:
    """Paired comparison of per-example scores `a` and `b` (the same examples, in the same
    order): the mean difference with its bootstrap interval, and a two-sided p-value — McNemar's
    exact test when every score is 0 or 1, else the paired bootstrap's."""
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if x.shape != y.shape or len(x) == 0:
        raise ValueError(f"paired scores need the same examples: {len(x)} and {len(y)} scores")
    d = x - y
    diff = float(d.mean())
    if np.all(d == d[0]):
        low = high = float(d[0])
        boot = np.full(1, d[0])
    else:
        boot = _means(d, resamples, seed)
        low, high = _percentiles(boot, level)
    binary = np.isin(x, (0.0, 1.0)).all() and np.isin(y, (0.0, 1.0)).all()
    if binary:
        wins, losses = int(((x == 1) & (y == 0)).sum()), int(((x == 0) & (y == 1)).sum())
        return Comparison(diff, low, high, mcnemar_exact(wins, losses), "McNemar exact", len(d))
    p = 1.0 if np.all(d == 0) else _two_sided_p(boot)
    return Comparison(diff, low, high, p, "paired bootstrap", len(d))


def mcnemar_exact(wins: int, losses: int) -> float:
    """Two-sided exact McNemar p-value from the discordant pairs (a right and b wrong: `wins`;
    the reverse: `losses`): the binomial test of wins ~ Bin(wins + losses, 1/2)."""
    n = wins + losses
    if n == 0:
        return 1.0
    k = min(wins, losses)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2 * tail)


def compare_languages(
    a: dict[str, Sequence[float]],
    b: dict[str, Sequence[float]],
    select: str = "mean",
    resamples: int = RESAMPLES,
    seed: int = SEED,
    level: float = LEVEL,
) -> Comparison:
    """Paired comparison of two models over several languages (language → per-example scores,
    the same examples for both): the difference of their mean-over-languages score (`select`
    "mean") or worst-language score ("worst"), with a bootstrap that resamples the examples
    within each language, pairs kept; p is the bootstrap's two-sided value."""
    codes = list(a)
    if set(codes) != set(b) or any(len(a[c]) != len(b[c]) or not len(a[c]) for c in codes):
        raise ValueError("paired scores need the same languages and examples")

    def combine(means: np.ndarray) -> np.ndarray:
        return means.min(axis=0) if select == "worst" else means.mean(axis=0)

    xs = [np.asarray(a[c], dtype=np.float64) for c in codes]
    ys = [np.asarray(b[c], dtype=np.float64) for c in codes]
    observed = float(
        combine(np.array([x.mean() for x in xs])) - combine(np.array([y.mean() for y in ys]))
    )
    rng = np.random.default_rng(seed)
    boot_a, boot_b = np.empty((len(codes), resamples)), np.empty((len(codes), resamples))
    for i, (x, y) in enumerate(zip(xs, ys)):
        idx = rng.integers(0, len(x), size=(resamples, len(x)))
        boot_a[i], boot_b[i] = x[idx].mean(axis=1), y[idx].mean(axis=1)
    d = combine(boot_a) - combine(boot_b)
    low, high = _percentiles(d, level)
    same = all(np.array_equal(x, y) for x, y in zip(xs, ys))
    p = 1.0 if same else _two_sided_p(d)
    n = sum(len(x) for x in xs)
    return Comparison(observed, low, high, p, "paired bootstrap within languages", n)
