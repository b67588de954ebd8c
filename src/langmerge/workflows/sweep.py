"""`langmerge sweep`: choose the merge on validation data. Every point of the recipe's grid
(method × density × λ × weights) is merged in memory from the current experts — never written
to disk — and scored per language; the best point by the languages' mean (or worst) score
becomes the recipe's merge setting, and goes into service only if it beats the merge in service
on the same validation data. Points are kept in the registry as they finish: an interrupted
sweep resumes, and a point already scored with the same experts and data is not redone."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from langmerge.data.prepare import ProjectData, load_data
from langmerge.errors import ConfigError, InputError, TrainingFailed
from langmerge.evaluate import stats
from langmerge.evaluate.health import is_degenerate
from langmerge.merge.apply import open_statistics
from langmerge.merge.io import ModelFiles, check_finite, load_adapter
from langmerge.merge.methods import check_inputs, get_method
from langmerge.merge.regmean import ALPHA
from langmerge.merge.stream import adapter_merge, check_adapters, regmean_merge
from langmerge.progress import progress_bar
from langmerge.project.recipe import Recipe, Sweep, primary_metric
from langmerge.project.registry import Registry
from langmerge.project.state import CHOSEN, merge_settings
from langmerge.workflows.evaluation import (
    evaluate,
    evaluation_health,
    evaluation_key,
    per_example,
    require_split,
    score,
)
from langmerge.workflows.models import ModelRef, load, merge_ref
from langmerge.workflows.recipe_merge import (
    degenerate_experts,
    merge_key,
    merge_once,
    recipe_merge_config,
)
from langmerge.workflows.training import ensure_statistics


@dataclass(frozen=True)
class Point:
    """One merge setting of the grid."""

    method: str
    density: float = 1.0
    lam: float = 1.0
    weights: tuple[tuple[str, float], ...] = ()  # () = every language weight 1
    alpha: float = ALPHA  # regmean

    def name(self) -> str:
        """ties-d0.5-l1.2, regmean-l1-a0.5 (`grid` adds -w1 for the first of the sweep's
        `weights`, …)."""
        method = get_method(self.method)
        parts = [self.method]
        if method.sparsify != "none":
            parts.append(f"d{self.density:g}")
        parts.append(f"l{self.lam:g}")
        if method.data_aware:
            parts.append(f"a{self.alpha:g}")
        return "-".join(parts)

    def settings(self) -> dict:
        return {"method": self.method, "density": self.density, "lam": self.lam,
                "alpha": self.alpha, "weights": dict(self.weights) or None}  # fmt: skip


def grid(sweep: Sweep) -> list[tuple[str, Point]]:
    """The sweep's points with their names, simplest first: equal weights before the grid's
    weightings, then the grid's order of methods, λ nearest 1, density highest. Of points with
    equal scores the sweep picks the simplest. Of points that make the same merge (see
    `effect`) only the first is kept."""
    left_out = duplicates(sweep)
    return [(name, p) for name, p in _all_points(sweep) if name not in left_out]


def duplicates(sweep: Sweep) -> dict[str, str]:
    """The points `grid` leaves out because an earlier one makes the same merge: name → kept."""
    kept: dict[tuple, str] = {}
    out = {}
    for name, p in _all_points(sweep):
        first = kept.setdefault(effect(p), name)
        if first != name:
            out[name] = first
    return out


def _all_points(sweep: Sweep) -> list[tuple[str, Point]]:
    points: dict[str, tuple[tuple, Point]] = {}
    weightings = [()] + [tuple(sorted(w.items())) for w in sweep.weights]
    for i, weights in enumerate(weightings):
        for j, entry in enumerate(sweep.grid):
            method = get_method(entry.method)
            if weights and not method.uses_weights:
                continue
            densities = entry.density if method.sparsify != "none" else [1.0]
            lams = sweep.lam if method.combine != "slerp" else [1.0]
            alphas = sweep.alpha if method.data_aware else [ALPHA]
            for d in densities:
                for lam in lams:
                    for alpha in alphas:
                        p = Point(method.name, d, lam, weights, alpha)
                        order = (i, j, abs(lam - 1.0), -lam, -d, abs(alpha - ALPHA))
                        points.setdefault(p.name() + (f"-w{i}" if i else ""), (order, p))
    ranked = sorted(points.items(), key=lambda item: item[1][0])
    return [(name, p) for name, (_, p) in ranked]


def effect(p: Point) -> tuple:
    """What a point's merge computes: equal for points that give the same merged model (at
    density 1 trimming and DARE keep every entry, so they do nothing)."""
    m = get_method(p.method)
    sparsify = "none" if m.sparsify in ("trim", "dare") and p.density == 1.0 else m.sparsify
    return (sparsify, p.density if sparsify != "none" else 1.0, m.combine, m.normalize, m.knots,
            p.lam if m.combine != "slerp" else 1.0, p.weights,
            p.alpha if m.data_aware else None)  # fmt: skip


def edges(sweep: Sweep, winner: Point) -> list[str]:
    """The winner's settings that sit at the end of a range the grid tried: the best merge may
    lie beyond it."""
    m = get_method(winner.method)
    entry = next((e for e in sweep.grid if get_method(e.method).name == m.name), None)
    axes = [("lambda", sweep.lam, winner.lam, m.combine != "slerp")]
    if entry is not None:
        axes.append(("density", entry.density, winner.density, m.sparsify != "none"))
    axes.append(("alpha", sweep.alpha, winner.alpha, m.data_aware))
    out = []
    for key, values, value, used in axes:
        if not used or len(set(values)) < 2 or value not in (min(values), max(values)):
            continue
        if key in ("density", "alpha") and value == 1.0:
            continue  # neither can go beyond 1
        end = "largest" if value == max(values) else "smallest"
        where = f"sweep.{key}" if key != "density" else f"the grid's densities of {m.name}"
        out.append(f"{key} {value:g} is the {end} value tried: the best may lie beyond it "
                   f"(widen {where})")  # fmt: skip
    return out


def selection_score(metrics: dict[str, dict], metric: str, select: str) -> float:
    """A point's score: the mean or the worst of `metric` over the languages."""
    values = [m[metric] for m in metrics.values()]
    return min(values) if select == "worst" else sum(values) / len(values)


