"""Jobs as Ray tasks: the experts (or the joint model) of one `train` request, and the
evaluations of one request, run in parallel on a local or existing Ray cluster, each with the
recipe's resources.

Workers train in the run directory's work folders (shared storage on a cluster) and return
what they measured; the registry is written here, by the driver alone, so SQLite is never
written from several machines. A failed attempt is recorded with its cost and tried again up to
`executor.retries` times; a job that keeps failing is reported after the others are recorded.
An interrupted request resumes like a local one: finished models are cached, and a job's work
folder keeps its checkpoints.
"""

from __future__ import annotations

import os
import re
import shutil
import time
import traceback
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from langmerge.errors import ConfigError, LangmergeError
from langmerge.recipe import Recipe
from langmerge.registry import Cost, Registry


class JobsFailed(LangmergeError):
    """Some jobs failed on every attempt; the others were recorded."""


@dataclass
class Attempt:
    """One try of one job on a worker, as measured there."""

    started: float
    ended: float
    cost: Cost
    staged: object | None = None  # jobs.Staged when it worked
    error: str | None = None
    worker: str = ""  # host:pid


def attempt(recipe: Recipe, data, language: str | None, work: str, threads: int) -> Attempt:
    """Run one training job here (on a Ray worker): train, score and stage the adapter in
    `work`; never raises for a failure of the job itself, which comes back as `error`."""
    from langmerge.train.jobs import fit_and_stage
    from langmerge.train.trainer import Counts

    started, meter, worker = _begin(threads)
    counts = Counts()
    try:
        visible(recipe)
        staged = fit_and_stage(recipe, data, language, Path(work), False, lambda _: None, counts)
        error = None
    except Exception as e:  # the driver records it and decides about another try
        staged, error = None, f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=4)}"
    cost = meter.cost(tokens=counts.tokens, examples=counts.examples, flops=counts.flops)
    return Attempt(started, time.time(), cost, staged, error, worker)


MARKER = ".langmerge-run-dir"


def mark(recipe: Recipe) -> None:
    """Leave a file in the run directory for `visible` to find on the workers."""
    (Path(recipe.run_dir) / MARKER).write_text(f"{os.uname().nodename}:{os.getpid()}\n")


def visible(recipe: Recipe) -> None:
    """Fail clearly when this worker does not see the driver's run directory."""
    if not (Path(recipe.run_dir) / MARKER).is_file():
        raise ConfigError(
            f"the run directory {recipe.run_dir} is not visible on this worker: on a cluster it "
            "must be on storage every node mounts at the same path"
        )


def _begin(threads: int):
    """A task's start on its worker: torch threads set; (start time, meter, host:pid)."""
    import socket

    import torch

    from langmerge.cost import Meter

    torch.set_num_threads(threads)
    return time.time(), Meter(), f"{socket.gethostname()}:{os.getpid()}"


def connect(address: str | None) -> None:
    """Join the Ray cluster at `address`, or start one on this machine (loopback only, no
    dashboard); nothing when this process is connected already."""
    import ray

    if ray.is_initialized():
        return
    local = {"_node_ip_address": "127.0.0.1"} if address is None else {}
    try:
        ray.init(address=address, include_dashboard=False, log_to_driver=False,
                 configure_logging=False, **local)  # fmt: skip
    except (ConnectionError, ValueError, RuntimeError) as e:
        raise ConfigError(f"cannot reach the Ray cluster at {address}: {e}") from None


def train_on_ray(
    recipe: Recipe,
    registry: Registry,
    data,
    targets: list[str | None],
    force: bool,
    say: Callable[[str], None],
) -> list:
    """Train `targets` (languages; None: the joint model) as Ray tasks running `attempt`."""
    import ray

    from langmerge.processes import exclusive
    from langmerge.train.jobs import busy_message, cached, plan

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
    task = _task(recipe, attempt)
    data_ref = ray.put(data)
    threads = max(1, int(recipe.executor.cpus))
    jobs = {t: (recipe, data_ref, t, str(work), threads) for t, (_, work) in todo.items()}

    def record(target, outcome: Attempt) -> bool:
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
                del todo[target], jobs[target]
        say(f"{len(jobs)} training job(s) on Ray ({recipe.executor.cpus:g} CPU, "
            f"{recipe.executor.gpus:g} GPU each)")  # fmt: skip
        failures = _dispatch(task, jobs, recipe.executor.retries, record, _name, say)
    _report(failures, recipe.executor.retries, len(results), "model(s)")
    return [results[t] for t in targets]


