"""Evaluating one model per language: predictions on a split, the task's metrics, one ledger row
and the metrics in the registry. A model already evaluated on exactly this data is not
evaluated again."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable

from langmerge.data.encode import encode, prompt_ids
from langmerge.data.prepare import Example, ProjectData, load_data
from langmerge.errors import ConfigError, InputError
from langmerge.evaluate import health, metrics, stats
from langmerge.evaluate.predict import generate, predict_classes
from langmerge.executors import ray
from langmerge.project.recipe import Recipe
from langmerge.project.registry import Registry
from langmerge.workflows.models import ModelRef, load, resolve

PER_EXAMPLE = "per_example"  # metrics' key of each example's prediction and primary score


def per_example(scores: dict | None, metric: str) -> list | None:
    """Each example's `metric` in an evaluation's metrics (None when recorded without them)."""
    return ((scores or {}).get(PER_EXAMPLE) or {}).get(metric)


def interval(scores: dict, metric: str) -> tuple[float, float] | None:
    """The 95% bootstrap interval of `metric` from an evaluation's per-example scores (None for
    evaluations recorded without them)."""
    values = per_example(scores, metric)
    return stats.interval(values) if values else None


def with_interval(scores: dict | None, metric: str) -> str:
    """ "0.744 (0.59–0.87)": a score and its 95% interval, for tables."""
    if not scores:
        return "—"
    bounds = interval(scores, metric)
    value = f"{scores[metric]:.3f}"
    return value if bounds is None else f"{value} ({bounds[0]:.2f}–{bounds[1]:.2f})"


def evaluate(
    recipe: Recipe,
    ref: str,
    languages: list[str] | None = None,
    split: str | None = None,
    data: ProjectData | None = None,
    force: bool = False,
    say: Callable[[str], None] = lambda _: None,
) -> dict[str, dict]:
    """Metrics of the model `ref` (base, joint, expert:LANG, merged:NAME or a directory) on each
    language's `split` (default: the recipe's evaluation split); language → metrics."""
    return evaluate_all(recipe, [(ref, languages)], split, data, force, say)[0]


def evaluate_all(
    recipe: Recipe,
    requests: list[tuple[str, list[str] | None]],
    split: str | None = None,
    data: ProjectData | None = None,
    force: bool = False,
    say: Callable[[str], None] = lambda _: None,
) -> list[dict[str, dict]]:
    """Several evaluations (model reference, languages or None for all): those the registry
    lacks run one after another here, or in parallel as Ray tasks with the Ray executor."""
    split = split or recipe.evaluation.split
    data = data or load_data(recipe.data_spec()).require_valid()
    plans = []
    for ref, languages in requests:
        codes = languages or list(data.languages)
        require_split(data, codes, split)
        plans.append((resolve(recipe, ref, data.labels), codes))
    keys = {c: evaluation_key(recipe, data.languages[c].split_digests[split])
            for _, cs in plans for c in cs}  # fmt: skip
    with recipe.rundir.registry() as registry:
        results: list[dict[str, dict]] = []
        todo = []
        for i, (model_ref, codes) in enumerate(plans):
            hits = {}
            for code in [] if force else codes:
                hit = registry.evaluation(model_ref.name, code, split, keys[code])
                if hit is not None:
                    hits[code] = hit
            results.append(hits)
            if missing := [c for c in codes if c not in hits]:
                todo.append((i, model_ref, missing))
        if todo and recipe.executor.kind == "ray":
            for i, found in _evaluate_on_ray(recipe, registry, data, todo, split, keys,
                                             say).items():  # fmt: skip
                results[i].update(found)
        else:
            for i, model_ref, missing in todo:
                model, tokenizer = load(
                    model_ref, recipe, data.labels
                )  # mistakes: before the ledger
                results[i].update(_run(recipe, registry, data, model_ref, model, tokenizer,
                                       missing, split, keys, say))  # fmt: skip
        return [{c: results[i][c] for c in codes} for i, (_, codes) in enumerate(plans)]


def require_split(data: ProjectData, codes: list[str], split: str) -> None:
    """Refuse unknown languages, unknown splits and languages without examples in `split`."""
    if split not in ("test", "validation"):
        raise ConfigError(f"the evaluation split must be test or validation, not {split!r}")
    unknown = [c for c in codes if c not in data.languages]
    if unknown:
        raise InputError(f"the recipe has no language {', '.join(unknown)}")
    empty = [c for c in codes if not data.languages[c].split(split)]
    if empty:
        raise InputError(
            f"{', '.join(empty)} {'has' if len(empty) == 1 else 'have'} no {split} examples: "
            f"give a {split} file, or set split.{split} above 0"
        )


def evaluation_health(found: dict[str, dict], data: ProjectData, split: str) -> dict:
    """A model's health verdict from its evaluation (language → metrics with per-example
    predictions): labels collapsed to one, or empty or identical generated answers."""
    parts = {}
    for code, m in found.items():
        each = (m or {}).get(PER_EXAMPLE) or {}
        gold = [e.answer for e in data.languages[code].split(split)]
        if len(each.get("predicted") or []) == len(gold):
            predicted = ["(unparseable)" if p is None else p for p in each["predicted"]]
            parts[code] = health.label_problems(gold, predicted, f"{split} texts")
        elif len(each.get("generated") or []) == len(gold):
            parts[code] = health.generation_problems(each["generated"], gold, f"{split} prompts")
    return health.verdict(parts)


def evaluation_key(recipe: Recipe, data_hash: str) -> str:
    """What an evaluation's result depends on besides the model: the examples (the hash of the
    split it scores) and the settings that turn them into inputs and answers (task, max length,
    generation length)."""
    settings = json.dumps(
        [data_hash, recipe.task.model_dump(mode="json"), recipe.training.max_length],
        sort_keys=True,
    )
    return hashlib.sha256(settings.encode()).hexdigest()[:16]


def _run(recipe, registry, data, model_ref: ModelRef, model, tokenizer, codes, split, keys, say):
    hashes = (recipe.digest(), keys[codes[0]])
    with recipe.rundir.job(registry, "evaluate", codes, hashes) as job:
        results = {}
        for code in codes:
            say(f"evaluating {model_ref.name} on {code} {split}")
            part = data.languages[code].split(split)
            results[code], n_tokens = score(model, tokenizer, recipe, part, data.labels)
            job.tally.tokens += n_tokens
            job.tally.examples += len(part)
        registry.finish_evaluation(job.id, job.cost(), model_ref.name, split,
                                   {c: (keys[c], results[c]) for c in codes})  # fmt: skip
    return results


def score(
    model, tokenizer, recipe: Recipe, examples: list[Example], labels: list[str] | None
) -> tuple[dict, int]:
    """The task's metrics of `model` on `examples`, and the number of input tokens read."""
    task, batch = recipe.task, recipe.evaluation.batch_size
    max_length = recipe.training.max_length
    gold = [e.answer for e in examples]
    if task.kind == "classification":
        encoded = encode(examples, tokenizer, task, labels, max_length)
        predicted = [
            labels[i] for i in predict_classes(model, encoded, tokenizer.pad_token_id, batch)
        ]
        found = {
            "accuracy": metrics.accuracy(gold, predicted),
            "macro_f1": metrics.macro_f1(gold, predicted),
            "examples": len(examples),
            PER_EXAMPLE: {
                "accuracy": [float(g == p) for g, p in zip(gold, predicted)],
                "predicted": predicted,
            },
        }
        return found, sum(len(x["input_ids"]) for x in encoded)
    prompts = [prompt_ids(e.text, tokenizer, task)[-max_length:] for e in examples]
    answers = generate(model, prompts, tokenizer, task.max_new_tokens, batch)
    found = {"examples": len(examples), "empty": sum(not a for a in answers) / len(answers)}
    if task.labels:
        found.update(metrics.label_scores(answers, gold, task.labels))
        parsed = [metrics.parse_label(a, task.labels) for a in answers]
        found[PER_EXAMPLE] = {
            "accuracy": [float(g == p) for g, p in zip(gold, parsed)],
            "predicted": parsed,
            "generated": answers,
        }
    else:
        found.update(metrics.rouge(answers, gold))
        found["exact_match"] = metrics.exact_match(answers, gold)
        found["token_f1"] = metrics.token_f1(answers, gold)
        found[PER_EXAMPLE] = {"rougeL": metrics.rouge_l_each(answers, gold), "generated": answers}
    return found, sum(len(p) for p in prompts)


