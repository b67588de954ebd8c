"""Maintenance: update one language with new data, or add a language; retrain only that expert,
re-merge with the settings of the merge in service, evaluate every language, and put the new
merge in service only if no language got worse than the recipe allows (the regression guard).

Nothing changes the model in service until the very end: the data addition is recorded and the
new merge served in one step, so an update interrupted anywhere leaves the current model as it
was, and running it again finishes it (the expert, the merge and the evaluations done before
are found in the registry and reused). One maintenance at a time per run directory.
"""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from langmerge.data.prepare import load_data
from langmerge.data.sources import read_file
from langmerge.errors import ConfigError, InputError, LangmergeError, TrainingFailed
from langmerge.evaluate import stats
from langmerge.evaluate.health import is_degenerate
from langmerge.languages import problem as language_problem
from langmerge.merge.methods import get_method, parameters_of
from langmerge.merge.params import PARAMETERS
from langmerge.project.recipe import Recipe, primary_metric
from langmerge.project.rundir import RunDir
from langmerge.project.state import load_recipe, with_data
from langmerge.workflows.evaluation import evaluate_all, evaluation_health, per_example
from langmerge.workflows.models import merge_ref
from langmerge.workflows.recipe_merge import merge_once
from langmerge.workflows.training import Continuation, train

MERGE_SETTINGS = ("density", "lam", "seed", "normalize", "gamma", "epsilon", "t", "rescale",
                  "alpha", "fallback", "space")  # fmt: skip


class GuardError(LangmergeError):
    """The new merge made a language worse than the recipe allows; it is not in service."""

    def __init__(self, message: str, outcome: Outcome):
        super().__init__(message)
        self.outcome = outcome


@dataclass
class Outcome:
    """What one update or added language did."""

    language: str
    old_merge: str
    new_merge: str
    metric: str
    shifts: list[dict]  # per language: before, after, shift in points, guard verdict
    served: bool
    cost: dict
    alpha: float = 0.05  # the guard's significance level


def update(recipe: Recipe | Path, language: str, data: Path, add: bool = False,
           accept: bool = False, compare_joint: bool = False, progress: bool = True,
           say: Callable[[str], None] = lambda _: None,
           mode: str = "retrain") -> Outcome:  # fmt: skip
    """Add the examples in `data` to `language` (or, with `add`, a new language with them),
    retrain its expert (`mode` retrain: from the base on all its data; continue: the served
    version further, on the new examples only), re-merge, evaluate and guard. Raises GuardError
    (after recording the new merge, not in service) when a language got worse and `accept` is
    not given. `recipe`: a loaded recipe (its executor trains the expert) or its file."""
    if mode not in ("retrain", "continue"):
        raise ConfigError(f"--mode is retrain or continue, not {mode!r}")
    if mode == "continue" and add:
        raise ConfigError("a new language has no earlier expert to continue: use retrain")
    recipe = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    rerun = _check_request(recipe, language, data, add, _kept_path(Path(data), recipe.rundir))
    with recipe.rundir.serving():
        return _update(recipe, language, data, add, rerun, accept, compare_joint, progress, say,
                       mode)  # fmt: skip


def _check_request(recipe: Recipe, language: str, data: Path, add: bool, kept: Path) -> bool:
    """Refuse a request that cannot be carried out; returns whether it repeats an earlier one
    (its file was added before)."""
    rerun = language in recipe.languages and kept in recipe.languages[language].files()
    if add and language in recipe.languages and not rerun:
        raise ConfigError(f"{language} is already a language of the recipe: use `update`")
    if not add and language not in recipe.languages:
        raise ConfigError(
            f"the recipe has no language {language} (it has {', '.join(recipe.languages)}): "
            "use `add-language` for a new one"
        )
    if why := language_problem(language):
        raise ConfigError(why)
    if not Path(data).is_file():
        raise InputError(f"the data file {data} does not exist")
    recipe.rundir.require_trained()
    return rerun


