"""Scores of predictions against gold answers.

Text metrics work in every script: `words` folds case and compatibility forms, splits CJK
ideographs, kana and Hangul syllables into one token per character and other scripts into
word tokens (letters, digits and combining marks), Thai, Lao, Myanmar and Khmer into letter
clusters, so Chinese, Japanese, Russian or Hindi text
is scored, never dropped as rouge-score's default tokenizer drops every non-ASCII letter.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from collections.abc import Sequence
from decimal import Decimal


def accuracy(gold: Sequence, predicted: Sequence) -> float:
    """Fraction of exact matches."""
    _same_length(gold, predicted)
    return sum(g == p for g, p in zip(gold, predicted)) / len(gold) if gold else 0.0


def macro_f1(gold: Sequence, predicted: Sequence) -> float:
    """Unweighted mean of per-label F1 over the labels in gold or predicted (as scikit-learn's
    `f1_score(average="macro")`, with F1 = 0 where a label has no true positive)."""
    _same_length(gold, predicted)
    return _macro_f1(gold, predicted, set(gold) | set(predicted))


# ---------------------------------------------------------------------------------------------
# Tokenisation and normalisation

# Scripts written without spaces between words: one token per character.
_CHAR_TOKEN_RANGES = (
    (0x1100, 0x11FF),  # Hangul Jamo
    (0x3005, 0x3007),  # 々 〆 〇
    (0x3040, 0x30FF),  # Hiragana, Katakana (incl. the prolonged sound mark ー)
    (0x3130, 0x318F),  # Hangul Compatibility Jamo
    (0x31F0, 0x31FF),  # Katakana Phonetic Extensions
    (0x3400, 0x4DBF),  # CJK Unified Ideographs Extension A
    (0x4E00, 0x9FFF),  # CJK Unified Ideographs
    (0xA960, 0xA97F),  # Hangul Jamo Extended-A
    (0xAC00, 0xD7FF),  # Hangul Syllables, Hangul Jamo Extended-B
    (0xF900, 0xFAFF),  # CJK Compatibility Ideographs
    (0x20000, 0x3134F),  # CJK Extensions B-G, Compatibility Ideographs Supplement
)

# Scripts written without spaces whose letters carry combining marks: one token per cluster.
_CLUSTER_RANGES = (
    (0x0E00, 0x0EFF),  # Thai, Lao
    (0x1000, 0x109F),  # Myanmar
    (0x1780, 0x17FF),  # Khmer
)

# A number standing alone (not part of a word like "v2" or "42nd", nor of "1.2.3" or "3,5"):
# an optional sign, digits with an optional "." decimal part, "," only as a thousands separator
# in groups of three ("1,000" = 1000; "3,5" is not a number).
_NUMBER = re.compile(
    r"(?<![\w.,])[+-]?(?:(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d*)?|\.\d+)(?![\w]|[.,]\d)"
)


def _fold(text: str) -> str:
    """NFKC-normalised, case-folded text (full-width "Ａ１" = "a1", "Straße" = "strasse")."""
    return unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", text).casefold())


def _is_char_token(ch: str) -> bool:
    """Whether `ch` is a CJK ideograph, kana or Hangul letter (one token each)."""
    code = ord(ch)
    return unicodedata.category(ch)[0] in "LN" and any(
        lo <= code <= hi for lo, hi in _CHAR_TOKEN_RANGES
    )


def _is_cluster_start(ch: str) -> bool:
    """Whether `ch` starts a letter cluster of Thai, Lao, Myanmar or Khmer (one token each)."""
    code = ord(ch)
    return unicodedata.category(ch)[0] in "LN" and any(
        lo <= code <= hi for lo, hi in _CLUSTER_RANGES
    )


def _split(folded: str) -> list[str]:
    """Tokens of already folded text: runs of letters, digits and combining marks; CJK, kana and
    Hangul one per character; Thai, Lao, Myanmar and Khmer one per letter with its marks;
    punctuation, symbols, underscores and spaces separate."""
    tokens: list[str] = []
    current: list[str] = []
    clustering = False  # `current` is a cluster of a script written without spaces
    for ch in folded:
        if _is_char_token(ch) or _is_cluster_start(ch):
            if current:
                tokens.append("".join(current))
            current, clustering = ([ch], True) if _is_cluster_start(ch) else ([], False)
            if not clustering:
                tokens.append(ch)
        elif clustering and unicodedata.category(ch)[0] == "M":
            current.append(ch)
        elif unicodedata.category(ch)[0] in "LNM":
            if clustering:
                tokens.append("".join(current))
                current, clustering = [], False
            current.append(ch)
        elif current:
            tokens.append("".join(current))
            current, clustering = [], False
    if current:
        tokens.append("".join(current))
    return tokens


def words(text: str) -> list[str]:
    """Case-folded NFKC word tokens of any script, CJK/kana/Hangul one per character."""
    return _split(_fold(text))


def _canonical_number(text: str) -> str:
    """The number written as `text` in a canonical form ("42.0", "+42", "042" -> "42")."""
    value = Decimal(text.replace(",", ""))
    return "0" if value == 0 else format(value.normalize(), "f")


def _normalised_tokens(text: str) -> list[str]:
    """`words(text)`, except that numbers stay whole and canonical ("3.50" -> "3.5")."""
    folded = _fold(text)
    tokens: list[str] = []
    start = 0
    for match in _NUMBER.finditer(folded):
        tokens += _split(folded[start : match.start()])
        tokens.append(_canonical_number(match.group()))
        start = match.end()
    return tokens + _split(folded[start:])


# ---------------------------------------------------------------------------------------------
# Generation metrics


def _f1(overlap: int, n_predicted: int, n_reference: int) -> float:
    """F1 of `overlap` matches between `n_predicted` and `n_reference` items (0 if none match)."""
    return 2 * overlap / (n_predicted + n_reference) if overlap else 0.0


def _ngrams(tokens: list[str], n: int) -> Counter:
    """Counts of the n-grams of `tokens`."""
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def _rouge_n(predicted: list[str], reference: list[str], n: int) -> float:
    """ROUGE-N F1: n-gram overlap with counts clipped to the reference's."""
    p, r = _ngrams(predicted, n), _ngrams(reference, n)
    return _f1(sum((p & r).values()), sum(p.values()), sum(r.values()))


