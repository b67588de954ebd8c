"""The tables and Markdown files of a study, a seed study and a sweep: what `langmerge run` and
`sweep` print, what report.md and seeds.md hold, and what the HTML report shows. The workflows
return the figures (`Study`, a seed summary, a sweep result); this module words them."""

from __future__ import annotations

import statistics
from pathlib import Path

from langmerge.evaluate import stats
from langmerge.evaluate.health import is_degenerate
from langmerge.evaluate.health import summary as health_summary
from langmerge.evaluate.stats import METHOD
from langmerge.files import atomic_write
from langmerge.project.rundir import RunDir
from langmerge.workflows.evaluation import per_example, with_interval
from langmerge.workflows.study import Study, mean
from langmerge.workflows.sweep import compare_points


def quality_rows(study: Study, alpha: float = 0.05) -> list[dict]:
    """The quality table: one row per model, the primary metric per language with its 95%
    interval, mean and worst (and mean macro-F1 for labels, where a one-label model shows);
    then the best merge minus joint per language, paired, with `!` where the difference is
    significant at `alpha`, or "void" when either model is degenerate. A degenerate model's
    row (an expert's cell) says so."""
    f1 = study.metric != "macro_f1" and any(
        "macro_f1" in (m or {}) for scores in study.quality.values() for m in scores.values()
    )
    rows = []
    for row, scores in study.quality.items():
        values = [scores[c][study.metric] for c in study.languages]
        mark = " *" if row == study.best_merge else ""
        if is_degenerate(study.health.get(row)):
            mark += " (degenerate)"
        cells = {}
        for c in study.languages:
            cells[c] = with_interval(scores[c], study.metric)
            if row.startswith("experts") and is_degenerate(study.health.get(f"expert:{c}")):
                cells[c] += " (degenerate)"
        rows.append({
            "model": row + mark,
            **cells,
            "mean": f"{sum(values) / len(values):.3f}",
            "worst": f"{min(values):.3f}",
            **({"F1 mean": f"{mean(scores, 'macro_f1', study.languages):.3f}"} if f1 else {}),
        })  # fmt: skip
    if study.best_merge and "joint" in study.quality:
        best, joint = study.quality[study.best_merge], study.quality["joint"]
        gaps = [best[c][study.metric] - joint[c][study.metric] for c in study.languages]
        void = [who for who, row in (("the joint model", "joint"), ("the best merge",
                study.best_merge)) if is_degenerate(study.health.get(row))]  # fmt: skip
        if void:
            text = f"void: {' and '.join(void)} {'is' if len(void) == 1 else 'are'} degenerate"
            cells = {c: text for c in study.languages}
        else:
            cells = {c: paired_text(best[c], joint[c], study.metric, alpha)
                     for c in study.languages}  # fmt: skip
        rows.append({
            "model": "best merge − joint",
            **cells,
            "mean": "void" if void else f"{sum(gaps) / len(gaps):+.3f}",
            "worst": "void" if void else f"{min(gaps):+.3f}",
            **({"F1 mean": ""} if f1 else {}),
        })  # fmt: skip
    return rows


def health_rows(study: Study) -> list[dict]:
    """The health table: every trained model's verdict and every merge's (from its
    predictions on the evaluation split), with the evidence and what to try."""
    rows = []
    for row, h in study.health.items():
        rows.append({"model": row, "health": health_summary(h),
                     "advice": "; ".join((h or {}).get("advice", []))})  # fmt: skip
    return rows


def paired_text(a: dict, b: dict, metric: str, alpha: float) -> str:
    """ "−0.103 (−0.23–+0.03)": a − b on the same examples with its 95% interval; `!` when
    significant at `alpha` (McNemar exact for right/wrong scores, else paired bootstrap)."""

    diff = a[metric] - b[metric]
    x, y = per_example(a, metric), per_example(b, metric)
    if not x or not y or len(x) != len(y):
        return f"{diff:+.3f}"
    c = stats.compare(x, y)
    return f"{diff:+.3f} ({c.low:+.2f}–{c.high:+.2f}){' !' if c.significant(alpha) else ''}"


