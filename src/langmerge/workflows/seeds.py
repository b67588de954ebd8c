"""`langmerge run --seeds N`: the study repeated with N training seeds, and how much the scores
move between seeds next to how much they move between test samples (the per-seed intervals).

Seed k (training.seed + k) runs the whole study in its own run directory, RUN_DIR for the first
seed (the project's own, served) and RUN_DIR/seeds/seed-S for the others, so each seed's experts,
merges and ledger stay apart; the totals add every seed's ledger."""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable

from langmerge.files import atomic_write
from langmerge.project.recipe import Recipe
from langmerge.project.rundir import RunDir
from langmerge.workflows.evaluation import interval
from langmerge.workflows.study import Study, run


def seed_recipes(recipe: Recipe, seeds: int) -> list[Recipe]:
    """The recipe once per seed: training.seed, training.seed + 1, …; each after the first in
    its own run directory under RUN_DIR/seeds/."""
    out = []
    for k in range(seeds):
        seed = recipe.training.seed + k
        if k == 0:
            out.append(recipe)
            continue
        training = recipe.training.model_copy(update={"seed": seed})
        run_dir = recipe.rundir.seed_run(seed).root
        out.append(recipe.model_copy(update={"training": training, "run_dir": run_dir}))
    return out


def run_seeds(
    recipe: Recipe, seeds: int, progress: bool = True, say: Callable[[str], None] = lambda _: None
) -> dict:
    """Run the study once per seed and aggregate; writes RUN_DIR/seeds.json."""
    studies = []
    for r in seed_recipes(recipe, seeds):
        say(f"seed {r.training.seed}: {r.run_dir}")
        studies.append(run(r, progress=progress, say=say))
    summary = aggregate(studies, [r.training.seed for r in seed_recipes(recipe, seeds)])
    _write(recipe.rundir, summary)
    return summary


def aggregate(studies: list[Study], seeds: list[int]) -> dict:
    """Per model row and language: the primary metric's mean and standard deviation over the
    seeds, each seed's value and 95% interval; and the cost of every seed's jobs together."""
    first = studies[0]
    rows = {}
    for row in first.quality:
        per_language = {}
        for code in first.languages:
            values = [s.quality[row][code][first.metric] for s in studies]
            bounds = [interval(s.quality[row][code], first.metric) for s in studies]
            per_language[code] = {
                "mean": statistics.fmean(values),
                "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
                "values": values,
                "intervals": bounds,
            }
        rows[row] = per_language
    cost = {
        "experts_serial_s": sum(s.cost["experts_serial_s"] for s in studies),
        "joint_s": sum(s.cost["joint_s"] for s in studies),
        "merge_s": sum(s.cost["merge_s"] for s in studies),
    }
    degenerate = {str(seed): s.degenerate() for s, seed in zip(studies, seeds)}
    return {"seeds": seeds, "metric": first.metric, "split": first.split,
            "languages": first.languages, "quality": rows, "cost": cost,
            "degenerate": degenerate}  # fmt: skip


def _write(run: RunDir, summary: dict) -> None:
    """seeds.json (`reporting.tables.write_seeds_report` words it as seeds.md)."""
    atomic_write(run.seeds_json, json.dumps(summary, indent=2) + "\n")
