"""Training jobs: one expert per language, or the joint model on every language's data.

Everything a user can get wrong (recipe, data, base model, target modules) is checked before
the registry is opened. A model whose recipe and data hashes match the current one is not
retrained. A job trains in a work folder that keeps its checkpoints: interrupted, the same
command resumes there. The finished adapter is moved into place and recorded, with its cost,
in one registry transaction.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import torch

from langmerge.data.encode import encode, prompt_ids, truncated_share
from langmerge.data.prepare import ProjectData, load_data
from langmerge.errors import ConfigError, DiskFull, is_disk_full
from langmerge.evaluate import health
from langmerge.evaluate.health import DEGENERATE
from langmerge.evaluate.predict import generate, validation_pass, validation_scores
from langmerge.executors import ray
from langmerge.files import parse_size, write_json
from langmerge.models.backbones import (
    load_config,
    load_tokenizer,
    resolve_base,
)
from langmerge.processes import exclusive, rank, world_size
from langmerge.project.recipe import Recipe, primary_metric
from langmerge.project.registry import Registry, TrainedModel
from langmerge.train import statistics
from langmerge.train.trainer import Counts, build_peft_model, fit
from langmerge.workflows.bases import check_recipe_targets, ensure_seed, expert_base, prepared_base

METADATA = "langmerge.json"


@dataclass(frozen=True)
class Continuation:
    """Train an expert further: from the adapter of an earlier version, on these examples."""

    adapter: Path
    examples: list


@dataclass
class Trained:
    """What one `train` request did for one model."""

    kind: str  # expert | joint
    language: str | None
    version: int
    path: Path
    cached: bool  # already trained from this recipe and data: nothing done
    scores: dict
    resumed_from: int | None = None
    wall_s: float = 0.0
    tokens: int = 0
    health: dict = field(default_factory=dict)


def train(
    recipe: Recipe,
    languages: list[str] | None = None,
    joint: bool = False,
    force: bool = False,
    progress: bool = True,
    say: Callable[[str], None] = lambda _: None,
    continue_from: Continuation | None = None,
) -> list[Trained]:
    """Train the experts of `languages` (one after another), or the joint model. With
    `continue_from`, the one expert trains further from an earlier version, on given examples."""
    if not joint and not languages:
        raise ValueError("name the languages to train, or ask for the joint model")
    # a label set taken from the data needs every language's data, whatever is trained
    labels_from_data = recipe.task.kind == "classification" and recipe.task.labels is None
    seeded = not joint and recipe.experts.start == "seed"  # the seed trains on every language
    needed = None if joint or labels_from_data or seeded else languages
    data = load_data(recipe.data_spec(), needed).require_valid()
    for w in data.warnings:
        say(f"warning: {w}")
    check_recipe_targets(load_config(resolve_base(recipe.base, recipe.allow_pickle)), recipe,
                         data.labels)  # fmt: skip
    targets = [None] if joint else languages
    if world_size() > 1 and recipe.executor.kind == "ray":
        raise ConfigError("a job spread over several processes runs with the local executor")
    if rank() > 0:  # one of several processes of one job (torchrun, accelerate launch)
        return _follow(recipe, data, targets, force, continue_from)
    with recipe.rundir.registry() as registry:
        if seeded:
            torch.set_num_threads(_threads(recipe.training.threads))
            ensure_seed(recipe, registry, data, progress, say)
        if recipe.executor.kind == "ray" and continue_from is None:
            return _train_on_ray(recipe, registry, data, targets, force, say)
        if recipe.executor.kind == "ray":
            say("continuing an expert trains here: Ray workers train from the base only")
        torch.set_num_threads(_threads(recipe.training.threads))
        return [_train_one(recipe, registry, data, t, force, progress, say, continue_from)
                for t in targets]  # fmt: skip


def _follow(recipe, data, targets, force, continue_from) -> list[Trained]:
    """Ranks above 0 of a multi-process job: read the same cache entry as rank 0 (read-only)
    and train alongside it; rank 0 alone locks, scores, saves and records."""

    run = recipe.rundir
    if not run.has_registry():  # rank 0 has not created it yet
        run.registry().close()  # (creating it is safe from several processes)
    with run.registry(read_only=True) as registry:
        for target in targets:
            hashes, work = plan(recipe, data, target, continue_from)
            if cached(registry, data, target, hashes, force, lambda _: None) is None:
                fit_and_stage(recipe, data, target, work, False, lambda _: None, Counts(),
                              continue_from, leader=False)  # fmt: skip
    return []


def _threads(asked: int | None) -> int:
    """The recipe's threads, else OMP_NUM_THREADS when set, else the cores this process may use."""
    if asked:
        return asked
    env = os.environ.get("OMP_NUM_THREADS", "")
    return int(env) if env.isdigit() and int(env) > 0 else len(os.sched_getaffinity(0))