def cost_rows(c: dict) -> list[dict]:
    """The cost table of `cost_table`: experts serial and in parallel, joint, merge — wall and
    CPU seconds, training FLOPs, and each against the joint model."""
    seed = c.get("seed_s", 0.0)
    cpu, flops = c.get("cpu_s", {}), c.get("flops", {})  # (absent in studies before 0.1.1)
    joint_cpu, joint_flops = cpu.get("joint", 0.0), flops.get("joint", 0.0)

    def row(job: str, wall: float, cpu_s: float | None, fl: float | None) -> dict:
        return {
            "job": job,
            "wall s": f"{wall:.1f}",
            "vs joint": f"{wall / c['joint_s']:.2f}×",
            "CPU s": "—" if cpu_s is None else f"{cpu_s:.1f}",
            "CPU vs joint": f"{cpu_s / joint_cpu:.2f}×" if cpu_s is not None and joint_cpu else "—",
            "FLOPs": "—" if not fl else f"{fl:.2e}",
            "FLOPs vs joint": f"{fl / joint_flops:.2f}×" if fl and joint_flops else "—",
        }

    first = "seed + " if seed else ""
    s_cpu, s_fl = cpu.get("seed", 0.0), flops.get("seed", 0.0)
    e_cpu, e_fl, m_cpu = cpu.get("experts"), flops.get("experts"), cpu.get("merge", 0.0)
    total_cpu = None if e_cpu is None else s_cpu + e_cpu + m_cpu
    total_fl = None if e_fl is None else s_fl + e_fl + flops.get("merge", 0.0)
    parallel = (f"experts, {c['workers']} parallel workers "
                f"({'measured' if c.get('makespan_measured') else 'projected'})")  # fmt: skip
    rows = [row("seed (joint warm-up the experts branch from)", seed, s_cpu, s_fl)] if seed else []
    return rows + [
        row("experts, one after another", c["experts_serial_s"], e_cpu, e_fl),
        row(parallel, c["experts_makespan_s"], e_cpu, e_fl),
        row("joint model", c["joint_s"], joint_cpu if cpu else None, joint_flops),
        row("one merge (slowest)", c["merge_s"], m_cpu if cpu else None, flops.get("merge")),
        row(f"{first}experts + merge, serial", seed + c["experts_serial_s"] + c["merge_s"],
            total_cpu, total_fl),
        row(f"{first}experts + merge, parallel", seed + c["experts_makespan_s"] + c["merge_s"],
            total_cpu, total_fl),
    ]  # fmt: skip


def markdown_table(rows: list[dict]) -> list[str]:
    """The lines of a Markdown table of `rows` (keys of the first row as the header)."""
    keys = list(rows[0])
    out = ["| " + " | ".join(map(str, keys)) + " |", "|" + "---|" * len(keys)]
    out += ["| " + " | ".join(str(r[k]).replace("|", "\\|") for k in keys) + " |" for r in rows]
    return out


def write_study_report(run: RunDir, study: Study) -> Path:
    """report.md in the run directory (written whole, then renamed): the study's tables."""
    lines = [
        "# langmerge study",
        "",
        f"{study.metric} on the {study.split} split, per language ({METHOD}); `*` "
        "marks the best merge (highest mean), `!` a difference significant at "
        f"{study.alpha} (McNemar exact / paired bootstrap). Experts are scored on their own "
        "language.",
        "",
        *markdown_table(quality_rows(study, study.alpha)),
        "",
        *[f"- {n}" for n in study.notes],
        *([""] if study.notes else []),
        "## Training health",
        "",
        "Each trained model checked on its validation split after training, each merge on its "
        f"predictions on the {study.split} split (a model whose predictions collapse, whose "
        "loss diverged or whose answers are empty or identical is degenerate).",
        "",
        *markdown_table(health_rows(study)),
        "",
        "## Cost (from the ledger)",
        "",
        *markdown_table(cost_rows(study.cost)),
        "",
        f"Parallel figures are {study.cost['makespan_source']}.",
        "",
    ]
    atomic_write(run.study_report, "\n".join(lines))
    return run.study_report


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


