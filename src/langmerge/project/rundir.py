"""The run directory: the one place that spells where a project's artifacts live, opens its
registry, holds its serving lock and keeps the ledger row of each job while it runs.

    run = RunDir(recipe.run_dir)
    with run.registry() as registry, run.job(registry, "merge", codes, hashes) as job:
        ...  # the work; an exception closes the row as failed, with what it consumed so far
        registry.finish_merge(job.id, job.cost(), ...)  # or left open: closed as done
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from langmerge.errors import ConfigError
from langmerge.meter import Cost, Meter
from langmerge.processes import exclusive
from langmerge.project.registry import DB_NAME, Registry

_SERVING: set[Path] = set()  # serving locks this process holds


@dataclass
class Tally:
    """What a job has worked through so far (kept outside the work, so an interruption keeps it)."""

    tokens: int = 0
    examples: int = 0
    flops: float = 0.0


@dataclass
class Job:
    """A running job's ledger row: its id, and the meter and tally its cost is measured by."""

    registry: Registry
    id: int
    tally: Any = field(default_factory=Tally)  # tokens, examples, flops: a Tally or train's Counts
    meter: Meter = field(default_factory=Meter)

    def cost(self) -> Cost:
        t = self.tally
        return self.meter.cost(tokens=t.tokens, examples=t.examples, flops=t.flops)

    def wall_s(self) -> float:
        """The job's wall time as recorded when it closed."""
        return self.registry.job(self.id)["wall_s"]


def failure(e: BaseException) -> str:
    """How an exception that ended a job is written in the ledger."""
    return "interrupted" if isinstance(e, KeyboardInterrupt) else f"{type(e).__name__}: {e}"


class RunDir:
    """A project's run directory (`recipe.run_dir`): its layout, registry, lock and jobs."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"RunDir({str(self.root)!r})"

    # ---- the layout ------------------------------------------------------------------------

    @property
    def registry_file(self) -> Path:
        return self.root / DB_NAME

    def trained(self, language: str | None) -> Path:
        """The folder of a language's expert versions (None: of the joint model's)."""
        return self.root / "joint" if language is None else self.root / "experts" / language

    def merge(self, job_id: int, method: str) -> Path:
        """Where merge job `job_id` writes its model unless told otherwise."""
        return self.root / "merges" / f"{job_id:04d}-{method}"

    def base(self, key: str) -> Path:
        """A prepared base model (a classification head added, the tokenizer fixed)."""
        return self.root / "base" / key

    def seed(self, key: str) -> Path:
        """A seed model: the joint warm-up every expert branches from."""
        return self.root / "seed" / key

    def addition(self, name: str) -> Path:
        """A copy of data that maintenance added (named by its hash)."""
        return self.root / "additions" / name

    def seed_run(self, seed: int) -> RunDir:
        """The run directory of one extra training seed of a seed study."""
        return RunDir(self.root / "seeds" / f"seed-{seed}")

    study_report = property(lambda self: self.root / "report.md", doc="the study's report")
    results = property(lambda self: self.root / "results.json", doc="the study's figures")
    seeds_json = property(lambda self: self.root / "seeds.json", doc="a seed study's figures")
    seeds_md = property(lambda self: self.root / "seeds.md", doc="a seed study's report")
    report = property(lambda self: self.root / "report", doc="the HTML report's folder")
    analysis = property(lambda self: self.root / "analysis", doc="`langmerge analyze`'s output")
    vectors = property(lambda self: self.root / ".vectors", doc="cached expert statistics")

    # ---- the registry and the serving lock ---------------------------------------------------

    def registry(self, read_only: bool = False) -> Registry:
        """The run directory's registry (created on first use), to use in a `with` block."""
        return Registry(self.root, read_only=read_only)

    def has_registry(self) -> bool:
        return self.registry_file.is_file()

    def require_trained(self, hint: str = "run `langmerge run` first") -> None:
        """Refuse to read a run directory that has no registry yet, saying what to run."""
        if not self.has_registry():
            raise ConfigError(f"nothing trained yet in {self.root}: {hint}")

    @contextmanager
    def serving(self) -> Iterator[None]:
        """Held by every command that changes what the run directory serves (merge, update,
        add-language, sweep, rollback, run), so that none replaces a merge another is comparing
        against. Taken again by the process that holds it, it is a no-op."""
        lock = (self.root / ".serving.lock").absolute()
        if lock in _SERVING:
            yield
            return
        busy = (
            f"another langmerge command (merge, update, add-language, sweep, rollback or run) is "
            f"changing what {self.root} serves; wait for it to finish"
        )
        with exclusive(lock, busy):
            _SERVING.add(lock)
            try:
                yield
            finally:
                _SERVING.discard(lock)

    # ---- jobs ------------------------------------------------------------------------------

    @contextmanager
    def job(
        self,
        registry: Registry,
        kind: str,
        languages: list[str],
        hashes: tuple[str, str],
        tally: Any = None,
    ) -> Iterator[Job]:
        """A ledger row for the work in the block: started before it, measured through it.
        An exception closes it as failed with what it consumed (and goes on); a block that
        did not close it with one of the registry's `finish_*` calls closes it as done."""
        job = Job(registry, registry.start_job(kind, languages, *hashes), tally or Tally())
        try:
            yield job
        except BaseException as e:
            with contextlib.suppress(Exception):  # a full disk refuses it too: the next
                registry.fail_job(job.id, failure(e), job.cost())  # command marks it failed
            raise
        if registry.job(job.id)["status"] == "running":
            registry.finish_job(job.id, job.cost())

    def record_remote(
        self,
        registry: Registry,
        kind: str,
        languages: list[str],
        hashes: tuple[str, str],
        outcome: Any,
        record: Callable[[int], Any],
    ) -> tuple[Any, str | None]:
        """The ledger row of a job that ran elsewhere (a Ray `Outcome`: when it started and
        ended, what it cost, its value or error); `record(job_id)` closes it with what it made.
        Returns (what `record` returned, None), or (None, the error) with the row failed."""
        job = registry.start_job(kind, languages, *hashes, started=outcome.started)
        error = f"{outcome.worker}: {outcome.error}" if outcome.error is not None else None
        if error is None:
            try:
                return record(job), None
            except Exception as e:  # e.g. the worker's files are not where the driver looks
                error = f"the driver could not record it: {type(e).__name__}: {e}"
        registry.fail_job(job, error, outcome.cost, outcome.ended)
        return None, error
