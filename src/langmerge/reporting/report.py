"""`langmerge report`: the project on one self-contained HTML page (figures embedded, nothing
fetched) and its Markdown twin, from the registry alone: quality per language and model, cost
of the initial build and of each maintenance step, the sweep, how the language experts relate,
and the history of versions. Written into RUN_DIR/report/ whole, then swapped in."""

from __future__ import annotations

import base64
import html
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from langmerge.data.prepare import ProjectData, load_data
from langmerge.errors import LangmergeError
from langmerge.evaluate.health import summary as health_summary
from langmerge.evaluate.stats import METHOD
from langmerge.files import atomic_output_dir
from langmerge.project.recipe import Recipe, primary_metric
from langmerge.project.registry import Registry
from langmerge.project.state import load_recipe
from langmerge.reporting import figures
from langmerge.reporting.analysis import analysis_figures, analysis_tables, analyze, score_text
from langmerge.reporting.status import history_rows
from langmerge.reporting.tables import (
    cost_rows,
    markdown_table,
    note,
    point_rows,
    quality_rows,
    seed_rows,
    summary_lines,
)
from langmerge.workflows.evaluation import (
    evaluation_health,
    evaluation_key,
    interval,
    with_interval,
)
from langmerge.workflows.models import merge_ref, resolve
from langmerge.workflows.study import Study, cost_table


@dataclass
class Section:
    """One part of the report: text, tables (title, rows of equal keys) and figures."""

    title: str
    text: list[str] = field(default_factory=list)
    tables: list[tuple[str, list[dict]]] = field(default_factory=list)
    figures: list[tuple[str, bytes, str]] = field(default_factory=list)  # file stem, PNG, caption


def write_files(folder: Path, pictures: list[tuple[str, bytes, str]], data: dict) -> Path:
    """PNG figures and JSON files into `folder`, replaced whole; returns the folder."""
    with atomic_output_dir(folder, force=True) as tmp:
        for stem, png, _ in pictures:
            (tmp / f"{stem}.png").write_bytes(png)
        for name, value in data.items():
            (tmp / name).write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n")
    return folder


def write_report(recipe_path: Path) -> Path:
    """Build the report of the recipe's run directory; returns the HTML file's path."""
    recipe = load_recipe(recipe_path)
    run = recipe.rundir
    run.require_trained()
    sections = build(recipe, Path(recipe_path))
    title = f"langmerge report: {Path(recipe_path).name}"
    with atomic_output_dir(run.report, force=True) as tmp:
        (tmp / "figures").mkdir()
        for s in sections:
            for stem, png, _ in s.figures:
                (tmp / "figures" / f"{stem}.png").write_bytes(png)
        (tmp / "report.html").write_text(to_html(title, sections))
        (tmp / "report.md").write_text(to_markdown(title, sections))
    return run.report / "report.html"


def build(recipe: Recipe, recipe_path: Path) -> list[Section]:
    """Every section the registry has data for."""
    data = load_data(recipe.data_spec()).require_valid()
    with recipe.rundir.registry() as registry:
        found = quality(recipe, data, registry)
        sections = [_overview(recipe, data, registry), _study(recipe)]
        sections += [_quality(recipe, data, found)]
        sections += [_health(recipe, data, registry, found)]
        sections += [_cost(recipe, data, registry), _sweep(registry)]
    sections.append(_seeds(recipe))
    sections.append(_vectors(recipe))
    sections.append(_history(recipe_path))
    return [s for s in sections if s.text or s.tables or s.figures]


def _overview(recipe: Recipe, data: ProjectData, registry: Registry) -> Section:
    current = registry.current_merge()
    serving = merge_ref(current) if current else "none yet"
    return Section("Project", [
        f"Base model: {recipe.base}. Task: {recipe.task.kind}"
        + (f" into {len(data.labels)} labels" if data.labels else "") + ".",
        f"Languages: {', '.join(data.languages)}. Model in service: {serving}.",
        f"Scores are {primary_metric(recipe)} on the {recipe.evaluation.split} split unless "
        "stated; every number comes from the run directory's registry "
        f"({recipe.rundir.registry_file}), written {time.strftime('%Y-%m-%d %H:%M')}.",
    ])  # fmt: skip


def _study(recipe: Recipe) -> Section:
    """The comparison of the last `langmerge run` as it found it — joint, merges, experts, best
    merge − joint — kept after maintenance steps changed the models and the data."""

    path = recipe.rundir.results
    section = Section("The study (`langmerge run`)")
    try:
        found = json.loads(path.read_text())
        fields = ("languages", "metric", "split", "quality", "best_merge", "cost", "health")
        study = Study(**{k: found[k] for k in fields})
    except (OSError, ValueError, KeyError, TypeError):
        return section  # no study yet (or one this version cannot read): nothing to show
    written = time.strftime("%Y-%m-%d %H:%M", time.localtime(path.stat().st_mtime))
    section.text.append(
        f"{study.metric} per language on the {study.split} split as the last `langmerge run` "
        f"found it ({path}, {written}); `*`: the merge it put in service; the last row is the "
        f"best merge minus the joint model on the same test examples, paired ({METHOD}). "
        "Maintenance steps since then are in the sections below."
    )
    section.tables.append((f"{study.metric}, the study", quality_rows(study)))
    return section