def _lcs_length(a: list[str], b: list[str]) -> int:
    """Length of the longest common subsequence of `a` and `b`."""
    if len(a) < len(b):
        a, b = b, a
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Mean ROUGE-1, ROUGE-2 and ROUGE-L F1 over examples, on `words` tokens.

    As rouge-score's F-measures (beta = 1, no stemming; "rougeL" is the LCS of the whole texts,
    without sentence splitting): a score is 0 when either side has no tokens (even both) or, for
    ROUGE-2, no bigrams. No examples: all 0.0.
    """
    _same_length(references, predictions)
    totals = {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    for prediction, reference in zip(predictions, references):
        p, r = words(prediction), words(reference)
        totals["rouge1"] += _rouge_n(p, r, 1)
        totals["rouge2"] += _rouge_n(p, r, 2)
        totals["rougeL"] += _f1(_lcs_length(p, r), len(p), len(r))
    return {key: total / len(predictions) if predictions else 0.0 for key, total in totals.items()}


def rouge_l_each(predictions: Sequence[str], references: Sequence[str]) -> list[float]:
    """ROUGE-L F1 of each example (their mean is `rouge`'s "rougeL")."""
    _same_length(references, predictions)
    out = []
    for prediction, reference in zip(predictions, references):
        p, r = words(prediction), words(reference)
        out.append(_f1(_lcs_length(p, r), len(p), len(r)))
    return out


def exact_match(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Fraction of predictions equal to their reference after normalisation.

    Both sides are case-folded and NFKC-normalised, punctuation and symbols become spaces and
    spaces are collapsed (so "Paris!" = " paris" and "not_entailment" = "not entailment", but
    "U.S." != "US"); CJK, kana and Hangul compare by character, ignoring spaces between them.
    Numbers compare by value: "42" = "42.0" = " 42 " = "+42", "1,000" = "1000" ("," only as a
    thousands separator; "3,5" is the tokens 3 and 5). No examples: 0.0.
    """
    _same_length(references, predictions)
    matches = (
        _normalised_tokens(p) == _normalised_tokens(r) for p, r in zip(predictions, references)
    )
    return sum(matches) / len(predictions) if predictions else 0.0


def token_f1(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Mean SQuAD-style bag-of-`words` F1 (both sides without tokens: 1; one side only: 0)."""
    _same_length(references, predictions)
    total = 0.0
    for prediction, reference in zip(predictions, references):
        p, r = Counter(words(prediction)), Counter(words(reference))
        if not p or not r:
            total += float(p == r)
        else:
            total += _f1(sum((p & r).values()), sum(p.values()), sum(r.values()))
    return total / len(predictions) if predictions else 0.0


# ---------------------------------------------------------------------------------------------
# Classification by generation


def _occurrences(tokens: list[str], label: list[str]) -> list[tuple[int, int]]:
    """Spans (start, end) where the token sequence `label` occurs in `tokens`."""
    n = len(label)
    return [(i, i + n) for i in range(len(tokens) - n + 1) if tokens[i : i + n] == label]


def parse_label(generated: str, labels: Sequence[str]) -> str | None:
    """The label that a generated text names, or None when it names none or several.

    Texts and labels compare as normalised tokens (as in `exact_match`, so "Positive." names
    "positive" and "3.0" names "3", but "positively" names nothing). First rule: the first label
    the output starts with (or equals), longer labels first ("very positive" before "positive").
    Otherwise: the only label occurring as whole tokens in it ("Answer: 3" -> "3"), not counting
    occurrences inside a longer label's ("is very positive" -> "very positive"); none or several
    distinct labels ("positive, not negative") -> None. Negation is not understood.
    """
    output = _normalised_tokens(generated)
    candidates = [(label, _normalised_tokens(label)) for label in labels]
    candidates = sorted((c for c in candidates if c[1]), key=lambda c: -len(c[1]))
    for label, tokens in candidates:
        if output[: len(tokens)] == tokens:
            return label
    found: dict[str, list[tuple[int, int]]] = {}
    for label, tokens in candidates:
        spans = _occurrences(output, tokens)
        covered = [s for other in found.values() for s in other]
        if any(not any(a <= start and end <= b for a, b in covered) for start, end in spans):
            found[label] = spans
    return next(iter(found)) if len(found) == 1 else None


def label_scores(
    generated: Sequence[str], gold: Sequence[str], labels: Sequence[str]
) -> dict[str, float]:
    """Accuracy, macro-F1 and unparseable fraction of generated texts parsed with `parse_label`.

    An unparseable generation is wrong: it misses its gold label (a false negative of that
    class) but adds no class of its own to the macro average, which runs over the labels in
    gold or parsed predictions as in `macro_f1`. Raises ValueError on a gold answer not in
    `labels` or on a length mismatch. No examples: all 0.0.
    """
    _same_length(gold, generated)
    unknown = sorted(set(gold) - set(labels))
    if unknown:
        raise ValueError(f"gold answers {unknown} are not among the labels {list(labels)}")
    parsed = [parse_label(text, labels) for text in generated]
    if not parsed:
        return {"accuracy": 0.0, "macro_f1": 0.0, "unparseable": 0.0}
    classes = set(gold) | {p for p in parsed if p is not None}
    return {
        "accuracy": accuracy(gold, parsed),
        "macro_f1": _macro_f1(gold, parsed, classes),
        "unparseable": sum(p is None for p in parsed) / len(parsed),
    }


def _macro_f1(gold: Sequence, predicted: Sequence, labels: set) -> float:
    """Unweighted mean of per-label F1 over `labels` (0 where a label has no true positive)."""
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
