"""`langmerge run`: the whole study from one recipe — experts, the joint baseline, the merges the
recipe compares, every model evaluated per language — then quality and cost side by side
(results.json; `reporting.tables` words them as tables and report.md).

Every step is cached (unchanged experts are not retrained, an unchanged merge is not redone, a
model already evaluated on the same data is not evaluated again), so running it again after a
change does only the work the change needs.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from langmerge.data.prepare import load_data
from langmerge.evaluate.health import is_degenerate
from langmerge.files import atomic_write
from langmerge.project.recipe import MergeVariant, Recipe, primary_metric
from langmerge.workflows.evaluation import (
    PER_EXAMPLE,
    evaluate_all,
    evaluation_health,
    require_split,
)
from langmerge.workflows.models import resolve
from langmerge.workflows.recipe_merge import merge_once
from langmerge.workflows.training import train


@dataclass
class Study:
    """What `run` found: metrics per model and language, and the cost comparison."""

    languages: list[str]
    metric: str
    split: str
    quality: dict[str, dict[str, dict]]  # model row → language → metrics
    best_merge: str | None
    cost: dict
    models: dict[str, str] = field(default_factory=dict)  # row → registry name of the model
    alpha: float = 0.05  # significance level of the paired comparisons
    health: dict[str, dict] = field(default_factory=dict)  # row (expert:LANG) → verdict
    identical: list[list[str]] = field(default_factory=list)  # merges with equal predictions
    notes: list[str] = field(default_factory=list)  # what the study skipped or refused, and why

    def degenerate(self) -> list[str]:
        """The rows (models) whose health verdict is degenerate."""
        return [row for row, h in self.health.items() if is_degenerate(h)]


def run(
    recipe: Recipe,
    progress: bool = True,
    say: Callable[[str], None] = lambda _: None,
) -> Study:
    """Train, merge, evaluate; write results.json into the run directory. A
    degenerate expert is not merged (unless `merge.allow_degenerate`), a degenerate merge is
    never served, and comparisons with a degenerate model are void."""
    with recipe.rundir.serving():
        return _run(recipe, progress, say)


def _run(recipe: Recipe, progress: bool, say: Callable[[str], None]) -> Study:
    data = load_data(recipe.data_spec()).require_valid()
    codes = list(data.languages)
    require_split(data, codes, recipe.evaluation.split)  # before hours of training, not after
    experts = train(recipe, codes, progress=progress, say=say)
    (joint,) = train(recipe, joint=True, progress=progress, say=say)
    # the versions this recipe made (or found cached): not whatever was trained last
    with recipe.rundir.registry() as registry:
        rows_of = {t.language: _version(registry.trained("expert", t.language), t.version)
                   for t in experts}  # fmt: skip
        joint_row = _version(registry.trained("joint"), joint.version)
    health = {f"expert:{t.language}": t.health for t in experts} | {"joint": joint.health}
    notes = []
    bad = [f"{row[7:]}" for row, h in health.items() if row != "joint" and is_degenerate(h)]
    if bad and not recipe.merge.allow_degenerate:
        notes.append(
            f"no merge made: expert {', '.join(bad)} {'is' if len(bad) == 1 else 'are'} "
            "degenerate (see the health table); retrain, or pass --allow-degenerate"
        )
        merges = {}
    else:
        merges = {v.name(): merge_once(recipe, rows_of, _overrides(v), v.name(), progress, say)
                  for v in recipe.merge.compare}  # fmt: skip
    split = recipe.evaluation.split
    rows = [("joint", f"joint:v{joint.version}", None)]
    rows += [(f"merged:{name}", f"merged:{name}#{i}", None) for name, i in merges.items()]
    rows += [("experts (own language)", f"expert:{t.language}:v{t.version}", [t.language])
             for t in experts]  # fmt: skip
    rows.append(("base", "base", None))
    found = evaluate_all(recipe, [(ref, langs) for _, ref, langs in rows], split, data, say=say)
    quality: dict[str, dict] = {}
    models = {"experts (own language)": "expert:LANG"}
    for (row, ref, langs), scores in zip(rows, found):
        quality.setdefault(row, {}).update(scores)
        if langs is None:
            models[row] = resolve(recipe, ref, data.labels).name
        if row.startswith("merged:"):
            health[row] = evaluation_health(scores, data, split)
    metric = primary_metric(recipe)
    identical = identical_groups({f"merged:{n}": quality[f"merged:{n}"] for n in merges})
    healthy = [n for n in merges if not is_degenerate(health[f"merged:{n}"])]
    if len(healthy) < len(merges):
        notes.append("not ranked, never served: the degenerate merges "
                     + ", ".join(n for n in merges if n not in healthy))  # fmt: skip
    # the simplest of equal means wins (the compare list's order), as among identical merges
    scored = [(mean(quality[f"merged:{n}"], metric, codes), -i, n) for i, n in enumerate(merges)
              if n in healthy]  # fmt: skip
    best = f"merged:{max(scored)[2]}" if scored else None
    if best is not None:
        _serve_first(recipe, merges[best[len("merged:") :]], models[best], say)
    for group in identical:
        notes.append(f"{', '.join(group)} make identical predictions on every language: one "
                     "merge, not a ranking")  # fmt: skip
    cost = cost_table(recipe, codes, rows_of, joint_row)
    study = Study(codes, metric, split, quality, best, cost, models,
                  recipe.evaluation.alpha, health, identical, notes)  # fmt: skip
    write_results(recipe, study)
    return study


def identical_groups(merges: dict[str, dict[str, dict]]) -> list[list[str]]:
    """Groups of two or more merges whose per-example predictions are equal on every
    language (the same model as far as the evaluation can tell)."""
    groups: dict[str, list[str]] = {}
    for row, scores in merges.items():
        each = [(m.get(PER_EXAMPLE) or {}) for m in scores.values()]
        each = [e.get("predicted") or e.get("generated") for e in each]
        if all(e is not None for e in each):
            groups.setdefault(json.dumps(each, ensure_ascii=False), []).append(row)
    return [g for g in groups.values() if len(g) > 1]


def _version(rows: list[dict], version: int) -> dict:
    """The registry row of one version among a model's rows."""
    return next(r for r in rows if r["version"] == version)