def choose(scored: list[tuple[str, dict[str, dict]]], metric: str, select: str) -> str:
    """The name of the best point of `scored` (name, language → metrics), simplest first: of
    equal scores the earlier wins."""
    order = range(len(scored))
    best = max(order, key=lambda i: (selection_score(scored[i][1], metric, select), -i))
    return scored[best][0]


def sweep(
    recipe: Recipe,
    progress: bool = True,
    say: Callable[[str], None] = lambda _: None,
) -> dict:
    """Run the recipe's sweep (see the module docstring); returns the recorded result."""
    recipe.rundir.require_trained()
    data = load_data(recipe.data_spec()).require_valid()
    codes = list(data.languages)
    require_split(data, codes, "validation")
    points = grid(recipe.sweep)
    for _, p in points:
        weights = [dict(p.weights).get(c, 1.0) for c in codes] if p.weights else None
        check_inputs(get_method(p.method), len(codes), weights)
    with recipe.rundir.serving():
        return _sweep(recipe, data, codes, points, progress, say)


def _sweep(recipe, data: ProjectData, codes, points, progress, say) -> dict:
    run = recipe.rundir
    with run.registry() as registry:
        experts = usable_experts(registry, codes)
        missing = [c for c, e in experts.items() if e is None]
        if missing:
            raise ConfigError(
                f"no trained expert for {', '.join(missing)}: run `langmerge train RECIPE --all`"
            )
        if (bad := degenerate_experts(experts)) and not recipe.merge.allow_degenerate:
            raise InputError(
                f"{'; '.join(bad)}. A degenerate expert is not merged: retrain it, or pass "
                "--allow-degenerate (the sweep then serves nothing)"
            )
        metric, select = primary_metric(recipe), recipe.sweep.select
        keys = {c: evaluation_key(recipe, data.languages[c].digest) for c in codes}
        configs = {name: _config(recipe, experts, p) for name, p in points}
        point_keys = {name: _point_key(cfg, keys) for name, cfg in configs.items()}
        found = {n: registry.sweep_point(k) for n, k in point_keys.items()}
        todo = [(n, p) for n, p in points if found[n] is None]
        same = ", ".join(f"{a} = {b}" for a, b in duplicates(recipe.sweep).items())
        say(f"sweep: {len(points)} points, {len(points) - len(todo)} already scored"
            + (f" (left out, the same merge as another: {same})" if same else ""))  # fmt: skip
        with run.job(registry, "sweep", codes, (recipe.digest(), _digest(keys))) as job:
            used = job.tally
            if any(get_method(p.method).data_aware for _, p in todo):
                ensure_statistics(recipe, experts, say)  # for experts trained without them
            merger = InMemoryMerge(recipe, data, experts) if todo else None
            with progress_bar("sweep", len(todo), progress) as step:
                for name, p in todo:
                    step(name)
                    start = time.perf_counter()
                    merger.apply(configs[name])
                    metrics, n_tokens, n_examples = merger.score(codes, "validation")
                    seconds = time.perf_counter() - start
                    used.tokens, used.examples = used.tokens + n_tokens, used.examples + n_examples
                    ids = [e["id"] for e in experts.values()]
                    registry.record_sweep_point(job.id, point_keys[name], name, p.settings(), ids,
                                                metrics, seconds)  # fmt: skip
                    found[name] = registry.sweep_point(point_keys[name])
                    value = selection_score(metrics, metric, select)
                    say(f"  {name}: {select} {metric} {value:.3f} ({seconds:.1f} s)")
            healthy = [n for n, _ in points if not is_degenerate(
                evaluation_health(found[n]["metrics"], data, "validation"))]  # fmt: skip
            if not healthy:
                raise TrainingFailed("every merge of the sweep is degenerate on validation "
                                     "(predictions collapsed): nothing to choose")  # fmt: skip
            if len(healthy) < len(points):
                say(f"sweep: {len(points) - len(healthy)} degenerate point(s) left out of the "
                    "choice")  # fmt: skip
            best = choose([(n, found[n]["metrics"]) for n in healthy], metric, select)
            alpha = recipe.evaluation.alpha
            winner, simpler = settle(healthy, found, best, metric, select, alpha)
            result = {
                "select": select,
                "metric": metric,
                "languages": codes,
                "degenerate": [n for n, _ in points if n not in healthy],
                "points": [
                    {
                        "name": n,
                        **found[n]["settings"],
                        "metrics": found[n]["metrics"],
                        "score": selection_score(found[n]["metrics"], metric, select),
                        "seconds": found[n]["seconds"],
                    }
                    for n, _ in points
                ],
                "best": best,
                "best_score": selection_score(found[best]["metrics"], metric, select),
                "simpler": simpler,
                "alpha": alpha,
                "winner": winner,
                "winner_score": selection_score(found[winner]["metrics"], metric, select),
                "choice": {k: found[winner]["settings"][k] for k in CHOSEN},
                "recipe_merge": merge_settings(recipe),
                "expert_wall_s": {c: e["wall_s"] for c, e in experts.items()},
                "duplicates": duplicates(recipe.sweep),
                "edges": edges(recipe.sweep, dict(points)[best]),
            }
            if all(data.languages[c].split("test") for c in codes):  # the winner's, alone
                if merger is None:
                    merger = InMemoryMerge(recipe, data, experts)
                merger.apply(configs[winner])
                result["test"], n_tokens, n_examples = merger.score(codes, "test")
                used.tokens, used.examples = used.tokens + n_tokens, used.examples + n_examples
            result["scored_here"] = len(todo)
            result["id"] = registry.finish_sweep(job.id, job.cost(), result)
        result["job_s"] = job.wall_s()
    # the decision's evaluation and merge are ledger jobs of their own, after the sweep's
    if bad:
        say("degenerate experts: the sweep's choice is recorded, nothing is served")
        serve = None
    else:
        serve = _against_current(recipe, data, codes, dict(points)[winner], winner, experts,
                                 result, progress, say)  # fmt: skip
    result["sweep_s"] = sum(p["seconds"] for p in result["points"])
    with run.registry() as registry:
        registry.conclude_sweep(result["id"], result, serve)
    if serve is not None and "test" in result:  # the registry's own test scores of it
        evaluate(recipe, result["served"], codes, "test", data, say=say)
    return result


