"""Training jobs as Ray tasks: the experts (or the joint model) of one `train` request run in
parallel on a local or existing Ray cluster, each with the recipe's resources.

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


class TrainingFailed(LangmergeError):
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
    import socket

    import torch

    from langmerge.cost import Meter
    from langmerge.train.jobs import fit_and_stage
    from langmerge.train.trainer import Counts

    torch.set_num_threads(threads)
    started, meter, counts = time.time(), Meter(), Counts()
    worker = f"{socket.gethostname()}:{os.getpid()}"
    try:
        staged = fit_and_stage(recipe, data, language, Path(work), False, lambda _: None, counts)
        error = None
    except Exception as e:  # the driver records it and decides about another try
        staged, error = None, f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=4)}"
    cost = meter.cost(tokens=counts.tokens, examples=counts.examples, flops=counts.flops)
    return Attempt(started, time.time(), cost, staged, error, worker)


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
    except ConnectionError as e:
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

    from langmerge.merge.writer import parse_size
    from langmerge.processes import exclusive
    from langmerge.train.jobs import busy_message, cached, plan

    ex = recipe.executor
    connect(ex.address)
    options = {"num_cpus": ex.cpus, "num_gpus": ex.gpus, "max_retries": 0}
    if ex.memory:
        options["memory"] = parse_size(ex.memory)
    task = ray.remote(attempt).options(**options)
    threads = max(1, int(ex.cpus))
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
    data_ref = ray.put(data)
    failures: dict[str | None, str] = {}
    with ExitStack() as locks:
        for target, (_, work) in todo.items():
            locks.enter_context(exclusive(work / "lock", busy_message(data, target)))
        pending = {}

        def submit(target: str | None, tries: int) -> None:
            ref = task.remote(recipe, data_ref, target, str(todo[target][1]), threads)
            pending[ref] = (target, tries)

        for target in todo:
            submit(target, 0)
        say(f"{len(todo)} training job(s) on Ray ({ex.cpus:g} CPU, {ex.gpus:g} GPU each)")
        try:
            while pending:
                (ref,), _ = ray.wait(list(pending), num_returns=1)
                target, tries = pending.pop(ref)
                outcome = _get(ray, ref)
                trained = _record(registry, recipe, data, target, todo[target], outcome, say)
                if trained is not None:
                    results[target] = trained
                elif tries < ex.retries:
                    say(f"{_name(target)}: trying again ({tries + 1} of {ex.retries})")
                    submit(target, tries + 1)
                else:
                    failures[target] = outcome.error.splitlines()[0]
        except BaseException:
            for ref in pending:
                ray.cancel(ref, force=True)
            raise
    if failures:
        raise TrainingFailed(
            f"{len(failures)} job(s) failed {ex.retries + 1} time(s): "
            + "; ".join(f"{_name(t)}: {e}" for t, e in failures.items())
            + f". The {len(results)} other model(s) are recorded; fix the cause and run the "
            "same command again (finished models are not retrained)"
        )
    return [results[t] for t in targets]


def _get(ray, ref) -> Attempt:
    """The task's Attempt; a worker that died (killed, out of memory) is a failed attempt."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as e:  # the task raised: report what it raised
        cause = e.cause if isinstance(getattr(e, "cause", None), BaseException) else e
        error = f"{type(cause).__name__}: {cause}"
    except ray.exceptions.RayError as e:  # the worker process died
        error = f"the worker failed: {type(e).__name__}: {e}"
    now = time.time()
    return Attempt(now, now, Cost(), error=re.sub(r"\x1b\[[0-9;]*m", "", error))


def _record(registry, recipe, data, target, planned, outcome: Attempt, say):
    """One ledger row for the attempt; the model placed and recorded when it worked."""
    from langmerge.train.jobs import Trained, _identity, record_trained

    kind, languages, name = _identity(data, target)
    hashes, work = planned
    job = registry.start_job(kind, languages, *hashes, started=outcome.started)
    if outcome.error is not None:
        registry.fail_job(job, f"{outcome.worker}: {outcome.error}", outcome.cost, outcome.ended)
        say(f"{name}: failed on {outcome.worker or 'a worker'}: {outcome.error.splitlines()[0]}")
        return None
    record = record_trained(registry, recipe, data, target, hashes, outcome.staged, job,
                            outcome.cost, ended=outcome.ended)  # fmt: skip
    shutil.rmtree(work, ignore_errors=True)
    wall = outcome.ended - outcome.started
    say(f"{name}: v{record.version} in {record.path} ({wall:.1f} s on {outcome.worker}, "
        f"{outcome.cost.tokens} tokens)")  # fmt: skip
    return Trained(kind, target, record.version, Path(record.path), False, outcome.staged.scores,
                   outcome.staged.resumed_from, wall, outcome.cost.tokens)  # fmt: skip


def _name(target: str | None) -> str:
    return "the joint model" if target is None else f"expert {target}"