def scoring(recipe: Recipe, data: ProjectData, model_ref: ModelRef, codes: list[str], split: str,
            threads: int) -> ray.Outcome:  # fmt: skip
    """Load one model and score it on `codes` (on a Ray worker); its value: language → metrics."""
    seen = {"tokens": 0, "examples": 0}

    def job() -> dict:
        model, tokenizer = load(model_ref, recipe, data.labels)
        results = {}
        for code in codes:
            part = data.languages[code].split(split)
            results[code], n = score(model, tokenizer, recipe, part, data.labels)
            seen["tokens"] += n
            seen["examples"] += len(part)
        return results

    return ray.on_worker(recipe.run_dir, threads, job, lambda: dict(seen))


def _evaluate_on_ray(
    recipe: Recipe,
    registry: Registry,
    data: ProjectData,
    todo: list,
    split: str,
    keys: dict[str, str],
    say: Callable[[str], None],
) -> dict[int, dict]:
    """Run the evaluations `todo` ((index, model reference, languages)) as Ray tasks; each one
    recorded by the driver as it finishes. Returns index → language → metrics."""
    ex = recipe.executor
    data_ref, threads = ray.put(data), max(1, int(ex.cpus))
    jobs = {i: (recipe, data_ref, ref, codes, split, threads) for i, ref, codes in todo}
    refs = {i: (ref, codes) for i, ref, codes in todo}
    found: dict[int, dict] = {}

    def record(i: int, outcome: ray.Outcome) -> bool:
        ref, codes = refs[i]
        _, error = recipe.rundir.record_remote(
            registry, "evaluate", codes, (recipe.digest(), keys[codes[0]]), outcome,
            lambda job: registry.finish_evaluation(
                job, outcome.cost, ref.name, split,
                {c: (keys[c], outcome.value[c]) for c in codes}, outcome.ended),
        )  # fmt: skip
        if outcome.error is not None:
            say(f"evaluating {ref.name}: failed on {outcome.worker or 'a worker'}: "
                f"{outcome.error.splitlines()[0]}")  # fmt: skip
            return False
        if error is not None:
            outcome.error = error
            say(f"evaluating {ref.name}: {error}")
            return False
        say(f"evaluated {ref.name} on {', '.join(codes)} {split} "
            f"({outcome.ended - outcome.started:.1f} s on {outcome.worker})")  # fmt: skip
        found[i] = outcome.value
        return True

    say(f"{len(jobs)} evaluation(s) on Ray")
    ray.run_on_ray(scoring, jobs, ex, recipe.run_dir, record,
                   lambda i: f"evaluating {refs[i][0].name}", "evaluation(s)", say)  # fmt: skip
    return found
