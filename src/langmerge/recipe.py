"""The recipe: one YAML file that describes a project (base, task, languages and their data, LoRA
and training settings, merge settings, run directory), validated up front with pydantic.

Relative paths resolve against the recipe's folder. Errors name the field and say what is
allowed. Loading a recipe checks that the data files exist but reads neither data nor model.
"""

from __future__ import annotations

import hashlib
import json
import math
import string
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator

from langmerge.embedded import embedded_model
from langmerge.errors import ConfigError
from langmerge.languages import problem as language_problem
from langmerge.merge.config import MethodName
from langmerge.merge.regmean import ALPHA
from langmerge.registry import read_additions, read_sweep_choice
from langmerge.yamlfile import read_mapping, validate


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


class HubData(_Strict):
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


class LanguageData(_Strict):
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


class StepBudget(_Strict):
    """Optimiser steps per job kind: an expert sees only its language's data, so at equal epochs
    it takes 1/N of the joint model's steps."""

    expert: int | None = Field(None, ge=1)
    joint: int | None = Field(None, ge=1)


# The training settings whose default depends on the task (docs/training.md says why):
# a classification head trained from scratch with the backbone's LoRA needs a higher rate and
# more passes (kept honest by the best checkpoint) than generation, whose LoRA only nudges an
# LLM that already writes text.
TASK_DEFAULTS = {
    "classification": {"learning_rate": 1e-3, "epochs": 10.0},
    "generation": {"learning_rate": 2e-4, "epochs": 3.0},
}


class Training(_Strict):
    """How a model trains. The defaults are chosen to train a healthy model on data nobody tuned
    them for (docs/training.md says why each is what it is)."""

    epochs: float | None = Field(None, gt=0)  # default by task kind: TASK_DEFAULTS
    steps: int | StepBudget | None = None  # optimiser steps instead of epochs (all or per kind)
    min_steps: int = Field(200, ge=0)  # at least this many steps, whatever the epochs give
    learning_rate: float | None = Field(None, gt=0)  # default by task kind: TASK_DEFAULTS
    scheduler: Literal["linear", "cosine", "constant"] = "linear"
    batch_size: int = Field(8, ge=1)
    gradient_accumulation: int = Field(1, ge=1)
    max_length: int = Field(128, ge=8)
    seed: int = 0
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    warmup_ratio: float = Field(0.1, ge=0.0, lt=1.0)
    weight_decay: float = Field(0.0, ge=0.0)
    group_by_length: bool = True  # batches of similar length: little padding, same loss
    best_checkpoint: bool = True  # keep the step with the best validation score, not the last
    eval_steps: int | None = Field(None, ge=1)  # validation every N steps (default: each epoch)
    checkpoint_steps: int = Field(200, ge=1)  # an interrupted job resumes from the last one
    threads: int | None = Field(None, ge=1)  # CPU threads (default: OMP_NUM_THREADS, else all)

    def budget(self, kind: str, examples: int, processes: int = 1) -> int:
        """The optimiser steps of a `kind` job (expert or joint) on `examples` examples, each
        step taking a batch on each of `processes` processes."""
        batch = self.batch_size * self.gradient_accumulation * processes
        per_epoch = math.ceil(examples / batch)
        fixed = self.steps if isinstance(self.steps, int) else getattr(self.steps, kind, None)
        if fixed is not None:
            return fixed
        return max(self.min_steps, math.ceil(self.epochs * per_epoch), 1)


def memory_size(v: str) -> str:
    """`v` if it is a size such as 8GB or 512MB, else the error pydantic reports."""
    from langmerge.merge.writer import parse_size

    try:
        size = parse_size(v)
    except Exception:
        size = 0
    if size <= 0:
        raise ValueError(f"memory: give a size such as 8GB or 512MB, not {v!r}")
    return v


class Executor(_Strict):
    """Where training jobs run: here one after another (`local`), or as Ray tasks (`ray`), in
    parallel across a machine or a cluster. The run directory must then be on storage every
    node sees at the same path; the registry is written by the driver alone."""

    kind: Literal["local", "ray"] = "local"
    address: str | None = (
        None  # ray: a running cluster (`auto`, `ray://host:10001`); none: start one here
    )
    cpus: float = Field(1.0, gt=0)  # per job (also its torch threads)
    gpus: float = Field(0.0, ge=0)  # per job
    memory: str | None = None  # per job, e.g. 8GB (Ray schedules by it)
    retries: int = Field(2, ge=0)  # a failed job is tried again this many times

    @field_validator("memory")
    @classmethod
    def _size(cls, v: str | None) -> str | None:
        return v if v is None else memory_size(v)


class MergeVariant(_Strict):
    """One merge `langmerge run` makes and evaluates; unset values come from `merge:`."""

    method: MethodName
    density: float | None = Field(None, gt=0.0, le=1.0)
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


class MergeSettings(_Strict):
    """How the experts are merged (see `langmerge methods`)."""

    method: MethodName = "ties"
    density: float = Field(1.0, gt=0.0, le=1.0)
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


