"""The quality yardstick: the whole study with default training settings on real multilingual
text, over several training seeds — per language the joint model, each expert on its own
language, the best merge (chosen on validation, scored on test) and its gap to joint with a
paired 95% interval, and how many trained models were degenerate.

Data sets (both real text, neither generated nor templated):
- `kaomoji`: the demo's data (the `kaomoji-dataset` package): kaomoji names and keywords in
  en, de, es, ja, zh, 8 categories.
- `manpages`: Debian's translated manual pages (fetched with `apt-get download`, see
  bench/debian_manpages.py): a page's one-line summary and first DESCRIPTION paragraph, labelled
  with its manual section (command, syscall, library, file format, admin command).

    .venv/bin/python bench/quality.py                       # both data sets, seeds 0 1 2
    .venv/bin/python bench/quality.py --data kaomoji --seeds 0 --set training.learning_rate=1e-3

The recipe names only the task, the languages, their data and the split (validation 15%, test
25%, plus `--set` overrides): every training setting is langmerge's default. Results: a table
per data set, and JSON in bench/results/quality-<data>.json (the per-seed figures and the
settings used).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import yaml

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))

from _common import machine_info  # noqa: E402


def kaomoji_data(out: Path) -> dict:
    """The demo's five languages (all of their texts, German's held-back share included)."""
    from langmerge.demo.data import CATEGORIES, LANGUAGES, examples

    out.mkdir(parents=True, exist_ok=True)
    for code in LANGUAGES:
        rows = examples(code)
        (out / f"{code}.jsonl").write_text(
            "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        )
    return {"languages": LANGUAGES, "labels": CATEGORIES}


def manpages_data(out: Path) -> dict:
    """Debian's translated manual pages, one file per language."""
    from debian_manpages import build

    summary = build(out)
    languages = sorted(summary["languages"]) if "languages" in summary else sorted(summary)
    labels = sorted({label for rows in _read_all(out, languages) for label in rows})
    return {"languages": languages, "labels": labels}


def _read_all(folder: Path, languages: list[str]) -> list[set]:
    return [
        {json.loads(line)["label"] for line in (folder / f"{c}.jsonl").read_text().splitlines()}
        for c in languages
    ]


DATA = {"kaomoji": kaomoji_data, "manpages": manpages_data}


# Larger held-out shares than the default 10% each, as in the demo: a few dozen test texts per
# language, so that a per-language gap has an interval narrower than the gap itself.
SPLIT = {"validation": 0.15, "test": 0.25, "seed": 0}


# langmerge's default compare list, and regmean at two more α (the sweep's other values)
COMPARE = ["linear", {"method": "ties", "density": 1.0}, {"method": "dare_ties", "density": 0.5},
           {"method": "knots_ties", "density": 1.0}, "regmean", {"method": "regmean", "alpha": 0.5},
           {"method": "regmean", "alpha": 1.0}]  # fmt: skip


def write_project(root: Path, name: str, overrides: dict, filename: str = "recipe.yaml") -> Path:
    """A project folder: the data set's files, the embedded backbone trimmed to its texts, and a
    recipe that names nothing but what a user must (base, task, languages, data) and the split."""
    from langmerge.models.embedded import embedded_backbone

    data_dir = root / "data"
    info = DATA[name](data_dir)
    texts = sorted({json.loads(line)["text"] for c in info["languages"]
                    for line in (data_dir / f"{c}.jsonl").read_text().splitlines()})  # fmt: skip
    recipe = {
        "base": str(embedded_backbone(texts)),
        "task": {"kind": "classification", "labels": info["labels"]},
        "languages": {c: {"data": f"data/{c}.jsonl"} for c in info["languages"]},
        "split": SPLIT,
        "merge": {"compare": COMPARE},
        "run_dir": "run",
    }
    for dotted, value in overrides.items():
        node = recipe
        *path, last = dotted.split(".")
        for key in path:
            node = node.setdefault(key, {})
        node[last] = value
    path = root / filename
    path.write_text(yaml.safe_dump(recipe, allow_unicode=True, sort_keys=False))
    return path


GROUPS = {  # which merges each reported "best" is chosen among (on validation)
    "best": lambda method: True,
    "weight_only": lambda method: not get_method(method).data_aware,
    "regmean": lambda method: method == "regmean",
}


def get_method(name: str):
    from langmerge.merge.methods import get_method as lookup

    return lookup(name)