def _update(recipe, language, data, add, rerun, accept, compare_joint, progress, say,
            mode) -> Outcome:  # fmt: skip
    with recipe.rundir.registry() as registry:
        current = registry.current_merge()
    if current is None:
        raise ConfigError("no merge is in service: run `langmerge run` or `langmerge merge` first")
    # the user's file is checked before anything is kept or trained
    checked = load_data(
        with_data(recipe, language, Path(data).absolute()).data_spec()
    ).require_valid()
    if not read_file(Path(data)):
        raise InputError(f"the data file {data} holds no examples: nothing to add")
    if not (add or rerun) and _count(checked, language) == _count(
        load_data(recipe.data_spec(), [language]), language
    ):
        raise InputError(
            f"every example of {data} is already in {language}'s data: nothing new to train on"
        )
    copy = _keep(Path(data), recipe.rundir)
    updated = with_data(recipe, language, copy)
    project = load_data(updated.data_spec()).require_valid()
    say(f"{'adding' if add else 'updating'} {language}: {_count(project, language)} examples now")
    continuation = _continuation(recipe, project, language, current) if mode == "continue" else None
    trained = train(updated, [language], progress=progress, say=say, continue_from=continuation)[0]
    if is_degenerate(trained.health) and not recipe.merge.allow_degenerate:
        raise TrainingFailed(
            f"the new expert {language} v{trained.version} is degenerate: "
            f"{'; '.join(trained.health['problems'])}. It is not merged and the model in service "
            f"is unchanged; try: {'; '.join(trained.health['advice'])} (or --allow-degenerate "
            "to merge it anyway, never served)"
        )
    new_id, new_name = _remerge(updated, current, language, progress, say)
    old_name = merge_ref(current)
    metric = primary_metric(updated)
    codes = list(project.languages)
    # one request: with the Ray executor both merges are scored at once
    before, after = evaluate_all(updated, [(old_name, codes), (new_name, codes)], data=project,
                                 say=say)  # fmt: skip
    alpha = recipe.guard.alpha if recipe.guard.require_significance else None
    shifts = guard(before, after, metric, language, add, recipe.guard.max_drop, alpha)
    new_health = evaluation_health(after, project, recipe.evaluation.split)
    degenerate = next((h["problems"] for h in (trained.health, new_health) if is_degenerate(h)),
                      [])  # fmt: skip
    failed = [s for s in shifts if not s["ok"]]
    serve = not degenerate and (not failed or accept)
    cost = saving(updated, project, trained, new_id, compare_joint, progress, say)
    result = {"cost": cost, "shifts": shifts, "metric": metric, "old_merge": old_name,
              "new_merge": new_name, "guard_overridden": serve and bool(failed),
              "degenerate": degenerate}  # fmt: skip
    _finish(updated, language, add, copy, new_id, serve, serve and bool(failed), result)
    outcome = Outcome(language, old_name, new_name, metric, shifts, serve, cost,
                      recipe.guard.alpha)  # fmt: skip
    if degenerate:
        raise GuardError(f"the new merge {new_name} is degenerate ({'; '.join(degenerate)}): it "
                         "is never served; the model in service is unchanged", outcome)  # fmt: skip
    if not serve:
        raise GuardError(_guard_message(outcome, failed), outcome)
    return outcome


def _continuation(recipe: Recipe, project, language: str, current: dict) -> Continuation:
    """The served expert of `language` and the training examples the update brings."""
    before = {e.text for e in load_data(recipe.data_spec(), [language]).languages[language].train}
    new = [e for e in project.languages[language].train if e.text not in before]
    with recipe.rundir.registry() as registry:
        served = [
            e for e in registry.trained("expert", language) if e["id"] in current["expert_ids"]
        ]
    if not served:
        raise ConfigError(f"nothing to continue: the merge in service has no {language} expert")
    if not new:
        raise ConfigError("nothing to continue: the new data adds no training examples")
    return Continuation(Path(served[0]["path"]), new)


def _keep(data: Path, run: RunDir) -> Path:
    """A copy of the added data inside the run directory, named by its content (unchanged when
    the user edits or deletes their file later; the same file twice is kept once)."""
    out = _kept_path(data, run)
    if not out.is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.partial")
        shutil.copyfile(data, tmp)
        tmp.rename(out)
    return out


def _kept_path(data: Path, run: RunDir) -> Path:
    """Where `_keep` puts (or has put) a copy of `data`."""
    if not data.is_file():
        return run.addition("missing")
    digest = hashlib.sha256(data.read_bytes()).hexdigest()
    return run.addition(f"{digest[:16]}{data.suffix}")


def _count(project, language: str) -> int:
    d = project.languages[language]
    return len(d.train) + len(d.validation) + len(d.test)


