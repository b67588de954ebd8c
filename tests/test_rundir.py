"""The run directory: its layout, and the ledger row every job gets (started, measured, closed)."""

from pathlib import Path

import pytest

from langmerge.executors.ray import Outcome
from langmerge.meter import Cost
from langmerge.project.rundir import RunDir

HASHES = ("recipe-hash", "data-hash")


def test_the_layout_is_spelled_in_one_place(tmp_path):
    run = RunDir(tmp_path)
    assert run.trained("de") == tmp_path / "experts" / "de"
    assert run.trained(None) == tmp_path / "joint"
    assert run.merge(12, "ties") == tmp_path / "merges" / "0012-ties"
    assert run.seed_run(3).root == tmp_path / "seeds" / "seed-3"
    assert run.addition("ab12.jsonl") == tmp_path / "additions" / "ab12.jsonl"
    assert (run.results, run.study_report) == (tmp_path / "results.json", tmp_path / "report.md")
    assert run.registry_file == tmp_path / "registry.sqlite" and not run.has_registry()


def test_a_job_that_raises_is_closed_as_failed_with_what_it_consumed(tmp_path):
    run = RunDir(tmp_path)
    with run.registry() as registry:
        with (
            pytest.raises(ValueError, match="boom"),
            run.job(registry, "evaluate", ["de"], HASHES) as job,
        ):
            job.tally.tokens, job.tally.examples = 120, 4
            raise ValueError("boom")
        row = registry.job(job.id)
    assert (row["status"], row["error"]) == ("failed", "ValueError: boom")
    assert (row["tokens"], row["examples"], row["languages"]) == (120, 4, ["de"])


def test_an_interrupted_job_says_so(tmp_path):
    run = RunDir(tmp_path)
    with run.registry() as registry:
        with pytest.raises(KeyboardInterrupt), run.job(registry, "merge", ["de"], HASHES) as job:
            raise KeyboardInterrupt
        assert registry.job(job.id)["error"] == "interrupted"


def test_a_job_that_records_nothing_is_closed_as_done(tmp_path):
    run = RunDir(tmp_path)
    with run.registry() as registry:
        with run.job(registry, "seed", ["de"], HASHES) as job:
            job.tally.tokens = 7
        row = registry.job(job.id)
        assert row["wall_s"] == job.wall_s() >= 0
    assert (row["status"], row["tokens"], row["recipe_hash"]) == ("done", 7, "recipe-hash")


def test_a_job_run_elsewhere_keeps_its_own_times_and_cost(tmp_path):
    run = RunDir(tmp_path)
    cost = Cost(cpu_s=2.0, tokens=50)
    worked = Outcome(started=100.0, ended=103.5, cost=cost, value="x", worker="n1:9")
    failed = Outcome(started=100.0, ended=101.0, cost=cost, error="OSError: gone", worker="n1:9")
    with run.registry() as registry:

        def finish(job):
            registry.finish_job(job, cost, ended=103.5)
            return "recorded"

        value, error = run.record_remote(registry, "evaluate", ["de"], HASHES, worked, finish)
        assert (value, error) == ("recorded", None)
        _, error = run.record_remote(registry, "evaluate", ["de"], HASHES, failed, lambda job: 1)
        assert error == "n1:9: OSError: gone"

        def unreadable(job):
            raise FileNotFoundError("no adapter")

        _, error = run.record_remote(registry, "expert", ["de"], HASHES, worked, unreadable)
        assert error == "the driver could not record it: FileNotFoundError: no adapter"
        rows = registry.ledger()
    assert [(r["status"], r["wall_s"], r["tokens"]) for r in rows] == [
        ("done", 3.5, 50), ("failed", 1.0, 50), ("failed", 3.5, 50)
    ]  # fmt: skip


def test_a_recipe_knows_its_run_directory(tmp_path):
    from langmerge.project.recipe import Recipe

    recipe = Recipe(base="b", task={"kind": "classification"},
                    languages={"de": {"data": "d.jsonl"}}, run_dir=tmp_path)  # fmt: skip
    assert recipe.rundir.root == Path(tmp_path)