def study(recipe_path: Path, seed: int) -> dict:
    """One seed's study: `langmerge run`, then every merge scored on validation to choose the
    best one as a user of the sweep would (the study's own `*` is chosen on test): the best of
    all merges, of the weight-only methods, and regmean, each against joint on test."""
    from langmerge.evaluate.health import is_degenerate
    from langmerge.project.state import load_recipe
    from langmerge.workflows.evaluation import evaluate
    from langmerge.workflows.seeds import seed_recipes
    from langmerge.workflows.study import run

    recipe = seed_recipes(load_recipe(recipe_path), seed + 1)[seed]
    start = time.perf_counter()
    s = run(recipe, progress=False, say=lambda m: print(f"  [seed {seed}] {m}", flush=True))
    metric, codes = s.metric, s.languages
    merges = [row for row in s.quality if row.startswith("merged:")]
    healthy = [m for m in merges if not is_degenerate(s.health.get(m))]
    on_validation = {
        m: evaluate(recipe, m, codes, "validation") for m in healthy
    }  # fmt: skip
    chosen = {}
    for group, member in GROUPS.items():
        pool = [m for m in healthy if member(m.removeprefix("merged:").split("-")[0])]
        chosen[group] = max(pool, key=lambda m: sum(on_validation[m][c][metric] for c in codes),
                            default=None)  # fmt: skip
    languages = {}
    for c in codes:
        joint = s.quality["joint"][c]
        row = {"joint": joint[metric], "joint_macro_f1": joint.get("macro_f1"),
               "expert": s.quality["experts (own language)"][c][metric]}  # fmt: skip
        for group, m in chosen.items():
            if m is not None:
                row.update(_versus(s.quality[m][c], joint, metric, group))
        languages[c] = row
    return {
        "seed": recipe.training.seed,
        "metric": metric,
        "best_merge": chosen["best"],
        "chosen": chosen,
        "languages": languages,
        "degenerate": s.degenerate(),
        "health": {row: (h or {}).get("problems", []) for row, h in s.health.items()},
        "steps": _steps(recipe),
        "cost": _cost(recipe, s.cost, chosen["best"]),
        "seconds": time.perf_counter() - start,
    }


def _versus(merged: dict, joint: dict, metric: str, group: str) -> dict:
    from langmerge.evaluate import stats
    from langmerge.workflows.evaluation import per_example

    c = stats.compare(per_example(merged, metric), per_example(joint, metric))
    key = "" if group == "best" else f"{group}_"
    return {f"{key}score": merged[metric], f"{key}gap": c.difference, f"{key}gap_low": c.low,
            f"{key}gap_high": c.high, f"{key}gap_p": c.p} | (
            {"best": merged[metric]} if group == "best" else {})  # fmt: skip


def _cost(recipe, cost: dict, best: str | None) -> dict:
    """The initial cost against the joint model, and the saving of maintaining one language
    (its expert retrained, the chosen merge redone) against retraining the joint model, from
    the ledger: by wall time (mean expert + the merge, over the joint job), and by training
    tokens (mean expert over the joint job: the same work per token), which does not depend on
    how busy the machine was when each job ran."""
    import statistics as st

    from langmerge.project.registry import Registry

    experts = [e["wall_s"] for e in cost["experts"].values()]
    name = best.removeprefix("merged:").split("#")[0] if best else None
    merge = cost["merges_s"].get(name, cost["merge_s"])
    update = st.fmean(experts) + merge
    registry = Registry(recipe.run_dir)
    try:
        seeds = [j for j in registry.ledger() if j["kind"] == "seed" and j["status"] == "done"]
    finally:
        registry.close()
    seed_tokens = seeds[-1]["tokens"] if seeds and cost.get("seed_s") else 0
    tokens = [e["tokens"] for e in cost["experts"].values()]
    return {"seed_s": cost.get("seed_s", 0.0), "experts_serial_s": cost["experts_serial_s"],
            "joint_s": cost["joint_s"], "merge_s": merge,
            "initial_vs_joint": cost["serial_vs_joint"],
            "initial_tokens_vs_joint": (seed_tokens + sum(tokens)) / cost["joint_tokens"],
            "update_saving": 1 - update / cost["joint_s"],
            "update_saving_tokens": 1 - st.fmean(tokens) / cost["joint_tokens"]}  # fmt: skip


def _steps(recipe) -> dict:
    from langmerge.project.registry import Registry

    registry = Registry(recipe.run_dir)
    try:
        rows = registry.trained("expert") + registry.trained("joint")
        return {(r.get("language") or "joint"): r["training"].get("steps") for r in rows}
    finally:
        registry.close()


