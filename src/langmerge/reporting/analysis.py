"""`langmerge analyze`: how the experts of the merge in service relate (their task-vector
statistics, `merge.vectors`, kept in the run directory) and interfere — each language's merged
score minus its expert's — with the tables and figures that show it."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

from langmerge.data.prepare import load_data
from langmerge.errors import ConfigError
from langmerge.files import atomic_write
from langmerge.merge.io import ModelFiles, load_adapter
from langmerge.merge.vectors import VectorStats, compare_experts
from langmerge.project.recipe import primary_metric
from langmerge.reporting import figures
from langmerge.workflows.evaluation import evaluate, evaluation_key
from langmerge.workflows.models import merge_ref

# ---- a project's experts and the merge in service ------------------------------------------

CACHE_VERSION = 1  # raise when what `compare_experts` computes changes


def expert_stats(experts: dict[str, dict], cache: Path) -> VectorStats:
    """`compare_experts` of registry experts (language → row), kept in `cache`: forming every
    module's ΔW takes minutes at 8B scale, and each `report` asks again."""
    key = cache_key(experts)
    path = cache / f"{key}.json"
    try:
        return VectorStats.from_json(json.loads(path.read_text()))
    except (OSError, ValueError, KeyError, TypeError):
        pass  # not kept yet, or damaged: computed again
    adapters = {c: load_adapter(Path(e["path"]), label=c) for c, e in experts.items()}
    base = ModelFiles(Path(next(iter(experts.values()))["base"]), label="base")
    try:
        stats = compare_experts(adapters, base)
    finally:
        base.close()
    try:  # best effort: a read-only run directory or a full disk only costs the next report
        cache.mkdir(exist_ok=True)
        atomic_write(path, json.dumps(stats.to_json()))
    except OSError:
        pass
    return stats


def cache_key(experts: dict[str, dict]) -> str:
    """What the comparison depends on: each expert's identity and training (a registry rebuilt
    from scratch reuses ids and paths, not the end times), and the cache's format."""
    identity = [CACHE_VERSION] + [
        [c, e["id"], e["path"], e["base"], e["recipe_hash"], e["data_hash"], e.get("ended")]
        for c, e in experts.items()
    ]
    return hashlib.sha256(json.dumps(identity).encode()).hexdigest()[:16]


def analyze(recipe, evaluate_missing: bool = True, say=lambda _: None) -> dict:
    """Statistics of the experts the merge in service combines (the newest experts when none is
    in service) and its interference: per language, merged score − expert score on the recipe's
    evaluation split. With `evaluate_missing`, scores the registry lacks are computed (cached);
    else they are left out. Returns JSON-ready tables (pairs as "en-de")."""

    run = recipe.rundir
    run.require_trained()
    data = load_data(recipe.data_spec()).require_valid()
    split, metric = recipe.evaluation.split, primary_metric(recipe)
    with run.registry() as registry:
        current = registry.current_merge()
        if current is not None:
            by_id = {e["id"]: e for e in registry.trained("expert")}
            experts = {by_id[i]["language"]: by_id[i] for i in current["expert_ids"]}
        else:
            experts = {c: registry.latest("expert", c) for c in data.languages}
        if not experts or any(e is None for e in experts.values()):
            raise ConfigError("train an expert for every language first: `langmerge run`")
        newest = {c: registry.latest("expert", c)["id"] for c in experts}
    stats = expert_stats(experts, run.vectors)
    codes = [c for c in experts if c in data.languages]
    keys = {c: evaluation_key(recipe, data.languages[c].split_digests[split]) for c in codes}
    merged, own = {}, {}
    if current is not None:
        ref = merge_ref(current)
        with run.registry() as registry:
            merged = {c: registry.evaluation(ref, c, split, keys[c]) for c in codes}
            own = {c: registry.evaluation(f"expert:{c}:v{experts[c]['version']}", c, split,
                                          keys[c]) for c in codes}  # fmt: skip
        if evaluate_missing:
            if any(v is None for v in merged.values()):
                merged = evaluate(recipe, ref, codes, split, data, say=say)
            for c in codes:
                if own[c] is None and newest[c] == experts[c]["id"]:
                    own[c] = evaluate(recipe, f"expert:{c}", [c], split, data, say=say)[c]
    langs = stats.languages
    mean_cos = {a: sum(stats.cosine[(a, b)] for b in langs if b != a) / max(1, len(langs) - 1)
                for a in langs}  # fmt: skip
    per_language = {}
    for c in langs:
        m = merged.get(c)
        e = own.get(c)
        per_language[c] = {
            "norm": stats.norms[c],
            "mean_cosine": mean_cos[c],
            "mean_sign_conflict": sum(stats.sign_conflict[(c, b)] for b in langs if b != c)
            / max(1, len(langs) - 1),
            "merged": m[metric] if m else None,
            "expert": e[metric] if e else None,
            "interference": m[metric] - e[metric] if m and e else None,
        }
    known = [c for c in langs if per_language[c]["interference"] is not None]
    r = _pearson([mean_cos[c] for c in known],
                 [per_language[c]["interference"] for c in known])  # fmt: skip
    notes = [
        "Task vectors: every LoRA module's ΔW = s·B·A plus the trained head's change. Cosines "
        "come from the factors (⟨BᵢAᵢ, BⱼAⱼ⟩ = trace((BᵢᵀBⱼ)(AⱼAᵢᵀ)), no ΔW formed); a sign "
        "conflict is an entry where both experts are nonzero with opposite signs.",
        f"Across all experts, {stats.sign_conflict_all:.1%} of the entries where two or more "
        "experts are nonzero have mixed signs (what a TIES vote has to resolve).",
    ]
    if current is not None:
        notes.append(
            f"Interference: {metric} of the merge in service ({ref}) minus the expert's on its "
            f"own language, {split} split."
            + (f" Pearson r between a language's mean cosine and its interference: {r:+.2f} "
               f"over {len(known)} languages (few points: a hint, not evidence)."
               if r is not None else "")
        )  # fmt: skip
    for s in stats.skipped:
        notes.append(f"left out: {s}")

    pairs = [(a, b) for i, a in enumerate(langs) for b in langs[i + 1 :]]

    def pair(a: str, b: str) -> str:  # "/": language codes may hold "-" (pt-BR)
        return f"{a}/{b}"

    return {
        "languages": langs,
        "merge": ref if current is not None else None,
        "experts": {c: f"v{e['version']}" for c, e in experts.items()},
        "metric": metric,
        "cosine": stats.matrix()[1],
        "sign_conflict": stats.matrix(stats.sign_conflict)[1],
        "sign_conflict_all": stats.sign_conflict_all,
        "by_type": {pair(a, b): stats.by_type[(a, b)] for a, b in pairs},
        "by_layer": {
            pair(a, b): {str(k): c for k, c in stats.by_layer[(a, b)].items()} for a, b in pairs
        },
        "per_language": per_language,
        "pearson_r": r,
        "notes": notes,
    }