def usable_experts(registry: Registry, codes: list[str]) -> dict[str, dict | None]:
    """The newest expert of each language, except one that only a refused maintenance step
    made (its data was never added to the project): then the one in service."""
    current = registry.current_merge()
    in_service = set(current["expert_ids"]) if current else set()
    merges = {m["id"]: m for m in registry.merges()}
    refused = {i for step in registry.steps() if not step["served"]
               for i in merges[step["merge_id"]]["expert_ids"]} - in_service  # fmt: skip
    served = {e["language"]: e for e in registry.trained("expert") if e["id"] in in_service}
    out = {}
    for code in codes:
        newest = registry.latest("expert", code)
        out[code] = served.get(code) if newest and newest["id"] in refused else newest
    return out


def _against_current(recipe, data, codes, point: Point, winner: str, experts, result, progress,
                     say) -> tuple[int, str] | None:  # fmt: skip
    """(merge id, reason) when the winner should go into service: it scores higher on
    validation than the merge in service (or none is). The winner is then written as a merge."""
    with recipe.rundir.registry() as registry:
        current = registry.current_merge()
    metric, select = result["metric"], result["select"]
    if current is not None:
        ref = merge_ref(current)
        scores = evaluate(recipe, ref, codes, "validation", data, say=say)
        result["current"] = {"name": ref, "metrics": scores,
                             "score": selection_score(scores, metric, select)}  # fmt: skip
        winner_metrics = next(p["metrics"] for p in result["points"] if p["name"] == winner)
        c = compare_points(winner_metrics, scores, metric, select)
        if c is not None:
            result["current"]["comparison"] = _comparison(c)
        better = result["winner_score"] > result["current"]["score"]
        if not better or (c is not None and not c.significant(result["alpha"])):
            say(f"the merge in service ({ref}) scores {result['current']['score']:.3f}, the "
                f"sweep's choice {result['winner_score']:.3f}"
                + (f" (not significantly better, p = {c.p:.2f})" if better and c else "")
                + ": it stays in service")  # fmt: skip
            return None
    weighted = _with_weights(recipe, point)
    merge_id = merge_once(weighted, experts, _overrides(point), winner, progress, say)
    before = f" vs {result['current']['score']:.3f} of the merge in service" if current else ""
    reason = (f"sweep winner {winner}: validation {select} {metric} "
              f"{result['winner_score']:.3f}{before}")  # fmt: skip
    result["served"] = f"merged:{winner}#{merge_id}"
    return merge_id, reason