@dataclass
class Scored:
    """One evaluation on a worker: metrics per language, as measured there."""

    started: float
    ended: float
    cost: Cost
    results: dict | None = None  # language → metrics
    error: str | None = None
    worker: str = ""


def scoring(recipe: Recipe, data, model_ref, codes: list[str], split: str, threads: int) -> Scored:
    """Load one model and score it on `codes` (on a Ray worker); failures come back as `error`."""
    from langmerge.evaluate.job import score
    from langmerge.evaluate.models import load

    started, meter, worker = _begin(threads)
    tokens = examples = 0
    try:
        visible(recipe)
        model, tokenizer = load(model_ref, recipe, data.labels)
        results = {}
        for code in codes:
            part = data.languages[code].split(split)
            results[code], n = score(model, tokenizer, recipe, part, data.labels)
            tokens, examples = tokens + n, examples + len(part)
        error = None
    except Exception as e:
        results, error = None, f"{type(e).__name__}: {e}"
    return Scored(started, time.time(), meter.cost(tokens, examples), results, error, worker)


def evaluate_on_ray(
    recipe: Recipe,
    registry: Registry,
    data,
    todo: list,
    split: str,
    keys: dict[str, str],
    say: Callable[[str], None],
) -> dict[int, dict]:
    """Run the evaluations `todo` ((index, model reference, languages)) as Ray tasks; each one
    recorded by the driver as it finishes. Returns index → language → metrics."""
    import ray

    task = _task(recipe, scoring)
    data_ref = ray.put(data)
    threads = max(1, int(recipe.executor.cpus))
    jobs = {i: (recipe, data_ref, ref, codes, split, threads) for i, ref, codes in todo}
    refs = {i: (ref, codes) for i, ref, codes in todo}
    found: dict[int, dict] = {}

    def record(i: int, outcome: Scored) -> bool:
        ref, codes = refs[i]
        job = registry.start_job("evaluate", codes, recipe.digest(), keys[codes[0]],
                                 started=outcome.started)  # fmt: skip
        if outcome.error is not None:
            registry.fail_job(job, f"{outcome.worker}: {outcome.error}", outcome.cost,
                              outcome.ended)  # fmt: skip
            say(f"evaluating {ref.name}: failed on {outcome.worker or 'a worker'}: "
                f"{outcome.error.splitlines()[0]}")  # fmt: skip
            return False
        registry.finish_evaluation(job, outcome.cost, ref.name, split,
                                   {c: (keys[c], outcome.results[c]) for c in codes},
                                   outcome.ended)  # fmt: skip
        say(f"evaluated {ref.name} on {', '.join(codes)} {split} "
            f"({outcome.ended - outcome.started:.1f} s on {outcome.worker})")  # fmt: skip
        found[i] = outcome.results
        return True

    say(f"{len(jobs)} evaluation(s) on Ray")
    failures = _dispatch(task, jobs, recipe.executor.retries, record,
                         lambda i: f"evaluating {refs[i][0].name}", say)  # fmt: skip
    _report(failures, recipe.executor.retries, len(found), "evaluation(s)")
    return found


def _task(recipe: Recipe, fn: Callable):
    """`fn` as a Ray task with the recipe's resources per job, on the recipe's cluster."""
    import ray

    from langmerge.merge.writer import parse_size

    ex = recipe.executor
    connect(ex.address)
    mark(recipe)
    options = {"num_cpus": ex.cpus, "num_gpus": ex.gpus, "max_retries": 0}
    if ex.memory:
        options["memory"] = parse_size(ex.memory)
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    fits = [n for n in nodes if n.get("CPU", 0) >= ex.cpus and n.get("GPU", 0) >= ex.gpus
            and n.get("memory", 0) >= options.get("memory", 0)]  # fmt: skip
    if not fits:  # Ray would keep the task pending for ever
        largest = max(nodes, key=lambda n: n.get("CPU", 0), default={})
        raise ConfigError(
            f"no node of the Ray cluster has what one job asks for (executor: {ex.cpus:g} CPU, "
            f"{ex.gpus:g} GPU" + (f", {ex.memory}" if ex.memory else "") + "); the largest has "
            f"{largest.get('CPU', 0):g} CPU, {largest.get('GPU', 0):g} GPU: lower the request"
        )
    return ray.remote(fn).options(**options)