def quality(recipe: Recipe, data: ProjectData, registry: Registry) -> dict[str, dict]:
    """Row label → language → metrics (None where not evaluated) of the models the registry
    evaluated on the recipe's split: joint, the compared merges, the merge in service, the
    experts on their own language and the base. A model not scored on a language's current data
    gets its newest score on earlier data, marked `earlier_data`."""
    split, codes = recipe.evaluation.split, list(data.languages)
    keys = {c: evaluation_key(recipe, data.languages[c].split_digests[split]) for c in codes}
    rows: dict[str, dict[str, str]] = {}  # label → language → registry model name
    joint = registry.latest("joint")
    if joint:
        rows["joint"] = dict.fromkeys(codes, f"joint:v{joint['version']}")
    merges = registry.merges()
    newest = {m["params"].get("name") or m["method"]: m for m in merges}
    current = registry.current_merge()
    shown = [newest[v.name()] for v in recipe.merge.compare if v.name() in newest]
    if current and current["id"] not in {m["id"] for m in shown}:
        shown.append(current)
    for m in shown:
        name = merge_ref(m)
        label = name + (" (in service)" if current and m["id"] == current["id"] else "")
        rows[label] = dict.fromkeys(codes, name)
    experts = {c: registry.latest("expert", c) for c in codes}
    rows["experts (own language)"] = {
        c: f"expert:{c}:v{e['version']}" for c, e in experts.items() if e is not None
    }
    rows["base"] = dict.fromkeys(codes, resolve(recipe, "base", data.labels).name)
    out = {}
    for label, names in rows.items():
        found = {}
        for c in codes:
            found[c] = registry.evaluation(names[c], c, split, keys[c]) if c in names else None
            if c in names and found[c] is None:  # scored before this language's data changed
                earlier = registry.evaluation(names[c], c, split, None)
                found[c] = earlier and {**earlier, "earlier_data": True}
        if any(v is not None for v in found.values()):
            out[label] = found
    return out


def _quality(recipe: Recipe, data: ProjectData, found: dict[str, dict]) -> Section:
    metric, codes = primary_metric(recipe), list(data.languages)
    section = Section("Quality per language, today")
    if not found:
        section.text.append("No evaluations yet: run `langmerge run`.")
        return section
    rows, earlier = [], False
    for label, scores in found.items():
        values = [scores[c][metric] if scores[c] else None for c in codes]
        marks = ["†" if scores[c] and scores[c].get("earlier_data") else "" for c in codes]
        earlier = earlier or any(marks)
        current = [v for v, m in zip(values, marks) if v is not None and not m]
        whole = len(current) == len(codes)  # mean and worst only over today's data
        rows.append({"model": label,
                     **{c: with_interval(scores[c], metric) + m for c, m in zip(codes, marks)},
                     "mean": score_text(sum(current) / len(current)) if whole else "—",
                     "worst": score_text(min(current)) if whole else "—"})  # fmt: skip
    section.text.append(
        f"{metric} per language ({recipe.evaluation.split} split; {METHOD}); experts "
        "are scored on their own language. A dash: not evaluated."
        + (f" †: scored on earlier {recipe.evaluation.split} examples of that language (they "
           "have changed since); mean and worst only for rows scored on today's data."
           if earlier else "")
    )  # fmt: skip
    section.tables.append((f"{metric}, {recipe.evaluation.split} split", rows))
    bars = {label: [s[c][metric] if s[c] else None for c in codes] for label, s in found.items()}
    intervals = {label: [interval(s[c], metric) if s[c] else None for c in codes]
                 for label, s in found.items()}  # fmt: skip
    stale = {label: [bool(s[c] and s[c].get("earlier_data")) for c in codes]
             for label, s in found.items()}  # fmt: skip
    if bars:
        png = figures.grouped_bars(codes, bars, metric, intervals, stale)
        caption = f"{metric} per language and model, with 95% intervals" + (
            "; hatched: scored on earlier data (†)" if earlier else ""
        )
        section.figures.append(("quality", png, caption))
    return section