def _train_one(
    recipe: Recipe,
    registry: Registry,
    data: ProjectData,
    language: str | None,
    force: bool,
    progress: bool,
    say: Callable[[str], None],
    continue_from: Continuation | None = None,
) -> Trained:
    hashes, work = plan(recipe, data, language, continue_from)
    if (hit := cached(registry, data, language, hashes, force, say)) is not None:
        return hit
    with exclusive(work / "lock", busy_message(data, language)):
        # another process may have finished this very model while we waited for nothing (not
        # in a multi-process job: its other ranks decided on the first check and train now)
        alone = world_size() == 1
        if alone and (hit := cached(registry, data, language, hashes, force, say)) is not None:
            return hit
        return _run_job(recipe, registry, data, language, hashes, work, progress, say,
                        continue_from)  # fmt: skip


def plan(
    recipe: Recipe, data: ProjectData, language: str | None, continue_from: Continuation | None
) -> tuple[tuple[str, str], Path]:
    """The (recipe, data) hashes of the model `language` (None: joint) and its work folder."""
    recipe_hash = recipe.digest("joint" if language is None else "expert")
    data_hash = data.joint_digest() if language is None else data.languages[language].digest
    if continue_from is not None:  # not the model a retrain on this data would make
        data_hash = hashlib.sha256(f"{data_hash}+{continue_from.adapter}".encode()).hexdigest()[:16]
    folder = recipe.rundir.trained(language)
    return (recipe_hash, data_hash), folder / f".train-{recipe_hash}-{data_hash}"


def cached(registry: Registry, data: ProjectData, language: str | None, hashes: tuple[str, str],
           force: bool, say: Callable[[str], None]) -> Trained | None:  # fmt: skip
    """The model already trained from these hashes (unless `force`), or None."""
    kind, _, name = _identity(data, language)
    hit = None if force else registry.find_trained(kind, language, *hashes)
    if hit is None:
        return None
    if not _complete(Path(hit["path"])):
        say(f"{name}: v{hit['version']}'s files are missing from {hit['path']} (deleted or "
            "moved?): training it again")  # fmt: skip
        return None
    say(f"{name}: up to date (v{hit['version']}, {hit['path']}); --force retrains")
    say_health(name, hit["health"], hit["training"], say)
    return Trained(kind, language, hit["version"], Path(hit["path"]), True, hit["scores"],
                   health=hit["health"])  # fmt: skip


def _complete(path: Path) -> bool:
    """Whether a trained model's folder still holds a model (an adapter, or full weights)."""
    return (path / "adapter_config.json").is_file() or (path / "config.json").is_file()