def _remerge(recipe: Recipe, current: dict, language: str, progress: bool, say) -> tuple[int, str]:
    """The served merge's experts, with `language`'s newest expert, merged with the settings of
    the merge in service (recorded, not served; the same merge made before is reused): its id
    and its reference (merged:NAME#ID)."""
    params = current["params"]
    method = get_method(current["method"])
    takes = parameters_of(method, get_method(params.get("fallback") or recipe.merge.fallback))
    # the served merge's settings that its method takes (older merges recorded them all)
    overrides = {k: params[k] for k in MERGE_SETTINGS
                 if k in params and (k in takes or k not in PARAMETERS)}  # fmt: skip
    overrides["method"] = current["method"]
    name = params.get("name") or current["method"]
    weights = params.get("weights") or {}
    recipe = recipe.model_copy(
        update={"merge": recipe.merge.model_copy(update={"weights": {
            code: weights.get(code, 1.0) for code in recipe.languages}})}
    )  # fmt: skip
    with recipe.rundir.registry() as registry:
        # the served merge's experts, and the newest of the language being updated or added
        served = {
            e["id"]: e for e in registry.trained("expert") if e["id"] in current["expert_ids"]
        }
        by_language = {e["language"]: e for e in served.values()}
        # the served languages, and the one updated or added: nothing else slips in
        codes = [c for c in recipe.languages if c in by_language or c == language]
        experts = {
            code: registry.latest("expert", code) if code == language else by_language[code]
            for code in codes
        }
        missing = [code for code, e in experts.items() if e is None]
        if missing:
            raise ConfigError(f"no expert for {', '.join(missing)}: run `langmerge train` first")
    merge_id = merge_once(recipe, experts, overrides, name, progress, say)
    return merge_id, f"merged:{name}#{merge_id}"


def guard(
    before: dict[str, dict], after: dict[str, dict], metric: str, language: str, add: bool,
    max_drop: float, alpha: float | None = None,
) -> list[dict]:  # fmt: skip
    """Per language: the metric before and after, the shift in points (×100), and the verdict.
    Other languages may drop at most `max_drop` points, the updated one not at all (a new
    language has no before to keep). With `alpha`, a drop beyond that blocks only when it is
    significant (paired test on the same test examples: McNemar exact or paired bootstrap);
    a larger drop that is not significant passes with a warning."""

    rows = []
    for code in after:
        old, new = before[code][metric], after[code][metric]
        shift = (new - old) * 100
        if code == language and add:
            rows.append({"language": code, "before": old, "after": new, "shift": shift,
                         "ok": True, "verdict": "ok", "rule": "the new language"})  # fmt: skip
            continue
        limit = 0.0 if code == language else max_drop
        rule = "must not drop" if code == language else f"may drop ≤ {max_drop:g}"
        row = {"language": code, "before": old, "after": new, "shift": shift, "rule": rule}
        x, y = per_example(after[code], metric), per_example(before[code], metric)
        dropped = round(shift, 9) < -limit  # 0.85 → 0.84 is a drop of 1.0, not 1.0000000000000009
        paired = bool(x and y and len(x) == len(y))
        if paired:  # the shift with its 95% interval, in points, and the test's p
            c = stats.compare(x, y)
            row.update(p=c.p, test=c.test, low=c.low * 100, high=c.high * 100)
        if alpha is not None and dropped and paired:
            row["significant"] = row["p"] < alpha
            row["rule"] += f", if significant at {alpha:g}"
            row["ok"] = not row["significant"]
            row["verdict"] = "FAIL" if row["significant"] else "warn"
        else:
            row["ok"] = not dropped
            row["verdict"] = "ok" if row["ok"] else "FAIL"
        rows.append(row)
    return rows


def warnings_of(shifts: list[dict]) -> list[str]:
    """Advice for the drops the guard let through because they were not significant."""
    return [
        f"{r['language']} dropped {-r['shift']:.1f} points, more than allowed, but not "
        f"significantly ({r['test']}, p = {r['p']:.2f}): add test examples for {r['language']} "
        "to tell a real drop from noise"
        for r in shifts
        if r.get("verdict") == "warn"
    ]