def _health(
    recipe: Recipe, data: ProjectData, registry: Registry, found: dict[str, dict]
) -> Section:
    """Every current trained model's health verdict (from training) and every shown merge's
    (from its predictions on the evaluation split), with what to try when degenerate."""
    section = Section("Training health")
    models = {f"expert {e['language']} v{e['version']}": e["health"]
              for e in (registry.latest("expert", c) for c in data.languages) if e}  # fmt: skip
    if joint := registry.latest("joint"):
        models[f"joint v{joint['version']}"] = joint["health"]
    split = recipe.evaluation.split
    for label, scores in found.items():
        current = {c: s for c, s in scores.items() if s and not s.get("earlier_data")}
        if label.startswith("merged:") and len(current) == len(data.languages):
            models[label] = evaluation_health(current, data, split)
    if not models:
        return section
    section.text.append(
        "Each trained model is checked on its validation split after training, each merge on "
        f"its predictions on the {split} split: predictions collapsed to one label, a diverged "
        "loss, or empty or identical answers make a model degenerate. A degenerate model is not "
        "merged, served or compared."
    )
    rows = [
        {"model": name, "health": health_summary(h), "try": "; ".join((h or {}).get("advice", []))}
        for name, h in models.items()
    ]
    section.tables.append(("health of the current models and merges", rows))
    return section


def _cost(recipe: Recipe, data: ProjectData, registry: Registry) -> Section:

    section = Section("Cost")
    bars: list[tuple[str, float, bool]] = []
    first = initial_build(registry)
    if first is not None:
        experts, joint = first
        c = cost_table(recipe, list(experts), experts, joint, registry.serving()[0]["at"])
        section.tables.append(("initial build, from the ledger", cost_rows(c)))
        section.text.append(f"Parallel figures are {c['makespan_source']}.")
        bars += [("experts, serial", c["experts_serial_s"], True),
                 (f"experts, {c['workers']} workers", c["experts_makespan_s"],
                  c["makespan_measured"]),
                 ("joint model", c["joint_s"], True)]  # fmt: skip
    steps = []
    for i, step in enumerate(registry.steps(), 1):
        cost, what = step["result"]["cost"], f"{step['kind']} {step['language']}"
        retrain = cost.get("joint_retrain") or {}
        measured = retrain.get("source") == "measured"
        steps.append({
            "step": f"{i}. {what}",
            "outcome": ("served" if step["served"] else "refused by the guard")
            + _warned(step["result"].get("shifts", [])),
            "expert s": f"{cost['update']['expert_wall_s']:.1f}",
            "re-merge s": f"{cost['update']['merge_wall_s']:.1f}",
            "update s": f"{cost['update']['wall_s']:.1f}",
            "joint retrain s": f"{retrain['wall_s']:.1f}" if retrain else "—",
            "joint figure": ("measured" if measured else "projected") if retrain else "—",
            "saving (wall)": f"{cost['wall_saving']:.0%}" if "wall_saving" in cost else "—",
            "saving (CPU)": f"{cost['cpu_saving']:.0%}" if "cpu_saving" in cost else "—",
            "saving (FLOPs)": f"{cost['flops_saving']:.0%}" if "flops_saving" in cost else "—",
        })  # fmt: skip
        bars.append((f"{what}: expert + re-merge", cost["update"]["wall_s"], True))
        if retrain:
            bars.append((f"{what}: joint retrain", retrain["wall_s"], measured))
    if steps:
        section.tables.append(("maintenance steps", steps))
        section.text.append(
            "A maintenance step costs its expert's training and the re-merge; it is compared "
            "with retraining the joint model on all data including the new data — measured "
            "when the update ran with --compare-joint, else projected from the last joint job "
            "in the ledger, scaled by the examples it would see. Evaluation is not counted. "
            "On a shared machine wall time mostly measures contention: CPU seconds and FLOPs "
            "do not."
        )
    if bars:
        section.figures.append(("cost", figures.cost_bars(bars), "wall seconds per job"))
    return section


def _warned(shifts: list[dict]) -> str:
    """ ", with warnings (ja, zh)": the languages whose drop the guard let through as noise."""
    codes = [r["language"] for r in shifts if r.get("verdict") == "warn"]
    return f", with warnings ({', '.join(codes)})" if codes else ""


def initial_build(registry: Registry) -> tuple[dict, dict] | None:
    """The experts of the first merge put in service (language → registry row) and the newest
    joint model trained before it; None before a first merge was served."""
    serving = registry.serving()
    if not serving:
        return None
    merge = next(m for m in registry.merges() if m["id"] == serving[0]["merge_id"])
    by_id = {e["id"]: e for e in registry.trained("expert")}
    experts = {by_id[i]["language"]: by_id[i] for i in merge["expert_ids"]}
    joints = [j for j in registry.trained("joint") if j["ended"] <= serving[0]["at"]]
    return (experts, joints[-1]) if joints else None