def summarise(runs: list[dict]) -> list[dict]:
    """Per language: mean ± sd over seeds of joint, expert, the best merge and each group's gap
    to joint, with the per-seed intervals of the best merge's gap and how often each group's
    gap was significant."""
    codes = list(runs[0]["languages"])
    table = []
    for c in [*codes, "mean"]:

        def values(key: str, c: str = c) -> list[float]:
            if c == "mean":
                return [statistics.fmean(r["languages"][x][key] for x in codes) for r in runs
                        if all(key in r["languages"][x] for x in codes)]  # fmt: skip
            return [r["languages"][c][key] for r in runs if key in r["languages"][c]]

        row = {"language": c}
        for key in ("joint", "expert", "best", "gap", "weight_only_gap", "regmean_gap"):
            v = values(key)
            sd = statistics.stdev(v) if len(v) > 1 else 0.0
            row[key] = f"{statistics.fmean(v):+.3f} ± {sd:.3f}" if key.endswith("gap") and v else (
                f"{statistics.fmean(v):.3f} ± {sd:.3f}" if v else "—")  # fmt: skip
        if c != "mean":
            lows = [r["languages"][c]["gap_low"] for r in runs if "gap_low" in r["languages"][c]]
            highs = [r["languages"][c]["gap_high"] for r in runs if "gap_high" in r["languages"][c]]
            row["gap 95% (per seed)"] = ", ".join(
                f"[{lo:+.2f}, {hi:+.2f}]" for lo, hi in zip(lows, highs)
            )
            for key in ("", "weight_only_", "regmean_"):
                sig = sum(r["languages"][c].get(f"{key}gap_p", 1) < 0.05
                          and r["languages"][c].get(f"{key}gap", 0) < 0 for r in runs)  # fmt: skip
                row[f"{key}worse"] = f"{sig}/{len(runs)}"
        else:
            for key in (
                "initial_vs_joint",
                "initial_tokens_vs_joint",
                "update_saving",
                "update_saving_tokens",
            ):
                v = [r["cost"][key] for r in runs]
                row[key] = f"{statistics.fmean(v):.2f}"
        table.append(row)
    return table


ARMS = {"base": {}, "seed": {"experts.start": "seed"}}  # where the experts start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="kaomoji,manpages", help="comma-separated data sets")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated training seeds")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a recipe setting, e.g. training.learning_rate=1e-3 (YAML value)",
    )
    parser.add_argument("--work", type=Path, default=Path("/tmp/langmerge-quality"))
    parser.add_argument("--tag", default="", help="suffix of the results file")
    parser.add_argument(
        "--arms",
        default="base,seed",
        help="where the experts start: base, seed (run in this order; the seed arm shares the "
        "base arm's project, so its joint model is trained once)",
    )
    args = parser.parse_args()
    overrides = {k: yaml.safe_load(v) for k, v in (s.split("=", 1) for s in args.set)}
    seeds = [int(s) for s in args.seeds.split(",")]
    for name in args.data.split(","):
        suffix = "-".join(f"{k}={v}" for k, v in overrides.items())
        root = args.work / (name + (f"-{suffix}" if suffix else ""))
        out = HERE / "results" / f"quality-{name}{args.tag}.json"
        earlier = json.loads(out.read_text()) if out.is_file() else {}
        # the other arms of an earlier run with the same settings stay
        arms = earlier.get("arms", {}) if earlier.get("overrides") == overrides else {}
        for arm in sorted(args.arms.split(","), key=list(ARMS).index):  # base first
            if arm == "base" and _has_seed(root):
                sys.exit(f"{root} holds seed-started experts already: the base arm runs first "
                         "in a project (its newest experts are the ones studied)")  # fmt: skip
            recipe = write_project(root, name, overrides | ARMS[arm], f"recipe-{arm}.yaml")
            runs = []
            for seed in seeds:  # written after each seed: a long run keeps what it finished
                runs.append(study(recipe, seed))
                arms[arm] = {"seeds": [r["seed"] for r in runs], "runs": runs,
                             "table": summarise(runs)}  # fmt: skip
                _write(out, name, overrides, arms)
            print(f"\n{name}, experts from the {arm}: {runs[0]['metric']} on test, "
                  f"{len(seeds)} seeds (mean ± sd); degenerate models: "
                  f"{sum(len(r['degenerate']) for r in runs)}")  # fmt: skip
            _print(arms[arm]["table"])
        print(f"written: {out}")


def _write(out: Path, name: str, overrides: dict, arms: dict) -> None:
    machine = machine_info(("torch", "transformers", "peft"))
    result = {"data": name, "overrides": overrides, "arms": arms, "machine": machine}
    out.write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n")


def _has_seed(root: Path) -> bool:
    from langmerge.project.registry import DB_NAME, Registry

    if not (root / "run" / DB_NAME).is_file():
        return False
    registry = Registry(root / "run", read_only=True)
    try:
        return any(j["kind"] == "seed" for j in registry.ledger())
    finally:
        registry.close()


def _print(table: list[dict]) -> None:
    keys = list(dict.fromkeys(k for row in table for k in row))
    print("| " + " | ".join(keys) + " |")
    print("|" + "---|" * len(keys))
    for row in table:
        print("| " + " | ".join(str(row.get(k, "")) for k in keys) + " |")


if __name__ == "__main__":
    main()