def _overrides(variant: MergeVariant) -> dict:
    """The merge settings a compared variant sets over the recipe's."""
    return {"method": variant.method, "density": variant.density, "lam": variant.lam,
            "alpha": variant.alpha}  # fmt: skip


def _serve_first(recipe: Recipe, merge_id: int, name: str, say) -> None:
    """With no merge in service yet, the study's best merge goes into service; after that only
    maintenance (update, add-language, rollback) changes it."""
    with recipe.rundir.registry() as registry:
        if registry.current_merge() is None:
            registry.serve(merge_id, "the best merge of `langmerge run`")
            say(f"{name} is now the current merge (the model in service)")


def mean(scores: dict[str, dict], metric: str, codes: list[str]) -> float:
    """The mean of `metric` over the languages `codes`."""
    return sum(scores[c][metric] for c in codes) / len(codes)


def cost_table(
    recipe: Recipe,
    codes: list[str],
    experts: dict | None = None,
    joint: dict | None = None,
    before: float | None = None,
) -> dict:
    """From the ledger only: the experts (default: the current ones) one after another
    and with K parallel workers (projected by a longest-first schedule of their measured times),
    the joint model (default: the newest), and the merges (those that ended by `before`)."""
    with recipe.rundir.registry() as registry:
        experts = experts or {c: registry.latest("expert", c) for c in codes}
        joint = joint or registry.latest("joint")
        names = {v.name() for v in recipe.merge.compare}
        merge_rows = {  # the newest merge of each name the recipe compares
            m["params"]["name"]: m
            for m in registry.merges()
            if m["params"].get("name") in names and (before is None or m["ended"] <= before)
        }
        seeds = [j for j in registry.ledger() if j["kind"] == "seed" and j["status"] == "done"]
    # the experts branch from the seed: it runs before them, and is part of the initial cost
    seed_job = seeds[-1] if seeds and recipe.experts.start == "seed" else None
    seed = seed_job["wall_s"] if seed_job else 0.0
    merge_walls = {name: m["wall_s"] for name, m in merge_rows.items()}
    slowest = max(merge_rows.values(), key=lambda m: m["wall_s"], default=None)
    walls = {c: e["wall_s"] for c, e in experts.items()}
    serial = sum(walls.values())
    spans = [(e["started"], e["ended"]) for e in experts.values()]
    if concurrency(spans) > 1 and connected(spans):  # one parallel run: measured
        workers = concurrency(spans)
        makespan = max(end for _, end in spans) - min(start for start, _ in spans)
        source = (f"measured: the experts ran in parallel, up to {workers} at once; the "
                  "makespan is the time from the first start to the last end")  # fmt: skip
    else:
        workers = recipe.evaluation.workers or len(codes)
        makespan = schedule(list(walls.values()), workers)
        source = (
            "projected from the ledger (the experts were trained one after another; the "
            "makespan schedules their measured times on the workers, longest first)"
        )
    merge_wall = max(merge_walls.values(), default=0.0)
    out = {
        "experts": {c: {"wall_s": w, "tokens": experts[c]["tokens"]} for c, w in walls.items()},
        "experts_serial_s": serial,
        "workers": workers,
        "experts_makespan_s": makespan,
        "makespan_source": source,
        "makespan_measured": source.startswith("measured"),
        "joint_s": joint["wall_s"],
        "joint_tokens": joint["tokens"],
        "merge_s": merge_wall,
        "merges_s": merge_walls,
        "seed_s": seed,
        # process CPU seconds and FLOPs: unlike wall time, not inflated by a busy machine
        "cpu_s": {
            "experts": sum(e["cpu_s"] or 0.0 for e in experts.values()),
            "joint": joint["cpu_s"] or 0.0,
            "merge": (slowest or {}).get("cpu_s") or 0.0,
            "seed": (seed_job or {}).get("cpu_s") or 0.0,
        },
        "flops": {
            "experts": sum(e["flops"] or 0.0 for e in experts.values()),
            "joint": joint["flops"] or 0.0,
            "merge": (slowest or {}).get("flops") or 0.0,
            "seed": (seed_job or {}).get("flops") or 0.0,
        },
    }
    out["serial_vs_joint"] = (seed + serial + merge_wall) / joint["wall_s"]
    out["parallel_vs_joint"] = (seed + makespan + merge_wall) / joint["wall_s"]
    return out