def _sweep(registry: Registry) -> Section:

    sweeps = registry.sweeps()
    section = Section("Sweep")
    if not sweeps:
        section.text.append("No sweep yet: `langmerge sweep RECIPE` tries a grid of merges.")
        return section
    result = sweeps[-1]
    result["sweep_s"] = sum(p["seconds"] for p in result["points"])
    result.setdefault("job_s", registry.job(result["job_id"])["wall_s"])
    section.text += summary_lines(result)
    top = 10
    caption = f"validation {result['metric']}, best first"
    if len(result["points"]) > top:
        caption += f" ({top} of {len(result['points'])} points; `langmerge sweep` lists all)"
    section.tables.append((caption, point_rows(result, top)))
    curves: dict[str, dict[float, float]] = {}
    for p in result["points"]:
        if p.get("weights"):
            continue
        best = curves.setdefault(p["method"], {})
        best[p["density"]] = max(best.get(p["density"], float("-inf")), p["score"])
    png = figures.density_curves(curves, f"validation {result['select']} {result['metric']}")
    section.figures.append(("sweep", png, "the sweep's score by density (best λ per point)"))
    return section


def _vectors(recipe: Recipe) -> Section:

    section = Section("How the language experts relate")
    try:
        found = analyze(recipe, evaluate_missing=False)
    except LangmergeError as e:  # e.g. an expert's files were deleted: the rest still reports
        section.text.append(str(e))
        return section
    section.text += found["notes"]
    section.tables += analysis_tables(found)
    section.figures += analysis_figures(found)
    return section


def _seeds(recipe: Recipe) -> Section:
    """The last `run --seeds N`: mean ± sd across seeds next to the per-seed intervals."""

    section = Section("Over several training seeds")
    path = recipe.rundir.seeds_json
    if path.is_file():
        summary = json.loads(path.read_text())
        section.text.append(note(summary))
        section.tables.append((f"{summary['metric']} over seeds", seed_rows(summary)))
    return section


def _history(recipe_path: Path) -> Section:

    section = Section("History of versions")
    for title, rows in history_rows(recipe_path).items():
        if rows:
            section.tables.append((title, [{k: v for k, v in r.items() if k != "path"}
                                           for r in rows]))  # fmt: skip
    return section


CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1100px;
margin:2em auto;padding:0 1em;color:#222;line-height:1.45}
h1{font-size:1.5em}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.8em}
table{border-collapse:collapse;margin:.6em 0 1.2em;font-size:.9em}
th,td{border:1px solid #ccc;padding:.25em .6em;text-align:left}
th{background:#f3f3f3}td{font-variant-numeric:tabular-nums}
caption{caption-side:top;text-align:left;font-weight:600;padding:.3em 0}
figure{margin:1em 0}figcaption{font-size:.85em;color:#555}
img{max-width:100%;height:auto}nav a{margin-right:1em}
"""


def to_html(title: str, sections: list[Section]) -> str:
    """One page; figures as data: URIs, no script, nothing loaded from elsewhere."""
    e = html.escape
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             f"<title>{e(title)}</title><style>{CSS}</style></head><body>",
             f"<h1>{e(title)}</h1>", "<nav>"]  # fmt: skip
    parts += [f'<a href="#s{i}">{e(s.title)}</a>' for i, s in enumerate(sections)]
    parts.append("</nav>")
    for i, s in enumerate(sections):
        parts.append(f'<section id="s{i}"><h2>{e(s.title)}</h2>')
        parts += [f"<p>{e(line)}</p>" for line in s.text]
        for caption, rows in s.tables:
            if not rows:
                continue
            keys = list(rows[0])
            parts.append(f"<table><caption>{e(caption)}</caption><thead><tr>")
            parts += [f"<th>{e(str(k))}</th>" for k in keys]
            parts.append("</tr></thead><tbody>")
            for r in rows:
                cells = "".join(f"<td>{e(str(r[k]))}</td>" for k in keys)
                parts.append(f"<tr>{cells}</tr>")
            parts.append("</tbody></table>")
        for _, png, caption in s.figures:
            data = base64.b64encode(png).decode()
            parts.append(f'<figure><img alt="{e(caption)}" src="data:image/png;base64,{data}">'
                         f"<figcaption>{e(caption)}</figcaption></figure>")  # fmt: skip
        parts.append("</section>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def to_markdown(title: str, sections: list[Section]) -> str:
    """The same content; figures as PNG files next to it (figures/)."""
    out = [f"# {title}", ""]
    for s in sections:
        out += [f"## {s.title}", ""]
        for line in s.text:
            out += [line, ""]
        for caption, rows in s.tables:
            if not rows:
                continue
            out += [f"**{caption}**", "", *markdown_table(rows), ""]
        for stem, _, caption in s.figures:
            out += [f"![{caption}](figures/{stem}.png)", ""]
    return "\n".join(out)
