"""What a project's data is: the task (what the model learns), where each language's examples
are, and how one file per language is split. Validated with pydantic; the recipe embeds them."""

from __future__ import annotations

import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from langmerge.yamlfile import Strict


class Task(Strict):
    """What the model learns: a label per text (classification) or a text per prompt."""

    kind: Literal["classification", "generation"]
    text_field: str = "text"
    label_field: str = "label"  # classification
    labels: list[str] | None = None  # classification: the label set (default: from the data)
    target_field: str = "target"  # generation
    prompt: str = "{text}"  # generation: template over the example's fields
    chat_template: bool = True  # generation: use the tokenizer's chat template if it has one
    max_new_tokens: int = Field(64, ge=1)  # generation: the longest answer evaluation generates

    @field_validator("labels", mode="before")
    @classmethod
    def _labels_as_text(cls, v: Any) -> Any:
        # labels: [0, 1] in YAML are the labels "0" and "1", as numbers in the data are
        return (
            [str(x) if isinstance(x, int | float) else x for x in v] if isinstance(v, list) else v
        )

    @model_validator(mode="after")
    def _consistent(self) -> Task:
        if self.labels is not None and len(set(self.labels)) != len(self.labels):
            raise ValueError(f"labels must be distinct, got {self.labels}")
        if self.kind == "generation":
            prompt_fields(self.prompt)
        return self


def prompt_fields(prompt: str) -> list[str]:
    """The example fields a prompt template uses; a template that cannot be filled from an
    example's fields raises ValueError saying why."""
    example = "e.g. 'Summarize: {text}'"
    try:
        parsed = list(string.Formatter().parse(prompt))
    except ValueError as e:
        raise ValueError(f"prompt is not a valid template ({e}); {example}") from None
    fields = [f for _, f, _, _ in parsed if f is not None]
    odd = [f for f in fields if not f.isidentifier()]
    if odd:
        raise ValueError(
            f"prompt fields must be field names, got {odd}; {example} (write {{{{ for a brace)"
        )
    if not fields:
        raise ValueError(f"prompt must use the example's fields, {example}")
    if any(conv or spec for _, f, spec, conv in parsed if f is not None):
        raise ValueError(f"prompt fields take no conversion or format spec; {example}")
    return list(dict.fromkeys(fields))


class HubData(Strict):
    """A data set on the Hugging Face hub, read with `datasets.load_dataset` at training time."""

    id: str
    config: str | None = None
    splits: dict[Literal["train", "validation", "test"], str] = {"train": "train"}

    @field_validator("splits")
    @classmethod
    def _has_train(cls, v: dict[str, str]) -> dict[str, str]:
        if "train" not in v:
            raise ValueError("splits must name the hub split used for training, e.g. train: train")
        return v


class LanguageData(Strict):
    """One language's data: one file to split, the splits as given, or a hub data set.

    Files are JSONL, CSV/TSV, Parquet, or a directory written by `datasets.save_to_disk`.
    Splits not given are carved from the training data by the recipe's `split:`.
    """

    data: Path | None = None
    train: Path | None = None
    validation: Path | None = None
    test: Path | None = None
    hub: HubData | None = None
    more: list[Path] = []  # data added later (`langmerge update`): split like `data:`

    @model_validator(mode="after")
    def _one_layout(self) -> LanguageData:
        given = sum(x is not None for x in (self.data, self.train, self.hub))
        if given > 1 or (given == 0 and (self.validation or self.test)):
            raise ValueError(
                "give one of `data:` (split by the recipe's `split:`), `train:` "
                "(with optional validation:/test:) or `hub:`"
            )
        return self

    def given(self) -> bool:
        return any(x is not None for x in (self.data, self.train, self.hub))

    def files(self) -> list[Path]:
        named = [p for p in (self.data, self.train, self.validation, self.test) if p is not None]
        return named + list(self.more)


class Split(Strict):
    """How one file per language is split, deterministically."""

    validation: float = Field(0.1, ge=0.0, lt=1.0)
    test: float = Field(0.1, ge=0.0, lt=1.0)
    seed: int = 0

    @model_validator(mode="after")
    def _leaves_training_data(self) -> Split:
        if self.validation + self.test >= 1.0:
            raise ValueError("validation + test must leave some data for training")
        return self


@dataclass(frozen=True)
class DataSpec:
    """Everything reading a project's examples needs: each language's source (its own, or the
    shared file with a language column), the task, how files are split."""

    languages: dict[str, LanguageData]
    task: Task
    split: Split
    shared: LanguageData | None = None  # one source for all languages, with a language column
    language_field: str = "language"
    split_field: str | None = None  # a column naming each record's split
    min_examples: int = 10  # fewer training examples in a language is an error

    def source(self, language: str) -> LanguageData:
        """Where `language`'s data comes from (its own entry, or the shared data)."""
        own = self.languages[language]
        return own if own.given() or self.shared is None else self.shared