class InMemoryMerge:
    """The base model loaded once; `apply` sets its adapted weights to θ₀ + τ of one merge."""

    def __init__(self, recipe: Recipe, data: ProjectData, experts: dict[str, dict]):
        self.recipe, self.data = recipe, data
        base_dir = Path(next(iter(experts.values()))["base"])
        self.adapters = [load_adapter(Path(e["path"]), label=c) for c, e in experts.items()]
        files = ModelFiles(base_dir, label="base")
        try:
            check_adapters(files, self.adapters)
        finally:
            files.close()
        self.model, self.tokenizer = load(ModelRef("base", base_dir, base_dir), recipe, data.labels)
        state = self.model.state_dict(keep_vars=True)
        names = sorted({n for a in self.adapters for n in (*a.modules, *a.saved)})
        unknown = [n for n in names if n not in state]
        if unknown:
            raise InputError(
                f"the experts update {unknown[0]}, which the model loaded from {base_dir} lacks"
            )
        self.params = {n: state[n] for n in names}
        # kept in the checkpoint's dtype (half the memory of float32 for a bf16 model)
        self.originals = {n: t.detach().cpu().clone() for n, t in self.params.items()}

    @torch.no_grad()
    def apply(self, cfg) -> None:
        method = get_method(cfg.method)
        if method.data_aware:
            stats = open_statistics(cfg)
            fallback = adapter_merge(self.adapters, get_method(cfg.fallback), cfg.weights,
                                     cfg.params())  # fmt: skip
            merged = regmean_merge(self.adapters, stats, cfg.weights, cfg.alpha, fallback, {},
                                   cfg.lam)  # fmt: skip
        else:
            stats = []
            merged = adapter_merge(self.adapters, method, cfg.weights, cfg.params())
        try:
            self._set(merged, cfg.method)
        finally:
            for s in stats:
                s.close()

    def _set(self, merged, method: str) -> None:
        for name, param in self.params.items():
            theta = self.originals[name].float()
            delta = merged(name, theta.clone())
            out = theta if delta is None else theta + delta
            check_finite(out, name, f"the {method} merge (overflow?)")
            param.data.copy_(out.to(param.dtype))

    def score(self, codes: list[str], split: str) -> tuple[dict, int, int]:
        """Metrics per language on `split`, the input tokens read and the examples scored."""
        out, tokens, examples = {}, 0, 0
        for code in codes:
            part = self.data.languages[code].split(split)
            out[code], n = score(self.model, self.tokenizer, self.recipe, part, self.data.labels)
            tokens, examples = tokens + n, examples + len(part)
        return out, tokens, examples