def connected(spans: list[tuple[float, float]]) -> bool:
    """Whether the intervals leave no gap between them (one run, not several)."""
    ordered = sorted(spans)
    end = ordered[0][1]
    for start, stop in ordered[1:]:
        if start > end:
            return False
        end = max(end, stop)
    return True


def concurrency(spans: list[tuple[float, float]]) -> int:
    """The most of these (start, end) intervals that overlap at one moment."""
    events = sorted([(s, 1) for s, _ in spans] + [(e, -1) for _, e in spans],
                    key=lambda x: (x[0], x[1]))  # fmt: skip
    most = now = 0
    for _, step in events:
        now += step
        most = max(most, now)
    return most


def schedule(durations: list[float], workers: int) -> float:
    """The makespan of jobs of these durations on `workers` machines, longest job first."""
    loads = [0.0] * max(1, workers)
    for d in sorted(durations, reverse=True):
        loads[loads.index(min(loads))] += d
    return max(loads)


def write_results(recipe: Recipe, study: Study) -> Path:
    """results.json in the run directory (written whole, then renamed): the study's figures,
    which `reporting.tables.write_study_report` turns into report.md."""
    run = recipe.rundir
    results = {
        "languages": study.languages,
        "split": study.split,
        "metric": study.metric,
        "best_merge": study.best_merge,
        "quality": study.quality,
        "models": study.models,
        "cost": study.cost,
        "health": study.health,
        "identical": study.identical,
        "notes": study.notes,
    }
    atomic_write(run.results, json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    return run.results