def _dispatch(task, jobs: dict, retries: int, record: Callable[[object, object], bool],
              name: Callable[[object], str], say: Callable[[str], None]) -> dict:  # fmt: skip
    """Submit every job; record each outcome as it arrives (`record` says whether it worked);
    submit a failed job again up to `retries` times. Returns job key → last error. Interrupted,
    the outcomes already in are recorded and the rest cancelled, each as an interrupted try."""
    import ray

    pending, failures = {}, {}

    def submit(key, tries: int) -> None:
        pending[task.remote(*jobs[key])] = (key, tries, time.time())

    for key in jobs:
        submit(key, 0)
    try:
        while pending:
            (ref,), _ = ray.wait(list(pending), num_returns=1)
            key, tries, submitted = pending.pop(ref)
            outcome = _get(ray, ref, submitted)
            if record(key, outcome):
                continue
            if tries < retries:
                say(f"{name(key)}: trying again ({tries + 1} of {retries})")
                submit(key, tries + 1)
            else:
                failures[key] = f"{name(key)}: {outcome.error.splitlines()[0]}"
    except BaseException:
        ready, _ = ray.wait(list(pending), num_returns=len(pending), timeout=0)
        for ref in pending:
            if ref not in ready:
                ray.cancel(ref, force=True)
        for ref, (key, _, submitted) in pending.items():
            outcome = _get(ray, ref, submitted) if ref in ready else None
            if outcome is None or outcome.error is not None:
                outcome = Attempt(submitted, time.time(), Cost(), error="interrupted")
            record(key, outcome)
        raise
    return failures


def _report(failures: dict, retries: int, done: int, what: str) -> None:
    if failures:
        raise JobsFailed(
            f"{len(failures)} job(s) failed {retries + 1} time(s): "
            + "; ".join(failures.values())
            + f". The {done} other {what} are recorded; fix the cause and run the same command "
            "again (finished work is not redone)"
        )


def _get(ray, ref, submitted: float):
    """The task's outcome; a worker that died (killed, out of memory) is a failed attempt, timed
    from its submission."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as e:  # the task raised: report what it raised
        cause = e.cause if isinstance(getattr(e, "cause", None), BaseException) else e
        error = f"{type(cause).__name__}: {cause}"
    except ray.exceptions.RayError as e:  # the worker process died
        error = f"the worker failed: {type(e).__name__}: {e}"
    return Attempt(submitted, time.time(), Cost(), error=re.sub(r"\x1b\[[0-9;]*m", "", error))


def _record(registry, recipe, data, target, planned, outcome: Attempt, say):
    """One ledger row for the attempt; the model placed and recorded when it worked."""
    from langmerge.train.jobs import Trained, _identity, record_trained, say_health

    kind, languages, name = _identity(data, target)
    hashes, work = planned
    job = registry.start_job(kind, languages, *hashes, started=outcome.started)
    if outcome.error is not None:
        registry.fail_job(job, f"{outcome.worker}: {outcome.error}", outcome.cost, outcome.ended)
        say(f"{name}: failed on {outcome.worker or 'a worker'}: {outcome.error.splitlines()[0]}")
        return None
    try:
        record = record_trained(registry, recipe, data, target, hashes, outcome.staged, job,
                                outcome.cost, ended=outcome.ended)  # fmt: skip
    except Exception as e:  # e.g. the worker's adapter is not where the driver looks
        outcome.error = f"the driver could not record it: {type(e).__name__}: {e}"
        registry.fail_job(job, outcome.error, outcome.cost, outcome.ended)
        say(f"{name}: {outcome.error}")
        return None
    shutil.rmtree(work, ignore_errors=True)
    wall = outcome.ended - outcome.started
    say(f"{name}: v{record.version} in {record.path} ({wall:.1f} s on {outcome.worker}, "
        f"{outcome.cost.tokens} tokens)")  # fmt: skip
    staged = outcome.staged
    say_health(name, staged.health, staged.training, say)
    return Trained(kind, target, record.version, Path(record.path), False, staged.scores,
                   staged.resumed_from, wall, outcome.cost.tokens, staged.health)  # fmt: skip


def _name(target: str | None) -> str:
    return "the joint model" if target is None else f"expert {target}"
