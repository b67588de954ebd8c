"""`langmerge status`, `history` and `rollback`: the versions the registry keeps, what is in
service, and putting an earlier merge back."""

from __future__ import annotations

import json
import time
from pathlib import Path

from langmerge.evaluate.health import is_degenerate
from langmerge.evaluate.health import summary as health_summary
from langmerge.project.recipe import Recipe, primary_metric
from langmerge.project.registry import Registry, read_sweep_choice
from langmerge.project.state import applied_sweep, load_recipe, origins
from langmerge.reporting.listing import short_path, unfinished
from langmerge.workflows.evaluation import interval


def _registry(recipe: Recipe) -> Registry:
    recipe.rundir.require_trained()
    return recipe.rundir.registry()


def _name(merge: dict) -> str:
    return f"{merge['params'].get('name') or merge['method']}#{merge['id']}"


def status_rows(path: Path) -> dict[str, list[dict]]:
    """The merge in service with its experts, and its newest scores per language."""

    recipe = load_recipe(path)
    run_dir = recipe.rundir.root
    with _registry(recipe) as registry:
        current = registry.current_merge()
        bad = degenerate_rows(registry)
        unhealthy = {"degenerate models (their health check failed; not merged or served)": bad}
        unhealthy = unhealthy if bad else {}
        if stuck := unfinished(registry.ledger()):
            unhealthy["unfinished jobs (failed or interrupted, and not done since)"] = stuck
        if current is None:
            return {"no merge in service yet (`langmerge run` or `langmerge merge`)": [],
                    **unhealthy}  # fmt: skip
        experts = {e["id"]: e for e in registry.trained("expert")}
        rows = [
            {"language": experts[i]["language"], "expert": f"v{experts[i]['version']}",
             "health": health_summary(experts[i]["health"]),
             "data hash": experts[i]["data_hash"][:8],
             "path": short_path(experts[i]["path"], run_dir)}
            for i in current["expert_ids"] if i in experts
        ]  # fmt: skip
        scores = registry.db.execute(
            "SELECT language, metrics FROM evaluations WHERE model=? ORDER BY id",
            (f"merged:{_name(current)}",),
        ).fetchall()
    latest = {code: json.loads(m) for code, m in scores}
    metric = primary_metric(recipe)
    for row in rows:
        m = latest.get(row["language"], {})
        row["merge's score"] = " ".join(f"{k} {v:.3f}" for k, v in m.items() if k in (
            "accuracy", "macro_f1", "rougeL", "unparseable"))  # fmt: skip
        bounds = interval(m, metric) if m else None
        row["95% interval"] = f"{metric} {bounds[0]:.3f}–{bounds[1]:.3f}" if bounds else "—"
    title = (
        f"in service: merge {_name(current)} ({short_path(current['path'], run_dir)}); its "
        "experts, and the merge's newest score on each language"
    )
    source = "the next `langmerge merge` uses (`update` and `add-language` keep the served merge's)"
    changed = [{"setting": k, "from": v} for k, v in origins(recipe).items()]
    changes = {"settings the run directory changed (the others are the recipe file's)": changed}
    return {title: rows, source: [merge_source(recipe)], **(changes if changed else {}),
            **unhealthy}  # fmt: skip


def degenerate_rows(registry: Registry) -> list[dict]:
    """The newest expert of each language and the newest joint model, when degenerate: what
    went wrong and what to try."""
    newest = {}
    for e in registry.trained("expert"):
        newest[f"expert {e['language']}"] = e
    if joint := registry.latest("joint"):
        newest["joint"] = joint
    return [
        {"model": f"{name} v{m['version']}", "problem": "; ".join(m["health"]["problems"]),
         "try": "; ".join(m["health"]["advice"])}
        for name, m in newest.items() if is_degenerate(m["health"])
    ]  # fmt: skip


def merge_source(recipe: Recipe) -> dict:
    """The merge settings the recipe gives now and where they come from: the newest sweep's
    choice, or the recipe file's `merge:` (edited since that sweep, or never swept)."""
    m = recipe.merge
    weights = ", ".join(f"{k} {v:g}" for k, v in (m.weights or {}).items())
    row = {"method": m.method, "density": m.density, "λ": m.lam, "weights": weights or "equal"}
    if (applied := applied_sweep(recipe)) is not None:
        row["from"] = f"`langmerge sweep` (its choice {applied['winner']})"
    elif (swept := read_sweep_choice(recipe.run_dir)) is not None:
        row["from"] = (
            f"the recipe's `merge:` section, edited since the last sweep chose {swept['winner']}"
        )
    else:
        row["from"] = "the recipe's `merge:` section"
    return row


def history_rows(path: Path) -> dict[str, list[dict]]:
    """Every expert version and merge with its cost, and the serving history."""
    with _registry(load_recipe(path)) as registry:
        experts = registry.trained("expert")
        merges = registry.merges()
        serving = registry.serving()
        sweeps = registry.sweeps()
        steps = registry.steps()
        jobs = {r["id"]: r for r in registry.ledger()}
    by_id = {e["id"]: f"{e['language']} v{e['version']}" for e in experts}
    return {
        "experts": [
            {"language": e["language"], "version": e["version"], "data hash": e["data_hash"][:8],
             "wall s": f"{e['wall_s']:.1f}", "tokens": e["tokens"],
             "path": short_path(e["path"], registry.path.parent)}
            for e in experts
        ],
        "merges": [
            {"id": m["id"], "name": m["params"].get("name") or m["method"],
             "experts": ", ".join(by_id.get(i, f"#{i}") for i in m["expert_ids"]),
             "wall s": f"{jobs[m['job_id']]['wall_s']:.1f}",
             "in service": "yes" if m["current"] else ""}
            for m in merges
        ],
        "in service over time": [
            {"when": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(s["at"])),
             "merge": s["merge_id"], "why": s["reason"]}
            for s in serving
        ],
        "maintenance steps": [
            {"step": i, "what": f"{s['kind']} {s['language']}", "new merge": s["merge_id"],
             "outcome": "served" if s["served"] else "refused by the guard",
             "wall s": f"{s['result']['cost']['update']['wall_s']:.1f}"}
            for i, s in enumerate(steps, 1)
        ],
        "sweeps": [
            {"sweep": s["id"], "points": len(s["points"]), "best by": s["select"],
             "winner": s["winner"], "validation": f"{s['winner_score']:.3f}",
             "served": s.get("served", "no"), "wall s": f"{jobs[s['job_id']]['wall_s']:.1f}"}
            for s in sweeps
        ],
    }  # fmt: skip
