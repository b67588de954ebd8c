"""`langmerge ls`: what a recipe's run directory holds — experts, joint models, merges — with the
scores and costs the registry recorded, and whether each model is current for the recipe."""

from __future__ import annotations

import time
from pathlib import Path

from langmerge.data.prepare import load_data
from langmerge.errors import LangmergeError
from langmerge.project.state import load_recipe


def listing(path: Path) -> dict[str, list[dict]]:
    """Rows to print, by table title."""
    recipe = load_recipe(path)
    recipe.rundir.require_trained("run `langmerge train` first")
    try:
        data = load_data(recipe.data_spec(), hub=False)
        hashes = {code: d.digest for code, d in data.languages.items()}
        hashes["joint"] = data.joint_digest() if not data.not_read else None
    except LangmergeError:
        hashes = {}  # the data cannot be read now: freshness unknown
    recipe_hash = (recipe.digest("expert"), recipe.digest("joint"))
    with recipe.rundir.registry() as registry:
        experts = registry.trained("expert")
        joints = registry.trained("joint")
        merges = registry.merges()
        ledger = registry.ledger()
    latest: dict[str, int] = {}
    for e in experts:
        latest[e["language"]] = max(latest.get(e["language"], 0), e["version"])
    by_id = {e["id"]: f"{e['language']} v{e['version']}" for e in experts}

    def fresh(row: dict, key: str) -> str:
        if key not in hashes or hashes[key] is None:
            return "?"
        wanted = recipe_hash[key == "joint"]
        same = row["recipe_hash"] == wanted and row["data_hash"] == hashes[key]
        return (
            "yes"
            if same
            else ("data changed" if row["recipe_hash"] == wanted else "recipe changed")
        )

    def model_row(row: dict, key: str, current: bool) -> dict:
        return {
            "version": f"v{row['version']}" + (" *" if current else ""),
            "up to date": fresh(row, key) if current else "",
            "validation": _scores(row["scores"]),
            "health": (row["health"] or {}).get("verdict", "unchecked"),
            "steps": _steps(row["training"]),
            "data hash": row["data_hash"][:8],
            "wall s": f"{row['wall_s']:.1f}",
            "tokens": row["tokens"],
            "peak MB": round((row["peak_memory_bytes"] or 0) / 2**20),
            "path": short_path(row["path"], recipe.run_dir),
        }

    def problems(row: dict, name: str) -> list[dict]:
        health = row["health"] or {}
        return [{"model": name, "problem": p} for p in health.get("problems", [])]

    degenerate = [
        p for e in experts for p in problems(e, f"expert {e['language']} v{e['version']}")
    ] + [p for j in joints for p in problems(j, f"joint v{j['version']}")]
    return {
        "experts (* = current version)": [
            {
                "language": e["language"],
                **model_row(e, e["language"], e["version"] == latest[e["language"]]),
            }
            for e in experts
        ],
        "joint models": [
            {"languages": ",".join(j["languages"]), **model_row(j, "joint", j is joints[-1])}
            for j in joints
        ],
        "merges": [
            {
                "id": m["id"],
                "method": m["method"] + (" *" if m["current"] else ""),
                "density": m["params"].get("density"),
                "lambda": m["params"].get("lam"),
                "experts": ", ".join(by_id.get(i, f"#{i}") for i in m["expert_ids"]),
                "wall s": f"{m['wall_s']:.1f}",
                "path": short_path(m["path"], recipe.run_dir),
            }
            for m in merges
        ],
        "degenerate models": degenerate,
        "unfinished jobs (failed or interrupted, and not done since)": unfinished(ledger),
    }


def unfinished(ledger: list[dict]) -> list[dict]:
    """The newest job of each kind and languages when it did not finish (what a crash, a
    Ctrl-C or an error left), so that a run directory with nothing finished still says why."""
    newest: dict[tuple, dict] = {}
    for job in ledger:
        newest[(job["kind"], tuple(job["languages"]))] = job
    return [
        {
            "job": j["id"],
            "kind": j["kind"],
            "languages": ",".join(j["languages"]),
            "status": j["status"],
            "started": time.strftime("%Y-%m-%d %H:%M", time.localtime(j["started"])),
            "error": (j["error"] or "")[:200],
        }
        for j in newest.values()
        if j["status"] != "done"
    ]


def _scores(scores: dict) -> str:
    """Validation scores in one short cell: the mean over languages of each metric."""
    per_language = [s for s in scores.values() if s]
    if not per_language:
        return "-"
    names = [n for n in ("accuracy", "macro_f1", "loss") if n in per_language[0]]
    mean = {n: sum(s[n] for s in per_language) / len(per_language) for n in names}
    short = {"accuracy": "acc", "macro_f1": "F1", "loss": "loss"}
    return " ".join(f"{short[n]} {mean[n]:.3f}" for n in names)


def _steps(training: dict) -> str:
    """ "120/200": the step whose weights were kept, of the steps trained."""
    if not training.get("steps"):
        return "-"
    return f"{training.get('best_step') or training['steps']}/{training['steps']}"


def short_path(path: str, run_dir: Path) -> str:
    """A path inside the run directory, relative to it; others as they are."""
    try:
        return str(Path(path).relative_to(run_dir))
    except ValueError:
        return path
