"""Scores of predictions against gold answers."""

from __future__ import annotations

from collections.abc import Sequence


def accuracy(gold: Sequence, predicted: Sequence) -> float:
    """Fraction of exact matches."""
    _same_length(gold, predicted)
    return sum(g == p for g, p in zip(gold, predicted)) / len(gold) if gold else 0.0


def macro_f1(gold: Sequence, predicted: Sequence) -> float:
    """Unweighted mean of per-label F1 over the labels in gold or predicted (as scikit-learn's
    `f1_score(average="macro")`, with F1 = 0 where a label has no true positive)."""
    _same_length(gold, predicted)
    labels = set(gold) | set(predicted)
    if not labels:
        return 0.0
    total = 0.0
    for label in labels:
        tp = sum(g == label and p == label for g, p in zip(gold, predicted))
        fp = sum(g != label and p == label for g, p in zip(gold, predicted))
        fn = sum(g == label and p != label for g, p in zip(gold, predicted))
        total += 2 * tp / (2 * tp + fp + fn) if tp else 0.0
    return total / len(labels)


def _same_length(gold: Sequence, predicted: Sequence) -> None:
    if len(gold) != len(predicted):
        raise ValueError(f"{len(gold)} gold answers but {len(predicted)} predictions")
