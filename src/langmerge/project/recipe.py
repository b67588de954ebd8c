"""The recipe: one YAML file that describes a project (base, task, languages and their data, LoRA
and training settings, merge settings, run directory), validated up front with pydantic.

Relative paths resolve against the recipe's folder. Errors name the field and say what is
allowed. Reading a recipe reads neither data nor model nor run directory: `project.state` adds
what the run directory changed (added data, a sweep's choice) and checks the data files exist.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any, Literal

from pydantic import ConfigDict, Field, PrivateAttr, field_validator, model_validator

from langmerge.data.spec import DataSpec, LanguageData, Split, Task
from langmerge.errors import ConfigError
from langmerge.executors.settings import Executor, memory_size
from langmerge.languages import problem as language_problem
from langmerge.merge.config import MethodName
from langmerge.merge.params import Density
from langmerge.merge.regmean import ALPHA
from langmerge.models.embedded import embedded_model
from langmerge.project.rundir import RunDir
from langmerge.train.settings import TASK_DEFAULTS, FitSettings, Lora, Training
from langmerge.yamlfile import Strict, read_mapping, validate


class MergeVariant(Strict):
    """One merge `langmerge run` makes and evaluates; unset values come from `merge:`."""

    method: MethodName
    density: Density | None = None
    lam: float | None = Field(None, alias="lambda")
    alpha: float | None = Field(None, gt=0.0, le=1.0)  # regmean

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    def name(self) -> str:
        """A short name, unique within a run: ties, dare_ties-d0.5, regmean-a0.5, …"""
        parts = [self.method]
        if self.density is not None:
            parts.append(f"d{self.density:g}")
        if self.lam is not None:
            parts.append(f"l{self.lam:g}")
        if self.alpha is not None:
            parts.append(f"a{self.alpha:g}")
        return "-".join(parts)


DEFAULT_VARIANTS = [
    MergeVariant(method="linear"),
    MergeVariant(method="ties", density=1.0),
    MergeVariant(method="dare_ties", density=0.5),
    MergeVariant(method="knots_ties", density=1.0),
    MergeVariant(method="regmean"),
]


class MergeSettings(Strict):
    """How the experts are merged (see `langmerge methods`)."""

    method: MethodName = "ties"
    density: Density = 1.0
    lam: float = Field(1.0, alias="lambda")
    weights: dict[str, float] | None = None  # per language; default 1
    seed: int = 0
    alpha: float = Field(ALPHA, gt=0.0, le=1.0)  # regmean: share of off-diagonal Gram entries
    fallback: MethodName = "linear"  # regmean: the method for tensors that are no linear map
    compare: list[MergeVariant] = Field(default_factory=lambda: list(DEFAULT_VARIANTS))
    allow_degenerate: bool = False  # merge experts whose health check failed (never served)

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    @field_validator("compare", mode="before")
    @classmethod
    def _names_or_mappings(cls, v: Any) -> Any:
        # `compare: [linear, ties]` is short for `[{method: linear}, {method: ties}]`
        return [{"method": x} if isinstance(x, str) else x for x in v] if isinstance(v, list) else v

    @model_validator(mode="after")
    def _distinct(self) -> MergeSettings:
        names = [m.name() for m in self.compare]
        if len(set(names)) != len(names):
            raise ValueError(f"compare lists the same merge twice: {names}")
        return self


class SweepMethod(Strict):
    """One method of the sweep's grid and the densities it is tried at."""

    method: MethodName
    density: list[Density] = Field(default_factory=lambda: [1.0], min_length=1)

    @field_validator("density", mode="before")
    @classmethod
    def _one_or_many(cls, v: Any) -> Any:
        return [v] if isinstance(v, int | float) else v


DENSITIES = [0.2, 0.5, 0.8, 1.0]
DEFAULT_GRID = [
    SweepMethod(method="linear"),
    SweepMethod(method="ties", density=DENSITIES),
    SweepMethod(method="dare_ties", density=DENSITIES),
    SweepMethod(method="knots_ties"),
    SweepMethod(method="regmean"),
]


class Sweep(Strict):
    """`langmerge sweep`: the grid of merges tried on validation data, and how one is chosen.
    λ applies to every method but slerp; a method's densities only when it sparsifies; the extra
    weightings only to methods that take weights."""

    grid: list[SweepMethod] = Field(default_factory=lambda: list(DEFAULT_GRID), min_length=1)
    lam: list[float] = Field(default_factory=lambda: [0.8, 1.0, 1.2], alias="lambda", min_length=1)
    alpha: list[float] = Field(default_factory=lambda: [0.5, 0.9, 1.0], min_length=1)  # regmean
    weights: list[dict[str, float]] = Field(default_factory=list)  # alternatives to equal weights
    select: Literal["mean", "worst"] = "mean"  # by the languages' mean or the worst language

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    @field_validator("grid", mode="before")
    @classmethod
    def _names_or_mappings(cls, v: Any) -> Any:
        return [{"method": x} if isinstance(x, str) else x for x in v] if isinstance(v, list) else v

    @field_validator("lam")
    @classmethod
    def _positive(cls, v: list[float]) -> list[float]:
        if any(not lam > 0 for lam in v):
            raise ValueError(f"the sweep's λ values must be above 0, got {v}")
        return v

    @field_validator("alpha")
    @classmethod
    def _share(cls, v: list[float]) -> list[float]:
        if any(not 0 < a <= 1 for a in v):
            raise ValueError(f"the sweep's alpha values must be in (0, 1], got {v}")
        return v