def write_seeds_report(run: RunDir, summary: dict) -> Path:
    """seeds.md in the run directory: the metric over the seeds, as a table."""
    lines = ["# langmerge study over seeds", "", note(summary), "",
             *markdown_table(seed_rows(summary))]  # fmt: skip
    atomic_write(run.seeds_md, "\n".join(lines) + "\n")
    return run.seeds_md


def point_rows(result: dict, top: int | None = None) -> list[dict]:
    """The sweep table: one row per point (the `top` best), best first; the primary metric per
    language, and each point minus the best one, paired, with its 95% interval (`!`:
    significant at the sweep's alpha)."""
    codes, metric, select = result["languages"], result["metric"], result["select"]
    ranked = sorted(result["points"], key=lambda p: -p["score"])[:top]
    best_name = result.get("best", result["winner"])
    best = next((p for p in result["points"] if p["name"] == best_name), None)

    def versus(p: dict) -> str:
        if p["name"] == best_name:
            return "best"
        c = None if best is None else compare_points(p["metrics"], best["metrics"], metric, select)
        if c is None:
            return "—"
        mark = " !" if c.significant(result.get("alpha", 0.05)) else ""
        return f"{c.difference:+.3f} [{c.low:+.3f}, {c.high:+.3f}]{mark}"

    return [
        {"merge": p["name"] + (" *" if p["name"] == result["winner"] else ""),
         **{c: f"{p['metrics'][c][metric]:.3f}" for c in codes},
         select: f"{p['score']:.3f}", "− best (95%)": versus(p), "s": f"{p['seconds']:.1f}"}
        for p in ranked
    ]  # fmt: skip


def summary_lines(result: dict) -> list[str]:
    """What the sweep found and decided, its test scores and its cost next to one expert's
    training (worded as of when it ran)."""
    best, score = result.get("best", result["winner"]), result.get("best_score", 0.0)
    lines = [f"best on validation ({result['select']} {result['metric']}): {best} {score:.3f}"]
    lines += [f"  {best}: {edge}" for edge in result.get("edges", [])]
    if result.get("simpler"):
        s = result["simpler"]
        lines.append(f"not significantly above the simpler {s['than']} (difference "
                     f"{s['difference']:+.3f}, 95% interval {s['low']:+.3f}–{s['high']:+.3f}, "
                     f"p = {s['p']:.2f}): {s['than']} is chosen")  # fmt: skip
    lines.append(
        f"{result['winner']} ({result['winner_score']:.3f}) became the recipe's merge setting"
    )
    if "current" in result and "served" not in result:
        current = result["current"]
        c = current.get("comparison")
        if current["score"] >= result["winner_score"]:
            why = f", not below the choice's {result['winner_score']:.3f}"
        else:
            why = f" (the choice is not significantly better, p = {c['p']:.2f})" if c else ""
        lines.append(f"the merge then in service, {current['name']}, scored "
                     f"{current['score']:.3f} on validation{why}: it stayed")  # fmt: skip
    if "served" in result:
        lines.append(f"{result['served']} was put in service")
    if "test" in result:
        scores = ", ".join(f"{c} {m[result['metric']]:.3f}" for c, m in result["test"].items())
        mean = sum(m[result["metric"]] for m in result["test"].values()) / len(result["test"])
        lines.append(f"the winner on test: {scores} (mean {mean:.3f})")
    walls = result["expert_wall_s"].values()
    expert = sum(walls) / len(walls)
    n, here = len(result["points"]), result.get("scored_here", len(result["points"]))
    lines.append(f"the sweep took {result['job_s']:.1f} s ({here} of {n} points scored in this "
                 f"run, the others reused); merging and scoring all {n} points took "
                 f"{result['sweep_s']:.1f} s ({result['sweep_s'] / n:.1f} s each); one expert's "
                 f"training took {expert:.1f} s on average: the whole sweep cost "
                 f"{result['sweep_s'] / expert:.1f} experts")  # fmt: skip
    lines.append(f"− best: a point's {result['select']} minus the best point's, paired on the "
                 "same validation examples, with its 95% interval; `!`: significant at "
                 f"{result.get('alpha', 0.05):g} (stratified paired bootstrap)")  # fmt: skip
    return lines