def compare_points(a: dict, b: dict, metric: str, select: str):
    """Paired comparison of two sets of per-language metrics (a − b) by the sweep's selection;
    None when either lacks per-example scores."""

    xs = {c: per_example(m, metric) for c, m in a.items()}
    ys = {c: per_example(b.get(c), metric) for c in a}
    if not all(xs.values()) or not all(ys.values()):
        return None
    if any(len(xs[c]) != len(ys[c]) for c in xs):
        return None
    return stats.compare_languages(xs, ys, select)


def settle(names: list[str], found: dict, best: str, metric: str, select: str,
           alpha: float) -> tuple[str, dict | None]:  # fmt: skip
    """The point to choose from `names` (simplest first): the best-scoring one when it beats
    every simpler point significantly at `alpha`; otherwise the simplest point it does not
    beat significantly, with that comparison."""
    for name in names:
        if name == best:
            break
        c = compare_points(found[best]["metrics"], found[name]["metrics"], metric, select)
        if c is None:  # scored without per-example values: by the score alone
            break
        if not c.significant(alpha):
            return name, {"than": name, **_comparison(c)}
    return best, None


def _comparison(c) -> dict:
    return {"difference": c.difference, "low": c.low, "high": c.high, "p": c.p, "test": c.test}


def _overrides(p: Point) -> dict:
    return {"method": p.method, "density": p.density, "lam": p.lam, "alpha": p.alpha}


def _with_weights(recipe: Recipe, p: Point) -> Recipe:
    merge = recipe.merge.model_copy(update={"weights": dict(p.weights) or None})
    return recipe.model_copy(update={"merge": merge})


def _config(recipe: Recipe, experts: dict[str, dict], p: Point):
    return recipe_merge_config(_with_weights(recipe, p), experts, _overrides(p))


def _point_key(cfg, eval_keys: dict[str, str]) -> str:
    text = json.dumps([merge_key(cfg), eval_keys, "validation"], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _digest(keys: dict[str, str]) -> str:
    return hashlib.sha256(json.dumps(keys, sort_keys=True).encode()).hexdigest()[:16]