class Guard(Strict):
    """Maintenance's regression guard: how far a language other than the updated one may drop
    (in points of the primary metric ×100) before a new merge is kept out of service; by default
    only a drop that is also significant (a paired test at `alpha`) blocks, a larger one that is
    not passes with a warning."""

    max_drop: float = Field(1.0, ge=0.0)
    require_significance: bool = True
    alpha: float = Field(0.05, gt=0.0, lt=1.0)


METRICS = {
    "classification": ("accuracy", "macro_f1"),
    "generation": ("rougeL", "rouge1", "rouge2", "token_f1", "exact_match"),
    "labels": ("accuracy", "macro_f1"),  # generation with a label set
}


class Evaluation(Strict):
    """How `langmerge run` evaluates and reports."""

    split: Literal["test", "validation"] = "test"
    metric: str | None = None  # the primary metric (default: accuracy for labels, else rougeL)
    batch_size: int = Field(32, ge=1)
    workers: int = Field(0, ge=0)  # parallel workers for the cost projection (0: one per language)
    alpha: float = Field(0.05, gt=0.0, lt=1.0)  # significance level of paired comparisons


class Experts(Strict):
    """Where each language's expert starts training: from the base, or from a seed, a short
    joint warm-up on every language's training data (branch-train-merge). Experts branched
    from the seed share what it learned; merges take their deltas against the seed, and
    maintenance branches a retrained or added language from the same seed."""

    start: Literal["base", "seed"] = "base"
    seed_steps: int | None = Field(None, ge=1)  # the warm-up's optimiser steps, or …
    seed_epochs: float = Field(1.0, gt=0.0)  # … its length in epochs of all languages' data

    def seed_budget(self, examples: int, batch: int) -> int:
        """The seed's optimiser steps on `examples` training examples in batches of `batch`."""
        if self.seed_steps is not None:
            return self.seed_steps
        return max(1, math.ceil(self.seed_epochs * math.ceil(examples / batch)))


class Statistics(Strict):
    """The input statistics kept with each expert for data-aware merges (regmean): collected in
    one forward pass over the expert's training data right after it is trained."""

    collect: bool = True  # after training; a data-aware merge collects missing ones itself
    dtype: Literal["float32", "bfloat16"] = "float32"  # storage precision of the matrices
    memory: str = "8GB"  # float32 matrices held at once; more passes over the data if exceeded

    @field_validator("memory")
    @classmethod
    def _size(cls, v: str) -> str:
        return memory_size(v)