def say_health(name: str, health: dict, training: dict, say: Callable[[str], None]) -> None:
    """The health verdict of a trained model, with what to try when it is degenerate."""

    if not health:
        return
    best, steps = training.get("best_step"), training.get("steps")
    where = f" (weights of step {best} of {steps}, the best on validation)" if best else ""
    if health["verdict"] != DEGENERATE:
        say(f"{name}: healthy{where}")
    else:
        say(f"{name}: DEGENERATE{where}: " + "; ".join(health["problems"]))
        for advice in health["advice"]:
            say(f"  {advice}")
    for warning in health.get("warnings", []):
        say(f"warning: {name}: {warning}")


def busy_message(data: ProjectData, language: str | None) -> str:
    name = _identity(data, language)[2]
    return f"another langmerge process is training {name} in this run directory; wait for it"


def _identity(data: ProjectData, language: str | None) -> tuple[str, list[str], str]:
    """Kind, languages and display name of the model trained for `language` (None: joint)."""
    if language is None:
        return "joint", list(data.languages), "the joint model"
    return "expert", [language], f"expert {language}"


@dataclass
class Staged:
    """A trained adapter saved in its work folder (work/adapter), not yet placed or recorded."""

    path: Path
    base_dir: Path
    scores: dict
    steps: int
    loss: float | None
    resumed_from: int | None
    health: dict = field(default_factory=dict)  # the verdict of evaluate/health.py
    training: dict = field(default_factory=dict)  # steps, the best step, the validation curve


def fit_and_stage(
    recipe: Recipe,
    data: ProjectData,
    language: str | None,
    work: Path,
    progress: bool,
    say: Callable[[str], None],
    counts,
    continue_from: Continuation | None = None,
    leader: bool = True,
) -> Staged | None:
    """Train in `work` (resuming from its checkpoints), score on validation and save the adapter
    in `work`/adapter. No registry here: this part runs in this process or on a Ray worker. In a
    multi-process job only the `leader` scores and saves."""

    _, languages, name = _identity(data, language)
    base_dir = prepared_base(recipe, data.labels) if language is None else expert_base(
        recipe, data.labels)  # fmt: skip
    tokenizer = load_tokenizer(base_dir)

    def encoded(split: str, code: str) -> list[dict]:
        examples = data.languages[code].split(split)
        return encode(examples, tokenizer, recipe.task, data.labels, recipe.training.max_length)

    if continue_from is None:
        train_set = [x for code in languages for x in encoded("train", code)]
        limit = recipe.training.max_length
        for code in languages:
            examples = data.languages[code].split("train")
            if share := truncated_share(examples, tokenizer, recipe.task, limit):
                say(f"{name}: {share:.0%} of {code}'s training texts are longer than "
                    f"training.max_length ({limit} tokens) and are cut")  # fmt: skip
    else:
        train_set = encode(continue_from.examples, tokenizer, recipe.task, data.labels,
                           recipe.training.max_length)  # fmt: skip
    kind = "joint" if language is None else "expert"
    steps = recipe.training.budget(kind, len(train_set), world_size())
    if continue_from is None:
        say(f"{name}: training on {len(train_set)} examples, {steps} optimiser steps")
    else:
        say(f"{name}: training {continue_from.adapter.name} further on "
            f"{len(train_set)} new examples, {steps} optimiser steps")  # fmt: skip
    if steps < FEW_STEPS:
        say(f"warning: {name} gets only {steps} optimiser steps; it may learn nothing: set "
            "training.min_steps or training.steps (per expert and joint)")  # fmt: skip
    validation = {code: encoded("validation", code) for code in languages}
    validation = {code: v for code, v in validation.items() if v}
    start = continue_from.adapter if continue_from else None
    result = fit(base_dir, recipe.fit_settings(), train_set, tokenizer.pad_token_id,
                 work / "checkpoints", progress, counts, start, validation, kind,
                 leader)  # fmt: skip
    if not leader:
        return None
    for problem in result.damaged:
        say(f"warning: {name}: skipped a damaged checkpoint, {problem}")
    if result.resumed_from is not None:
        say(f"{name}: resumed from the checkpoint at step {result.resumed_from}")
    scores = {
        code: validation_scores(result.model, encoded("validation", code), recipe.task.kind,
                                tokenizer.pad_token_id, recipe.evaluation.batch_size)
        for code in languages
    }  # fmt: skip
    training = {"steps": result.steps, "best_step": result.best_step, "curve": result.curve,
                "train_loss": result.loss, "last_train_loss": result.last_loss}  # fmt: skip
    trained_start = continue_from is not None or (  # not an untrained model to compare with
        language is not None and recipe.experts.start == "seed"
    )
    health = check_health(result, recipe, data, languages, tokenizer, scores, trained_start)
    staged = work / "adapter"
    result.model.save_pretrained(staged)
    if kind == "expert" and recipe.statistics.collect:
        # a continued expert trained on the new examples only, but stands for all of them
        seen = train_set if continue_from is None else encoded("train", language)
        collect_statistics(result.model, seen, tokenizer.pad_token_id, recipe,
                           staged / statistics.FOLDER, name, say)  # fmt: skip
    return Staged(staged, Path(base_dir), scores, result.steps, result.loss, result.resumed_from,
                  health, training)  # fmt: skip