def _pearson(xs: list[float], ys: list[float]) -> float | None:
    if len(xs) < 3:
        return None
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sx = math.sqrt(sum((x - mx) ** 2 for x in xs))
    sy = math.sqrt(sum((y - my) ** 2 for y in ys))
    if sx == 0 or sy == 0:
        return None
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / (sx * sy)


def analysis_tables(found: dict) -> list[tuple[str, list[dict]]]:
    """The analysis as tables: the cosine matrix, pairs by module type, and per language."""
    langs = found["languages"]
    cos = [{"": a, **{b: f"{v:+.3f}" for b, v in zip(langs, row)}}
           for a, row in zip(langs, found["cosine"])]  # fmt: skip
    index = {a: i for i, a in enumerate(langs)}
    types = sorted({t for v in found["by_type"].values() for t in v})
    pairs = [{"pair": p, "cosine": f"{found['cosine'][index[a]][index[b]]:+.3f}",
              "sign conflicts": f"{found['sign_conflict'][index[a]][index[b]]:.1%}",
              **{t: f"{v.get(t, 0.0):+.3f}" for t in types}}
             for p, v in found["by_type"].items() for a, b in [p.split("/", 1)]]  # fmt: skip
    per = [{"language": c, "norm": f"{v['norm']:.3f}", "mean cosine": f"{v['mean_cosine']:+.3f}",
            "mean sign conflicts": f"{v['mean_sign_conflict']:.1%}",
            "merged": score_text(v["merged"]), "expert": score_text(v["expert"]),
            "merged − expert": "—" if v["interference"] is None else f"{v['interference']:+.3f}"}
           for c, v in found["per_language"].items()]  # fmt: skip
    return [
        ("cosine similarity of the task vectors", cos),
        ("pairs: cosine overall and per module type, sign-conflict rate", pairs),
        ("per language: norm, similarity to the others, interference", per),
    ]


def analysis_figures(found: dict) -> list[tuple[str, bytes, str]]:
    """(file stem, PNG, caption) of the heat map, per-layer cosines and interference."""

    langs = found["languages"]
    out = [("similarity", figures.heatmap(langs, found["cosine"], "cosine of task vectors"),
            "cosine similarity of the languages' task vectors")]  # fmt: skip
    layered = {p: {int(k): c for k, c in v.items() if k != "None"}
               for p, v in found["by_layer"].items()}  # fmt: skip
    if any(layered.values()):
        out.append(("layers", figures.layer_lines(layered, "cosine"),
                    "cosine per layer, one line per pair of languages"))  # fmt: skip
    points = {c: (v["mean_cosine"], v["interference"]) for c, v in found["per_language"].items()
              if v["interference"] is not None}  # fmt: skip
    if points:
        out.append(("interference", figures.scatter(points, "mean cosine to the other languages",
                    f"merged − expert ({found['metric']})"),
                    "interference against similarity"))  # fmt: skip
    return out


def score_text(value: float | None) -> str:
    """A score with 3 decimals, or a dash for none."""
    return "—" if value is None else f"{value:.3f}"