def saving(recipe, project, trained, merge_id: int, compare_joint: bool, progress, say) -> dict:
    """The update's cost (its expert's training and the re-merge) against retraining the joint
    model on all data including the new data: measured with `compare_joint`, else projected
    from the last joint job in the ledger, scaled by the optimiser steps it would take."""
    with recipe.rundir.registry() as registry:
        expert = next(e for e in registry.trained("expert", trained.language)
                      if e["version"] == trained.version)  # fmt: skip
        merge = next(m for m in registry.merges() if m["id"] == merge_id)
        merge_job = registry.job(merge["job_id"])
        joint = registry.latest("joint")
    # the joint job's step budget on all data now (min_steps and steps included)
    steps_now = recipe.training.budget(
        "joint", sum(len(d.train) for d in project.languages.values())
    )
    update_cost = {
        "wall_s": expert["wall_s"] + merge_job["wall_s"],
        "cpu_s": (expert["cpu_s"] or 0.0) + (merge_job["cpu_s"] or 0.0),
        "flops": (expert["flops"] or 0.0) + (merge_job["flops"] or 0.0),
        "expert_wall_s": expert["wall_s"],
        "merge_wall_s": merge_job["wall_s"],
    }
    joint_shifts = None
    if compare_joint:
        say("training the joint model on all data, to measure the saving")
        old_joint = joint
        train(recipe, joint=True, progress=progress, say=say)
        with recipe.rundir.registry() as registry:
            joint = registry.latest("joint")
        retrain = {"wall_s": joint["wall_s"], "cpu_s": joint["cpu_s"], "flops": joint["flops"],
                   "source": "measured"}  # fmt: skip
        if old_joint is not None and old_joint["version"] != joint["version"]:
            joint_shifts = _joint_shifts(recipe, project, old_joint, joint, say)
    elif joint is not None and (steps_then := (joint["training"] or {}).get("steps")):
        scale = steps_now / steps_then
        retrain = {
            "wall_s": joint["wall_s"] * scale,
            "cpu_s": (joint["cpu_s"] or 0.0) * scale,
            "flops": (joint["flops"] or 0.0) * scale,
            "source": f"projected from joint v{joint['version']} in the ledger "
            f"({joint['wall_s']:.1f} s for {steps_then} optimiser steps, scaled to "
            f"{steps_now})",
        }
    else:
        retrain = None
    out = {"update": update_cost, "joint_retrain": retrain, "joint_shifts": joint_shifts}
    if retrain:
        out["wall_saving"] = 1 - update_cost["wall_s"] / retrain["wall_s"]
        if retrain["cpu_s"]:
            out["cpu_saving"] = 1 - update_cost["cpu_s"] / retrain["cpu_s"]
        if retrain["flops"]:
            out["flops_saving"] = 1 - update_cost["flops"] / retrain["flops"]
    return out


def _joint_shifts(recipe, project, old: dict, new: dict, say) -> list[dict]:
    """How retraining the joint model on the new data moved each language (new − old joint on
    the same test examples): the yardstick for the merge's own shifts."""
    names = [f"joint:v{old['version']}", f"joint:v{new['version']}"]
    before, after = evaluate_all(recipe, [(n, None) for n in names], data=project, say=say)
    alpha = recipe.guard.alpha
    rows = guard(before, after, primary_metric(recipe), "", False, float("inf"), alpha)
    keep = ("language", "before", "after", "shift", "low", "high", "p")
    return [{k: r[k] for k in keep if k in r} for r in rows]


def _finish(recipe, language, add, copy, merge_id, serve, overridden, outcome: dict) -> None:
    """Record the step and, if it passed (or was accepted), the data addition and the new
    merge in service, in one registry transaction. A refused update records no addition, so
    the project stays as it was (the new expert and merge remain in the registry, unserved;
    `--accept` reuses them)."""
    kind = "add" if add else "update"
    reason = f"{kind} {language}" + (" (guard overridden)" if overridden else "")
    addition = None
    if serve:
        addition = (str(copy), hashlib.sha256(copy.read_bytes()).hexdigest(), reason)
    with recipe.rundir.registry() as registry:
        registry.record_step(language, kind, merge_id, outcome, addition)


def _guard_message(outcome: Outcome, failed: list[dict]) -> str:
    worst = ", ".join(f"{r['language']} {r['shift']:+.1f} ({r['rule']})" for r in failed)
    return (
        f"the new merge ({outcome.new_merge}) is recorded but not in service: {worst} points of "
        f"{outcome.metric}. Pass --accept to serve it anyway; the current model stays "
        f"{outcome.old_merge}"
    )


def rollback(path: Path, to: int | None = None) -> dict:
    """Serve merge `to`, or else the merge served before the current one (repeated rollbacks go
    further back: each rollback undoes one step of the serving history); its registry row."""
    run = load_recipe(path).rundir
    run.require_trained()
    with run.serving(), run.registry() as registry:
        if to is None:
            stack: list[int] = []
            for event in registry.serving():
                if event["reason"] == "rollback":
                    if stack:
                        stack.pop()
                else:
                    stack.append(event["merge_id"])
            if len(stack) < 2:
                raise ConfigError("no earlier merge was in service: nothing to roll back to")
            to = stack[-2]
            registry.serve(to, "rollback")
        else:
            registry.serve(to, f"served merge {to} by hand")
        return next(m for m in registry.merges() if m["id"] == to)