def collect_statistics(model, encoded: list[dict], pad_id: int, recipe: Recipe, out: Path,
                       name: str, say: Callable[[str], None]) -> None:  # fmt: skip
    """The input statistics of a trained expert on its training data, kept with it for
    data-aware merges."""
    s = recipe.statistics
    batches = statistics.encoded_batches(encoded, pad_id, recipe.evaluation.batch_size)
    done = statistics.collect(model, batches, out, dtype=s.dtype, budget=parse_size(s.memory),
                              force=True)  # fmt: skip
    say(f"{name}: input statistics for data-aware merges: {statistics.describe(done)}")


def ensure_statistics(recipe: Recipe, experts: dict[str, dict],
                      say: Callable[[str], None]) -> list[str]:  # fmt: skip
    """Collect the input statistics of the experts (language → registry row) that lack them
    (trained before langmerge kept them, or with `statistics.collect: false`), on their
    language's training data; returns those languages."""

    missing = [code for code, e in experts.items()
               if not statistics.present(Path(e["path"]) / statistics.FOLDER)]  # fmt: skip
    if not missing:
        return []
    data = load_data(recipe.data_spec()).require_valid()
    for code in missing:
        e = experts[code]
        base_dir = Path(e["base"])
        tokenizer = load_tokenizer(base_dir)
        examples = data.languages[code].split("train")
        enc = encode(examples, tokenizer, recipe.task, data.labels, recipe.training.max_length)
        model = build_peft_model(
            base_dir, recipe.fit_settings(), tokenizer.pad_token_id, Path(e["path"])
        )
        collect_statistics(model, enc, tokenizer.pad_token_id, recipe,
                           Path(e["path"]) / statistics.FOLDER, f"expert {code}", say)  # fmt: skip
    return missing


FEW_STEPS = 50  # fewer optimiser steps than this: warn that the model may learn nothing
HEALTH_PROMPTS = 16  # generation: validation prompts per language answered for the check


