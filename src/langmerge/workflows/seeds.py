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
from langmerge.workflows.study import Study, markdown_table, run


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
    """Run the study once per seed and aggregate; writes RUN_DIR/seeds.json and seeds.md."""
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


def degenerate_seeds(summary: dict, row: str) -> int:
    """In how many seeds the table row's model was degenerate (for the experts' row: any of
    the language experts)."""

    def hit(bad: list[str]) -> bool:
        if row == "experts (own language)":
            return any(b.startswith("expert:") for b in bad)
        return row in bad

    return sum(hit(bad) for bad in summary.get("degenerate", {}).values())


def seed_rows(summary: dict) -> list[dict]:
    """ "mean ± sd across seeds (mean half-width of the per-seed intervals)" per language, and
    in how many seeds the model was degenerate (its scores then are no result)."""
    out, runs = [], len(summary["seeds"])
    for row, langs in summary["quality"].items():
        cells = {}
        for code, v in langs.items():
            widths = [(b[1] - b[0]) / 2 for b in v["intervals"] if b]
            half = f" (±{statistics.fmean(widths):.2f})" if widths else ""
            cells[code] = f"{v['mean']:.3f} ± {v['sd']:.3f}{half}"
        means = [v["mean"] for v in langs.values()]
        bad = degenerate_seeds(summary, row)
        out.append({"model": row, **cells, "mean": f"{statistics.fmean(means):.3f}",
                    "degenerate": f"{bad}/{runs}" if bad else ""})  # fmt: skip
    return out


def note(summary: dict) -> str:
    bad = sum(len(b) for b in summary.get("degenerate", {}).values())
    return (
        f"{summary['metric']} on the {summary['split']} split over seeds "
        f"{', '.join(map(str, summary['seeds']))}: mean ± standard deviation across seeds, and in "
        "brackets the mean half-width of the per-seed 95% intervals (test-sample noise). Cost of "
        f"every seed's jobs: experts {summary['cost']['experts_serial_s']:.1f} s, joint "
        f"{summary['cost']['joint_s']:.1f} s, merges {summary['cost']['merge_s']:.1f} s. "
        + (f"{bad} degenerate model(s) across the seeds: their scores are no result."
           if bad else "No model was degenerate in any seed.")
    )  # fmt: skip


def _write(run: RunDir, summary: dict) -> None:
    lines = ["# langmerge study over seeds", "", note(summary), "",
             *markdown_table(seed_rows(summary))]  # fmt: skip
    atomic_write(run.seeds_json, json.dumps(summary, indent=2) + "\n")
    atomic_write(run.seeds_md, "\n".join(lines) + "\n")
