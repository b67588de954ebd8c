"""Training health: whether a model learned its task, judged from its predictions and losses on
validation data. A degenerate model (predictions collapsed to one label, a diverged loss, empty
or identical generations) is a failure to report, never a result to merge, serve or compare.

Pure functions over predictions and numbers; the verdict is a JSON-ready dict:
`{"verdict": "healthy" | "degenerate", "problems": [...], "warnings": [...], "advice": [...],
"evidence": {...}}`, each problem a sentence a user understands.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

from langmerge.evaluate.metrics import macro_f1

HEALTHY, DEGENERATE = "healthy", "degenerate"

COLLAPSED_SHARE = 0.9  # one label for at least this share of the examples …
SPREAD_SHARE = 0.75  # … while the most common true label has at most this share
CONSTANT_MARGIN = 0.05  # macro-F1 within this of a constant predictor's: no better than one
IDENTICAL_SHARE = 0.9  # one generated answer for at least this share of the prompts
EMPTY_SHARE = 0.5  # at least this share of generated answers empty
LEARNED_MARGIN = 0.02  # the primary metric must beat the untrained model's by more than this
UNDERFIT_FALL = 0.3  # a validation loss that fell by less than this share: too little training

ADVICE_COLLAPSE = (
    "try a lower training.learning_rate (e.g. a third of it), a longer warm-up, or more steps "
    "(training.min_steps / training.steps)"
)
ADVICE_DIVERGED = "lower training.learning_rate (e.g. ten times)"
ADVICE_NOTHING = (
    "give it more steps (training.min_steps / training.steps) or a higher learning rate"
)


def label_problems(gold: Sequence, predicted: Sequence, what: str = "validation texts") -> dict:
    """Problems of one set of label predictions: collapsed to one label while the true labels
    are spread, or a macro-F1 no better than always predicting the most common true label."""
    n = len(predicted)
    if n == 0 or len(gold) != n:
        return {"problems": [], "evidence": {}}
    top, top_n = Counter(predicted).most_common(1)[0]
    gold_counts = Counter(gold)
    gold_top, gold_top_n = gold_counts.most_common(1)[0]
    f1 = macro_f1(list(gold), list(predicted))
    constant = constant_macro_f1(gold)
    evidence = {
        "examples": n,
        "predicted": _shares(predicted),
        "true": _shares(gold),
        "macro_f1": f1,
        "constant_macro_f1": constant,
    }
    problems = []
    spread = len(gold_counts) > 1 and gold_top_n / n <= SPREAD_SHARE
    if spread and top_n / n >= COLLAPSED_SHARE:
        problems.append(
            f"predicts `{top}` for {top_n / n:.0%} of {n} {what} (the true labels: "
            f"{_share_text(gold_counts, n)})"
        )
    elif len(gold_counts) > 1 and f1 <= constant + CONSTANT_MARGIN:
        problems.append(
            f"macro-F1 {f1:.3f} on {n} {what}: no better than always predicting "
            f"`{gold_top}` ({constant:.3f})"
        )
    return {"problems": problems, "evidence": evidence}


def generation_problems(
    answers: Sequence[str], targets: Sequence[str], what: str = "validation prompts"
) -> dict:
    """Problems of greedy answers to validation prompts: mostly empty, or one answer for nearly
    every prompt while the reference answers differ."""
    n = len(answers)
    if n == 0:
        return {"problems": [], "evidence": {}}
    empty = sum(not a.strip() for a in answers) / n
    top, top_n = Counter(answers).most_common(1)[0]
    distinct_targets = len(set(targets))
    evidence = {
        "examples": n,
        "empty": empty,
        "distinct_answers": len(set(answers)),
        "distinct_targets": distinct_targets,
        "most_common_answer": top[:80],
        "most_common_share": top_n / n,
    }
    problems = []
    if empty >= EMPTY_SHARE:
        problems.append(f"generates an empty answer for {empty:.0%} of {n} {what}")
    elif n >= 4 and distinct_targets > 1 and top_n / n >= IDENTICAL_SHARE:
        shown = top if len(top) <= 40 else top[:40] + "…"
        problems.append(
            f"answers `{shown}` to {top_n / n:.0%} of {n} {what} "
            f"({distinct_targets} different reference answers)"
        )
    return {"problems": problems, "evidence": evidence}


def loss_problems(
    train_loss: float | None,
    val_loss: float | None,
    untrained_loss: float | None,
    metric: float | None = None,
    untrained_metric: float | None = None,
) -> dict:
    """Problems of the losses: not finite (diverged), or a validation loss not below the
    untrained model's while the primary metric is no better either (learned nothing). A loss
    above the untrained one with a better metric is only a warning (an overconfident model)."""
    evidence = {"train_loss": train_loss, "validation_loss": val_loss,
                "untrained_validation_loss": untrained_loss}  # fmt: skip
    problems, warnings = [], []
    bad = [name for name, v in (("training", train_loss), ("validation", val_loss))
           if v is not None and not math.isfinite(v)]  # fmt: skip
    if bad:
        problems.append(f"the {' and '.join(bad)} loss diverged (not a finite number)")
    elif val_loss is not None and untrained_loss is not None and val_loss >= untrained_loss:
        improved = (
            metric is not None
            and untrained_metric is not None
            and metric > untrained_metric + LEARNED_MARGIN
        )
        if improved:
            warnings.append(
                f"validation loss {val_loss:.3f} is not below the untrained model's "
                f"({untrained_loss:.3f}), although its score improved: an overconfident model"
            )
        else:
            problems.append(
                f"learned nothing: validation loss {val_loss:.3f}, the untrained model's "
                f"{untrained_loss:.3f}"
            )
    return {"problems": problems, "warnings": warnings, "evidence": evidence}


def verdict(parts: dict[str, dict], loss: dict | None = None) -> dict:
    """One model's verdict from the problems found per language (`parts`: language → the
    output of `label_problems` or `generation_problems`) and of its losses."""
    problems, warnings, evidence = [], [], {}
    for code, part in parts.items():
        problems += [f"{code}: {p}" for p in part["problems"]]
        evidence[code] = part["evidence"]
    advice = []
    if problems:
        advice.append(ADVICE_NOTHING if _barely_learned(loss) else ADVICE_COLLAPSE)
    if loss is not None:
        problems += loss["problems"]
        warnings += loss.get("warnings", [])
        evidence["loss"] = loss["evidence"]
        if any("diverged" in p for p in loss["problems"]):
            advice = [ADVICE_DIVERGED]
        elif any("learned nothing" in p for p in loss["problems"]) and not advice:
            advice.append(ADVICE_NOTHING)
    return {
        "verdict": DEGENERATE if problems else HEALTHY,
        "problems": problems,
        "warnings": warnings,
        "advice": advice,
        "evidence": evidence,
    }


def _barely_learned(loss: dict | None) -> bool:
    """Whether the validation loss fell by less than UNDERFIT_FALL of the untrained model's:
    collapsed predictions then come from too little training rather than too much."""
    found = (loss or {}).get("evidence", {})
    val, untrained = found.get("validation_loss"), found.get("untrained_validation_loss")
    if val is None or untrained is None or not (math.isfinite(val) and math.isfinite(untrained)):
        return False
    return val > (1 - UNDERFIT_FALL) * untrained


def is_degenerate(health: dict | None) -> bool:
    """Whether a recorded verdict says degenerate (models recorded before the check: no)."""
    return bool(health) and health.get("verdict") == DEGENERATE


def summary(health: dict | None) -> str:
    """The verdict in one short cell: "healthy", "degenerate: en: predicts `x` for 100% …",
    or "unchecked" for a model recorded before health checks."""
    if not health:
        return "unchecked"
    if health["verdict"] == HEALTHY:
        return HEALTHY + (" (warning)" if health.get("warnings") else "")
    return f"{DEGENERATE}: {health['problems'][0]}" + (
        f" (+{len(health['problems']) - 1} more)" if len(health["problems"]) > 1 else ""
    )


def constant_macro_f1(gold: Sequence) -> float:
    """The macro-F1 of always predicting the most common true label."""
    counts = Counter(gold)
    if not counts:
        return 0.0
    p = counts.most_common(1)[0][1] / len(gold)
    return 2 * p / (1 + p) / len(counts)


def _shares(values: Sequence) -> dict[str, float]:
    n = len(values)
    return {str(k): c / n for k, c in Counter(values).most_common()}


def _share_text(counts: Counter, n: int, most: int = 4) -> str:
    common = counts.most_common()
    text = ", ".join(f"`{k}` {c / n:.0%}" for k, c in common[:most])
    return text + (f", {len(common) - most} more" if len(common) > most else "")