def check_health(result, recipe: Recipe, data: ProjectData, languages: list[str], tokenizer,
                 scores: dict, trained_start: bool) -> dict:  # fmt: skip
    """The health verdict of a freshly trained model on its validation split: its predictions
    per language, its losses against the untrained model's (not for a continued expert or one
    branched from the seed, whose start was trained already)."""

    task, batch = recipe.task, recipe.evaluation.batch_size
    parts = {}
    for code in languages:
        examples = data.languages[code].split("validation")
        if not examples:
            continue
        if task.kind == "classification":
            enc = encode(examples, tokenizer, task, data.labels, recipe.training.max_length)
            found = validation_pass(result.model, enc, task.kind, tokenizer.pad_token_id, batch)
            labels = data.labels
            parts[code] = health.label_problems(
                [labels[i] for i in found["gold"]], [labels[i] for i in found["predicted"]]
            )
        else:
            some = examples[:HEALTH_PROMPTS]
            prompts = [prompt_ids(e.text, tokenizer, task)[-recipe.training.max_length :]
                       for e in some]  # fmt: skip
            answers = generate(result.model, prompts, tokenizer, task.max_new_tokens, batch)
            parts[code] = health.generation_problems(answers, [e.answer for e in some])
    curve = result.curve or []
    untrained = curve[0] if curve and curve[0]["step"] == 0 and not trained_start else {}
    metric = primary_metric(recipe) if task.kind == "classification" else None
    losses = [s["loss"] for s in scores.values() if s]
    kept = next((p for p in curve if p["step"] == result.best_step), {})
    loss = health.loss_problems(
        result.last_loss if result.best_step == result.steps else None,
        sum(losses) / len(losses) if losses else None,
        untrained.get("loss"),
        kept.get(metric) if metric else None,
        untrained.get(metric) if metric else None,
    )
    return health.verdict(parts, loss)


def record_trained(
    registry: Registry,
    recipe: Recipe,
    data: ProjectData,
    language: str | None,
    hashes: tuple[str, str],
    staged: Staged,
    job: int,
    cost,
    continue_from: Continuation | None = None,
    ended: float | None = None,
) -> TrainedModel:
    """Move the staged adapter into place as the next version and record it, closing `job`,
    in one registry transaction (`ended`: when the job ended where it ran)."""
    kind, languages, _ = _identity(data, language)
    recipe_hash, data_hash = hashes

    def place(version: int) -> str:
        write_json(staged.path / METADATA, {
            "kind": kind, "languages": languages, "version": version, "base": recipe.base,
            "base_dir": str(staged.base_dir), "task": recipe.task.model_dump(),
            "labels": data.labels, "recipe_hash": recipe_hash, "data_hash": data_hash,
            "steps": staged.steps, "train_loss": staged.loss, "validation": staged.scores,
            "health": staged.health, "best_step": staged.training.get("best_step"),
            "continued_from": str(continue_from.adapter) if continue_from else None,
        })  # fmt: skip
        final = staged.path.parent.parent / f"v{version}"
        if final.exists():  # no row refers to it: left by a crash before its registry write
            shutil.rmtree(final)
        staged.path.rename(final)
        return str(final)

    record = TrainedModel(kind, language, languages, str(staged.base_dir), recipe_hash, data_hash,
                          staged.scores, health=staged.health,
                          training=staged.training)  # fmt: skip
    return registry.finish_training(job, cost, record, place, ended)


def _run_job(
    recipe: Recipe,
    registry: Registry,
    data: ProjectData,
    language: str | None,
    hashes: tuple[str, str],
    work: Path,
    progress: bool,
    say: Callable[[str], None],
    continue_from: Continuation | None = None,
) -> Trained:
    """Train here, then place and record the model. A failed job keeps the cost it ran up."""

    kind, languages, name = _identity(data, language)
    counts = Counts()
    try:
        with recipe.rundir.job(registry, kind, languages, hashes, counts) as job:
            staged = fit_and_stage(recipe, data, language, work, progress, say, counts,
                                   continue_from)  # fmt: skip
            record = record_trained(registry, recipe, data, language, hashes, staged, job.id,
                                    job.cost(), continue_from)  # fmt: skip
    except BaseException as e:
        if isinstance(e, KeyboardInterrupt):
            say(f"{name}: interrupted; the same command resumes from the last checkpoint")
        if is_disk_full(e):
            raise DiskFull(
                f"{name}: the disk is full ({e}); free space under {recipe.run_dir} and run the "
                "same command again: it resumes from the last checkpoint"
            ) from None
        raise
    shutil.rmtree(work, ignore_errors=True)
    wall = job.wall_s()
    say(f"{name}: v{record.version} in {record.path} ({wall:.1f} s, {counts.tokens} tokens)")
    say_health(name, staged.health, staged.training, say)
    return Trained(kind, language, record.version, Path(record.path), False, staged.scores,
                   staged.resumed_from, wall, counts.tokens, staged.health)  # fmt: skip