class SweepMethod(_Strict):
    """One method of the sweep's grid and the densities it is tried at."""

    method: MethodName
    density: list[float] = Field(default_factory=lambda: [1.0], min_length=1)

    @field_validator("density", mode="before")
    @classmethod
    def _one_or_many(cls, v: Any) -> Any:
        return [v] if isinstance(v, int | float) else v

    @field_validator("density")
    @classmethod
    def _in_range(cls, v: list[float]) -> list[float]:
        bad = [d for d in v if not 0.0 < d <= 1.0]
        if bad:
            raise ValueError(f"densities must be in (0, 1], got {bad}")
        return v


DENSITIES = [0.2, 0.5, 0.8, 1.0]
DEFAULT_GRID = [
    SweepMethod(method="linear"),
    SweepMethod(method="ties", density=DENSITIES),
    SweepMethod(method="dare_ties", density=DENSITIES),
    SweepMethod(method="knots_ties"),
    SweepMethod(method="regmean"),
]


class Sweep(_Strict):
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


class Guard(_Strict):
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


class Evaluation(_Strict):
    """How `langmerge run` evaluates and reports."""

    split: Literal["test", "validation"] = "test"
    metric: str | None = None  # the primary metric (default: accuracy for labels, else rougeL)
    batch_size: int = Field(32, ge=1)
    workers: int = Field(0, ge=0)  # parallel workers for the cost projection (0: one per language)
    alpha: float = Field(0.05, gt=0.0, lt=1.0)  # significance level of paired comparisons


class Experts(_Strict):
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


class Statistics(_Strict):
    """The input statistics kept with each expert for data-aware merges (regmean): collected in
    one forward pass over the expert's training data right after it is trained."""

    collect: bool = True  # after training; a data-aware merge collects missing ones itself
    dtype: Literal["float32", "bfloat16"] = "float32"  # storage precision of the matrices
    memory: str = "8GB"  # float32 matrices held at once; more passes over the data if exceeded

    @field_validator("memory")
    @classmethod
    def _size(cls, v: str) -> str:
        return memory_size(v)


class Recipe(_Strict):
    """A whole project. See README, section "Recipes"."""

    base: str  # a local model directory, a hub id, or `embedded` (see langmerge.embedded)
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
    _sweep: dict | None = PrivateAttr(None)  # the sweep whose choice replaced `merge:` settings
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

    def source(self, language: str) -> LanguageData:
        """Where `language`'s data comes from (its own entry, or the shared `data:`)."""
        own = self.languages[language]
        return own if own.given() or self.data is None else self.data


def load_recipe(path: Path) -> Recipe:
    """Read and validate a recipe; relative paths are taken from the recipe's folder."""
    path = Path(path).absolute()
    data = read_mapping(path, "recipe", "base:, task:, languages: …")
    recipe = _resolve(validate(Recipe, data, f"recipe {path}"), path.parent)
    for added in read_additions(recipe.run_dir):  # data that maintenance added
        recipe = with_data(recipe, added["language"], Path(added["path"]))
    recipe = with_sweep_choice(recipe, read_sweep_choice(recipe.run_dir))
    sources = {code: recipe.source(code) for code in recipe.languages}
    for code, lang in sources.items():
        for f in lang.files():
            if not f.exists():
                whose = f"language {code!r}" if lang is not recipe.data else "all languages"
                raise ConfigError(
                    f"invalid recipe {path}: the data of {whose}, {f}, does not exist"
                )
    return recipe


def with_data(recipe: Recipe, language: str, path: Path) -> Recipe:
    """The recipe with the data file `path` added to `language` (a new language gets it as its
    only data); added data is split like `data:`."""
    languages = dict(recipe.languages)
    if language in languages:
        lang = languages[language]
        if path in lang.files():  # added before (a rerun)
            return recipe
        languages[language] = lang.model_copy(update={"more": [*lang.more, path]})
    else:
        languages[language] = LanguageData(data=path)
    return recipe.model_copy(update={"languages": languages})


CHOSEN = ("method", "density", "lam", "alpha", "weights")  # the merge settings a sweep chooses


def merge_settings(recipe: Recipe) -> dict:
    """The recipe file's own choice of merge (method, density, λ, weights), as JSON values."""
    if recipe._sweep is not None:
        return recipe._sweep["recipe_merge"]
    return recipe.merge.model_dump(mode="json", include=set(CHOSEN))


def with_sweep_choice(recipe: Recipe, sweep: dict | None) -> Recipe:
    """The recipe with the merge settings `langmerge sweep` chose, unless the recipe file's
    `merge:` settings changed since that sweep: then the file's edit wins."""
    if sweep is None or sweep.get("recipe_merge") != merge_settings(recipe):
        return recipe
    choice = sweep["choice"]  # (a sweep made before regmean chose no alpha)
    merge = recipe.merge.model_copy(
        update={k: choice.get(k, getattr(recipe.merge, k)) for k in CHOSEN}
    )
    out = recipe.model_copy(update={"merge": merge})
    out._sweep = sweep
    return out


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
