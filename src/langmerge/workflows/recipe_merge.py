"""`langmerge merge recipe.yaml`: merge the current expert of every language of a recipe with the
recipe's merge settings, and record the merge and its cost in the run directory's registry."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

from langmerge.errors import ConfigError, InputError
from langmerge.evaluate.health import is_degenerate
from langmerge.merge.apply import run_merge
from langmerge.merge.config import MergeConfig, build_config
from langmerge.merge.methods import get_method, parameters_of
from langmerge.project.recipe import Recipe
from langmerge.train.statistics import FOLDER
from langmerge.workflows.training import ensure_statistics


def recipe_merge_config(recipe: Recipe, experts: dict[str, dict], overrides: dict) -> MergeConfig:
    """The merge of `experts` (language → registry row) that the recipe's `merge:` describes,
    with the settings its method takes; `overrides` (non-None values: command-line flags, a
    sweep's point) take precedence, and one the method does not take is refused."""
    bases = {e["base"] for e in experts.values()}
    if len(bases) > 1:
        raise InputError(
            "the current experts were trained from different base models "
            f"({', '.join(sorted(bases))}): retrain the odd ones with `langmerge train --force`"
        )
    m = recipe.merge
    weights = m.weights or {}
    method = get_method(overrides.get("method") or m.method)
    fallback = get_method(overrides.get("fallback") or m.fallback)
    shared = {"density": m.density, "lam": m.lam, "seed": m.seed, "alpha": m.alpha,
              "fallback": m.fallback}  # fmt: skip
    takes = parameters_of(method, fallback)
    data = {
        "method": m.method,
        **{k: v for k, v in shared.items() if k in takes},  # those this merge's method takes
        "allow_pickle": recipe.allow_pickle,
        "base": bases.pop(),
        "experts": [
            {"path": e["path"], "name": code, "weight": weights.get(code, 1.0)}
            | ({"statistics": str(statistics_dir(e))} if method.data_aware else {})
            for code, e in experts.items()
        ],
    }
    data.update({k: v for k, v in overrides.items() if v is not None})
    return build_config(data, "merge settings of the recipe")


def statistics_dir(expert: dict) -> Path:
    """Where the input statistics of an expert (its registry row) are kept: next to it."""
    return Path(expert["path"]) / FOLDER


def degenerate_experts(experts: dict[str, dict]) -> list[str]:
    """'expert de v2 is degenerate: …' for each expert (language → registry row) whose health
    check failed."""
    return [
        f"expert {code} v{e['version']} is degenerate: {'; '.join(e['health']['problems'])}"
        for code, e in experts.items()
        if is_degenerate(e.get("health"))
    ]


def merge_key(cfg: MergeConfig) -> str:
    """What a merge's result depends on: method, every parameter, the base and each expert's
    path and weight (a later `run` reuses a merge only when this is unchanged)."""
    settings = cfg.model_dump_json(exclude={"shard_size", "source"})
    return hashlib.sha256(settings.encode()).hexdigest()[:16]


def merge_recipe(
    recipe: Recipe,
    output: Path | None = None,
    overrides: dict | None = None,
    force: bool = False,
    progress: bool = True,
    name: str | None = None,
    serve: str | None = None,
    experts: dict[str, dict] | None = None,
    say: Callable[[str], None] = lambda _: None,
) -> tuple[dict, Path]:
    """Merge the recipe's current experts; returns the merge summary and the output path. The
    summary's `stale_experts` names experts trained with other recipe settings than today's.
    `name` labels the merge in the registry (`merged:NAME`; default: the method); with `serve`
    (the reason) the merge goes into service; `experts` (language → registry row) chooses the
    expert versions instead of the newest."""
    with recipe.rundir.serving():
        return _merge_recipe(recipe, output, overrides, force, progress, name, serve, experts, say)


def _merge_recipe(recipe, output, overrides, force, progress, name, serve, experts, say):
    run = recipe.rundir
    if not run.has_registry():
        raise ConfigError(
            f"no experts trained yet in {run.root}: run `langmerge train RECIPE --all` first"
        )
    with run.registry() as registry:
        if experts is None:  # default: the newest expert of every language
            experts = {code: registry.latest("expert", code) for code in recipe.languages}
        missing = [code for code, e in experts.items() if e is None]
        if missing:
            raise ConfigError(
                f"no trained expert for {', '.join(missing)}: run "
                f"`langmerge train RECIPE --lang {missing[0]}` (or --all) first"
            )
        gone = [f"{code} v{e['version']} ({e['path']})" for code, e in experts.items()
                if not Path(e["path"]).is_dir()]  # fmt: skip
        if gone:
            raise InputError(
                f"the files of expert {', '.join(gone)} are missing (deleted or moved?): "
                "`langmerge train RECIPE --all` trains what is missing again"
            )
        if bad := degenerate_experts(experts):
            if not recipe.merge.allow_degenerate:
                raise InputError(
                    f"{'; '.join(bad)}. A degenerate expert is not merged: retrain it (see "
                    "`langmerge ls` for the verdict and what to try), or pass "
                    "--allow-degenerate to merge it anyway (such a merge is never served)"
                )
            serve = None
        cfg = recipe_merge_config(recipe, experts, overrides or {})
        ids = [e["id"] for e in experts.values()]
        inputs = hashlib.sha256(
            "".join(f"{e['id']}:{e['data_hash']};" for e in experts.values()).encode()
        ).hexdigest()[:16]
        with run.job(registry, "merge", list(experts), (recipe.digest(), inputs)) as job:
            out = Path(output) if output else run.merge(job.id, cfg.method)
            collected = []
            if get_method(cfg.method).data_aware:  # experts trained without them
                collected = ensure_statistics(recipe, experts, say)
            summary = run_merge(cfg, out, force=force, progress=progress)
            summary["statistics_collected"] = collected
            params = cfg.model_dump(mode="json", exclude={"base", "experts", "method"})
            params["weights"] = dict(zip(experts, cfg.weights))
            params["name"] = name or cfg.method
            params["key"] = merge_key(cfg)
            summary["merge_id"] = registry.finish_merge(
                job.id, job.cost(), cfg.method, params, ids, str(out), serve
            )
        summary["served"] = serve is not None
        summary["degenerate_experts"] = bad
        summary["stale_experts"] = [
            f"{code} v{e['version']}"
            for code, e in experts.items()
            if e["recipe_hash"] != recipe.digest()
        ]
        return summary, out


def merge_once(
    recipe: Recipe,
    experts: dict[str, dict],
    overrides: dict,
    name: str,
    progress: bool = True,
    say: Callable[[str], None] = lambda _: None,
) -> int:
    """The id of the merge `name` of `experts` (language → registry row) with these settings:
    the one the registry already has (its files still there), else a new one, recorded and not
    served."""
    key = merge_key(recipe_merge_config(recipe, experts, overrides))
    with recipe.rundir.registry() as registry:
        merges = registry.merges()
    done = [
        m
        for m in merges
        if m["params"].get("name") == name
        and m["params"].get("key") == key
        and Path(m["path"]).is_dir()
    ]
    if done:
        say(f"merge {name}: up to date ({done[-1]['path']})")
        return done[-1]["id"]
    summary, out = merge_recipe(recipe, None, overrides, progress=progress, name=name,
                                experts=experts, say=say)  # fmt: skip
    say(f"merge {name}: {out} ({summary['seconds']:.1f} s)")
    return summary["merge_id"]