def attempt(recipe: Recipe, data, language: str | None, work: str, threads: int) -> ray.Outcome:
    """One training job on a Ray worker: train, score and stage the adapter in `work`; a
    failure of the job comes back in the outcome."""
    counts = Counts()
    return ray.on_worker(
        recipe.run_dir, threads,
        lambda: fit_and_stage(recipe, data, language, Path(work), False, lambda _: None, counts),
        lambda: {"tokens": counts.tokens, "examples": counts.examples, "flops": counts.flops},
    )  # fmt: skip


def _train_on_ray(
    recipe: Recipe,
    registry: Registry,
    data: ProjectData,
    targets: list[str | None],
    force: bool,
    say: Callable[[str], None],
) -> list[Trained]:
    """Train `targets` (languages; None: the joint model) as Ray tasks running `attempt`; the
    driver records each outcome as it arrives."""
    results, todo = {}, {}
    for target in targets:
        hashes, work = plan(recipe, data, target, None)
        hit = cached(registry, data, target, hashes, force, say)
        if hit is not None:
            results[target] = hit
        else:
            todo[target] = (hashes, work)
    if not todo:
        return [results[t] for t in targets]

    def record(target, outcome: ray.Outcome) -> bool:
        trained = _record(registry, recipe, data, target, todo[target], outcome, say)
        if trained is not None:
            results[target] = trained
        return trained is not None

    with ExitStack() as locks:
        for target, (_, work) in todo.items():
            locks.enter_context(exclusive(work / "lock", busy_message(data, target)))
        for target in list(todo):  # another process may have finished one meanwhile
            hit = cached(registry, data, target, todo[target][0], force, say)
            if hit is not None:
                results[target] = hit
                del todo[target]
        ex = recipe.executor
        data_ref, threads = ray.put(data), max(1, int(ex.cpus))
        jobs = {t: (recipe, data_ref, t, str(work), threads) for t, (_, work) in todo.items()}
        say(f"{len(jobs)} training job(s) on Ray ({ex.cpus:g} CPU, {ex.gpus:g} GPU each)")
        ray.run_on_ray(attempt, jobs, ex, recipe.run_dir, record,
                       lambda t: _identity(data, t)[2], "model(s)", say,
                       already=len(results))  # fmt: skip
    return [results[t] for t in targets]


def _record(registry, recipe, data, target, planned, outcome: ray.Outcome, say) -> Trained | None:
    """One ledger row for a Ray attempt; the model placed and recorded when it worked."""
    kind, languages, name = _identity(data, target)
    hashes, work = planned
    staged = outcome.value
    record, error = recipe.rundir.record_remote(
        registry, kind, languages, hashes, outcome,
        lambda job: record_trained(registry, recipe, data, target, hashes, staged, job,
                                   outcome.cost, ended=outcome.ended),
    )  # fmt: skip
    if outcome.error is not None:
        say(f"{name}: failed on {outcome.worker or 'a worker'}: {outcome.error.splitlines()[0]}")
        return None
    if error is not None:
        outcome.error = error
        say(f"{name}: {error}")
        return None
    shutil.rmtree(work, ignore_errors=True)
    wall = outcome.ended - outcome.started
    say(f"{name}: v{record.version} in {record.path} ({wall:.1f} s on {outcome.worker}, "
        f"{outcome.cost.tokens} tokens)")  # fmt: skip
    say_health(name, staged.health, staged.training, say)
    return Trained(kind, target, record.version, Path(record.path), False, staged.scores,
                   staged.resumed_from, wall, outcome.cost.tokens, staged.health)  # fmt: skip