class Recipe(Strict):
    """A whole project. See README, section "Recipes"."""

    base: str  # a local model directory, a hub id, or `embedded` (see langmerge.models.embedded)
    task: Task
    languages: dict[str, LanguageData] = Field(min_length=1)
    data: LanguageData | None = None  # one source for all languages, with a language column
    language_field: str = "language"
    split_field: str | None = None  # a column of `data:` naming each record's split
    split: Split = Split()
    min_examples: int = Field(10, ge=1)  # fewer training examples in a language is an error
    lora: Lora = Lora()
    training: Training = Training()
    merge: MergeSettings = MergeSettings()
    sweep: Sweep = Sweep()
    executor: Executor = Executor()
    evaluation: Evaluation = Evaluation()
    guard: Guard = Guard()
    statistics: Statistics = Statistics()
    experts: Experts = Experts()
    run_dir: Path = Path("runs")
    allow_pickle: bool = False  # load a base stored only as pickle (can run code: trusted only)
    _state: Any = PrivateAttr(None)  # what the run directory changed (project.state.Applied)
    _base_written: str | None = PrivateAttr(None)  # `base` as the file says, before resolving

    def base_key(self) -> str:
        """The base as the recipe file names it: what the hashes use, so that a project (recipe,
        base and run directory) moved elsewhere keeps its trained models."""
        return self._base_written or self.base

    @field_validator("languages", mode="before")
    @classmethod
    def _codes(cls, v: Any) -> Any:
        if isinstance(v, list):  # `languages: [en, de]` with a shared `data:`
            v = {("no" if code is False else code): {} for code in v}
        if isinstance(v, dict):
            # YAML 1.1 reads a bare `no:` (Norwegian) as false
            v = {("no" if code is False else code): spec for code, spec in v.items()}
            bad = [p for code in v if (p := language_problem(str(code)))]
            if bad:
                raise ValueError("; ".join(bad))
            v = {code: {} if spec is None else spec for code, spec in v.items()}
        return v

    @field_validator("base")
    @classmethod
    def _known_embedded(cls, v: str) -> str:
        try:
            embedded_model(v)
        except ConfigError as e:
            raise ValueError(str(e)) from None
        return v

    @model_validator(mode="after")
    def _task_defaults(self) -> Recipe:
        for key, value in TASK_DEFAULTS[self.task.kind].items():
            if getattr(self.training, key) is None:
                setattr(self.training, key, value)
        return self

    @model_validator(mode="after")
    def _every_language_has_data(self) -> Recipe:
        if self.data is None:
            missing = [code for code, lang in self.languages.items() if not lang.given()]
            if missing:
                raise ValueError(
                    f"languages {missing} have no data: give each one `data:`, `train:` or "
                    "`hub:`, or give the recipe one `data:` with a language column"
                )
        elif not self.data.given():
            raise ValueError("data: give `data:`, `train:` or `hub:`")
        return self

    @model_validator(mode="after")
    def _known_metric(self) -> Recipe:
        kind = "labels" if self.task.kind == "generation" and self.task.labels else self.task.kind
        metric = self.evaluation.metric
        if metric is not None and metric not in METRICS[kind]:
            raise ValueError(
                f"evaluation.metric: {metric!r} is not a metric of this task; "
                f"choose one of {', '.join(METRICS[kind])}"
            )
        return self

    @model_validator(mode="after")
    def _merge_weights_name_languages(self) -> Recipe:
        named = set(self.merge.weights or {}).union(*self.sweep.weights)
        unknown = named - set(self.languages)
        if unknown:
            raise ValueError(
                f"merge.weights or sweep.weights name languages the recipe lacks: {sorted(unknown)}"
            )
        return self

    @property
    def rundir(self) -> RunDir:
        """The run directory: its layout, registry, serving lock and jobs."""
        return RunDir(self.run_dir)

    def digest(self, kind: str = "expert") -> str:
        """The recipe hash: what a trained expert (or the `joint` model) depends on besides its
        data.

        Settings that change only how fast training runs (threads, checkpoint steps) are left
        out, so changing them does not retrain anything; the experts' start (base or seed)
        concerns the experts only."""
        include = {"base", "task", "lora", "training"}
        if kind == "expert" and self.experts.start == "seed":  # a base start: hashes as before
            include.add("experts")
        settings = self.model_dump(
            mode="json",
            include=include,
            exclude={"training": {"threads", "checkpoint_steps"}, "task": {"max_new_tokens"}},
        )
        settings["base"] = self.base_key()
        return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]

    def data_spec(self) -> DataSpec:
        """What reading this project's examples needs, for `data.prepare.load_data`."""
        return DataSpec(self.languages, self.task, self.split, self.data, self.language_field,
                        self.split_field, self.min_examples)  # fmt: skip

    def fit_settings(self) -> FitSettings:
        """What training one model needs besides its data, for `train.trainer.fit`."""
        metric = primary_metric(self) if self.task.kind == "classification" else None
        return FitSettings(self.task.kind, self.lora, self.training, self.evaluation.batch_size,
                           metric)  # fmt: skip


def primary_metric(recipe: Recipe) -> str:
    """The metric tables lead with: the recipe's `evaluation.metric`, else accuracy for labels
    (also generated ones), else ROUGE-L."""
    if recipe.evaluation.metric:
        return recipe.evaluation.metric
    if recipe.task.kind == "classification" or recipe.task.labels:
        return "accuracy"
    return "rougeL"


def read_recipe(path: Path) -> Recipe:
    """Read and validate a recipe file, relative paths taken from its folder: the recipe as
    written. `project.state.load_recipe` adds what the run directory changed since."""
    path = Path(path).absolute()
    data = read_mapping(path, "recipe", "base:, task:, languages: …")
    return _resolve(validate(Recipe, data, f"recipe {path}"), path.parent)


def _resolve(recipe: Recipe, root: Path) -> Recipe:
    def fix(p: Any) -> Any:
        return p if p is None or Path(p).is_absolute() else root / p

    def fix_data(lang: LanguageData) -> LanguageData:
        keys = ("data", "train", "validation", "test")
        update = {k: fix(getattr(lang, k)) for k in keys}
        return lang.model_copy(update={**update, "more": [fix(p) for p in lang.more]})

    languages = {code: fix_data(lang) for code, lang in recipe.languages.items()}
    base = recipe.base
    if embedded_model(base) is not None:
        pass  # the embedded backbone, not a path
    elif base.startswith((".", "/")) or (root / base).exists():
        base = str(fix(base))
    out = recipe.model_copy(
        update={
            "languages": languages,
            "data": recipe.data and fix_data(recipe.data),
            "run_dir": fix(recipe.run_dir),
            "base": base,
        }
    )
    out._base_written = recipe.base_key()
    return out
