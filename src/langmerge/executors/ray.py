"""Jobs as Ray tasks: a batch of jobs run in parallel on a local or existing Ray cluster, each
with the executor's resources; a failed try is submitted again up to `executor.retries` times.

This module knows nothing of what a job does. The workflow gives it the function a worker runs
(returning an `Outcome`, measured with `on_worker`) and a `record` callback: outcomes come back
to the driver, which alone writes the registry, so SQLite is never written from several
machines. Workers work in the run directory (shared storage on a cluster), whose marker file
`visible` checks for.
"""

from __future__ import annotations

import os
import re
import socket
import time
import traceback
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from pathlib import Path

import torch

from langmerge.errors import ConfigError, LangmergeError
from langmerge.executors.settings import Executor
from langmerge.files import parse_size
from langmerge.meter import Cost, Meter


class JobsFailed(LangmergeError):
    """Some jobs failed on every attempt; the others were recorded."""


@dataclass
class Outcome:
    """One try of one job on a worker, as measured there."""

    started: float
    ended: float
    cost: Cost
    value: object | None = None  # what the job returned, when it worked
    error: str | None = None
    worker: str = ""  # host:pid


def on_worker(run_dir: str | Path, threads: int, job: Callable[[], object],
              figures: Callable[[], dict] = dict) -> Outcome:  # fmt: skip
    """Run `job` here (on a Ray worker) with `threads` torch threads, measured: its cost
    carries `figures()` (tokens, examples, flops: what it saw, also when it failed). A failure
    of the job itself comes back as `error`, for the driver to record and retry."""
    torch.set_num_threads(threads)
    started, meter, worker = time.time(), Meter(), f"{socket.gethostname()}:{os.getpid()}"
    try:
        visible(run_dir)
        value, error = job(), None
    except Exception as e:  # the driver records it and decides about another try
        value, error = None, f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=4)}"
    return Outcome(started, time.time(), meter.cost(**figures()), value, error, worker)


MARKER = ".langmerge-run-dir"


def mark(run_dir: str | Path) -> None:
    """Leave a file in the run directory for `visible` to find on the workers."""
    (Path(run_dir) / MARKER).write_text(f"{os.uname().nodename}:{os.getpid()}\n")


def visible(run_dir: str | Path) -> None:
    """Fail clearly when this worker does not see the driver's run directory."""
    if not (Path(run_dir) / MARKER).is_file():
        raise ConfigError(
            f"the run directory {run_dir} is not visible on this worker: on a cluster it "
            "must be on storage every node mounts at the same path"
        )


def connect(address: str | None) -> None:
    """Join the Ray cluster at `address`, or start one on this machine (loopback only, no
    dashboard); nothing when this process is connected already."""
    import ray  # the `ray` extra

    if ray.is_initialized():
        return
    local = {"_node_ip_address": "127.0.0.1"} if address is None else {}
    try:
        ray.init(address=address, include_dashboard=False, log_to_driver=False,
                 configure_logging=False, **local)  # fmt: skip
    except (ConnectionError, ValueError, RuntimeError) as e:
        raise ConfigError(f"cannot reach the Ray cluster at {address}: {e}") from None


def run_on_ray(
    fn: Callable[..., Outcome],
    jobs: dict[Hashable, tuple],
    settings: Executor,
    run_dir: str | Path,
    record: Callable[[Hashable, Outcome], bool],
    name: Callable[[Hashable], str],
    what: str,
    say: Callable[[str], None],
    already: int = 0,
) -> None:
    """Run `fn(*jobs[key])` for every key as Ray tasks; `record(key, outcome)` is called on the
    driver as each one finishes and says whether it worked; a failed job is submitted again up
    to `settings.retries` times. Jobs that failed every time raise `JobsFailed` at the end,
    after the others are recorded (`what` names them in its message, which counts
    `already` too: those the caller had before)."""
    task = _task(settings, run_dir, fn)
    failures = _dispatch(task, jobs, settings.retries, record, name, say)
    if failures:
        done = already + len(jobs) - len(failures)
        raise JobsFailed(
            f"{len(failures)} job(s) failed {settings.retries + 1} time(s): "
            + "; ".join(failures.values())
            + f". The {done} other {what} are recorded; fix the cause and run the same command "
            "again (finished work is not redone)"
        )


def put(value: object):
    """`value` in the cluster's object store, sent once to every task that takes it."""
    import ray

    return ray.put(value)


def _task(ex: Executor, run_dir: str | Path, fn: Callable):
    """`fn` as a Ray task with the executor's resources per job, on its cluster."""
    import ray

    connect(ex.address)
    mark(run_dir)
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


def _dispatch(task, jobs: dict, retries: int, record: Callable[[object, Outcome], bool],
              name: Callable[[object], str], say: Callable[[str], None]) -> dict:  # fmt: skip
    """Submit every job; record each outcome as it arrives; submit a failed job again up to
    `retries` times. Returns job key → last error. Interrupted, the outcomes already in are
    recorded and the rest cancelled, each as an interrupted try."""
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
                outcome = Outcome(submitted, time.time(), Cost(), error="interrupted")
            record(key, outcome)
        raise
    return failures


def _get(ray, ref, submitted: float) -> Outcome:
    """The task's outcome; a worker that died (killed, out of memory) is a failed attempt, timed
    from its submission."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as e:  # the task raised: report what it raised
        cause = e.cause if isinstance(getattr(e, "cause", None), BaseException) else e
        error = f"{type(cause).__name__}: {cause}"
    except ray.exceptions.RayError as e:  # the worker process died
        error = f"the worker failed: {type(e).__name__}: {e}"
    return Outcome(submitted, time.time(), Cost(), error=re.sub(r"\x1b\[[0-9;]*m", "", error))
