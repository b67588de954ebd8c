"""The recipe: one YAML file that describes a project (base, task, languages and their data, LoRA
and training settings, merge settings, run directory), validated up front with pydantic.

Relative paths resolve against the recipe's folder. Errors name the field and say what is
allowed. Loading a recipe checks that the data files exist but reads neither data nor model.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from langmerge.errors import ConfigError
from langmerge.merge.config import MethodName
from langmerge.yamlfile import read_mapping, validate

LANGUAGE_CODE = re.compile(r"^[a-z]{2,3}(-[A-Za-z0-9]{2,8})*$")  # BCP 47: en, pt-BR, zh-Hant


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Task(_Strict):
    """What the model learns: a label per text (classification) or a text per prompt."""

    kind: Literal["classification", "generation"]
    text_field: str = "text"
    label_field: str = "label"  # classification
    labels: list[str] | None = None  # classification: the label set (default: from the data)
    target_field: str = "target"  # generation
    prompt: str = "{text}"  # generation: template over the example's fields
    chat_template: bool = True  # generation: use the tokenizer's chat template if it has one

    @model_validator(mode="after")
    def _consistent(self) -> Task:
        if self.labels is not None and len(set(self.labels)) != len(self.labels):
            raise ValueError(f"labels must be distinct, got {self.labels}")
        if self.kind == "generation" and "{" not in self.prompt:
            raise ValueError("prompt must use the example's fields, e.g. 'Summarize: {text}'")
        return self


class LanguageData(_Strict):
    """One language's data: one file to split, or the splits as given."""

    data: Path | None = None
    train: Path | None = None
    validation: Path | None = None
    test: Path | None = None

    @model_validator(mode="after")
    def _one_layout(self) -> LanguageData:
        if (self.data is None) == (self.train is None):
            raise ValueError(
                "give either `data:` (split by the recipe's `split:`) or `train:` "
                "(with optional validation:/test:)"
            )
        return self

    def files(self) -> list[Path]:
        return [p for p in (self.data, self.train, self.validation, self.test) if p is not None]


class Split(_Strict):
    """How one file per language is split, deterministically."""

    validation: float = Field(0.1, ge=0.0, lt=1.0)
    test: float = Field(0.1, ge=0.0, lt=1.0)
    seed: int = 0

    @model_validator(mode="after")
    def _leaves_training_data(self) -> Split:
        if self.validation + self.test >= 1.0:
            raise ValueError("validation + test must leave some data for training")
        return self


class Lora(_Strict):
    r: int = Field(8, ge=1)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: list[str] | Literal["all-linear"] = "all-linear"


class Training(_Strict):
    epochs: float = Field(3.0, gt=0)
    learning_rate: float = Field(2e-4, gt=0)
    batch_size: int = Field(8, ge=1)
    gradient_accumulation: int = Field(1, ge=1)
    max_length: int = Field(128, ge=8)
    seed: int = 0
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"


class MergeSettings(_Strict):
    """How the experts are merged (see `langmerge methods`)."""

    method: MethodName = "ties"
    density: float = Field(1.0, gt=0.0, le=1.0)
    lam: float = Field(1.0, alias="lambda")
    weights: dict[str, float] | None = None  # per language; default 1
    seed: int = 0

    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class Recipe(_Strict):
    """A whole project. See README, section "Recipes"."""

    base: str  # a local model directory or a hub id
    task: Task
    languages: dict[str, LanguageData] = Field(min_length=1)
    split: Split = Split()
    lora: Lora = Lora()
    training: Training = Training()
    merge: MergeSettings = MergeSettings()
    run_dir: Path = Path("runs")

    @field_validator("languages")
    @classmethod
    def _codes(cls, v: dict[str, LanguageData]) -> dict[str, LanguageData]:
        bad = [code for code in v if not LANGUAGE_CODE.match(code)]
        if bad:
            raise ValueError(f"language codes must be BCP 47 tags such as en, de, pt-BR; got {bad}")
        return v

    @model_validator(mode="after")
    def _merge_weights_name_languages(self) -> Recipe:
        unknown = set(self.merge.weights or {}) - set(self.languages)
        if unknown:
            raise ValueError(f"merge.weights names languages the recipe lacks: {sorted(unknown)}")
        return self

    def digest(self) -> str:
        """The recipe hash: what a trained expert depends on besides its data."""
        settings = self.model_dump(mode="json", include={"base", "task", "lora", "training"})
        return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def load_recipe(path: Path) -> Recipe:
    """Read and validate a recipe; relative paths are taken from the recipe's folder."""
    path = Path(path)
    data = read_mapping(path, "recipe", "base:, task:, languages: …")
    recipe = _resolve(validate(Recipe, data, f"recipe {path}"), path.parent)
    for code, lang in recipe.languages.items():
        for f in lang.files():
            if not f.exists():
                raise ConfigError(
                    f"invalid recipe {path}: the data of language {code!r}, {f}, does not exist"
                )
    return recipe


def _resolve(recipe: Recipe, root: Path) -> Recipe:
    def fix(p: Any) -> Any:
        return p if p is None or Path(p).is_absolute() else root / p

    languages = {
        code: lang.model_copy(update={k: fix(getattr(lang, k))
                                      for k in ("data", "train", "validation", "test")})
        for code, lang in recipe.languages.items()
    }  # fmt: skip
    base = recipe.base
    if base.startswith((".", "/")) or (root / base).exists():
        base = str(fix(base))
    return recipe.model_copy(
        update={"languages": languages, "run_dir": fix(recipe.run_dir), "base": base}
    )
