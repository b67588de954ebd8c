"""What the `langmerge` command prints: consoles, tables and the text of each command's result.

Workflows return values (rows, summaries, outcomes); this module turns them into tables and
lines. It imports the workflows' row builders inside functions, so that `langmerge -h` loads
no torch.
"""

from __future__ import annotations

import sys

from rich.console import Console
from rich.table import Table
from rich.text import Text


def _console(stderr: bool = False) -> Console:
    """Plain text (messages carry paths and user text, never markup); unwrapped when written
    to a file or a pipe, so paths and hashes stay whole."""
    stream = sys.stderr if stderr else sys.stdout
    width = None if stream.isatty() else 100_000
    return Console(stderr=stderr, markup=False, highlight=False, width=width)


out = _console()
err = _console(stderr=True)


def warn(message: str, console: Console | None = None) -> None:
    (console or out).print(Text.assemble(("warning: ", "yellow"), message))


def fail(message: str) -> None:
    err.print(Text.assemble(("error: ", "red"), message))


def note(message: str) -> None:
    out.print(Text.assemble(("note: ", "yellow"), message))


def table(rows: list[dict], title: str | None = None) -> Table:
    """Rows of equal keys as a table whose cells wrap instead of being cut."""
    t = Table(title=title, title_justify="left")
    for key in rows[0]:
        t.add_column(key, overflow="fold")
    for row in rows:
        t.add_row(*(str(v) for v in row.values()))
    return t


def tables(found: dict[str, list[dict]], titles_alone: bool = False) -> None:
    """Each titled list of rows as a table; an empty one as its title alone (`titles_alone`)
    or not at all."""
    for title, rows in found.items():
        if rows:
            out.print(table(rows, title))
        elif titles_alone:
            out.print(title)


def _fmt(value) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def merge_made(summary: dict, method: str, experts: int, output) -> None:
    """A merge of files (`langmerge merge CONFIG -o OUT`): what was merged, how, how fast."""
    what = [f"{summary['full']['tensors_merged']} tensors merged"] if "full" in summary else []
    if aware := summary.get("data_aware"):
        what.append(f"{aware['tensors']} by regmean, {aware['fallback_tensors']} by "
                    f"{aware['fallback']} (no linear map, or no statistics)")  # fmt: skip
    if "adapter" in summary:
        a = summary["adapter"]
        error = f"relative reconstruction error {a['rel_error']:.3g} (worst module " \
                f"{a['worst_rel_error']:.3g})"  # fmt: skip
        what.append(f"adapter rank {a['rank']}, {'exact' if a['exact'] else error}")
    out.print(f"merged {experts} experts with {method} into {output} "
              f"in {summary['seconds']:.1f} s: {'; '.join(what)}")  # fmt: skip


def recipe_merge_made(summary: dict, where) -> None:
    """A merge of a recipe's experts: where it went, whether it is served, stale experts."""
    served = "now the current merge)" if summary["served"] else (
        "not served: it merges degenerate experts)")  # fmt: skip
    out.print(f"merged the recipe's experts with {summary['config']['method']} into {where} in "
              f"{summary['seconds']:.1f} s (recorded in the registry; {served}")  # fmt: skip
    if summary["stale_experts"]:
        warn(f"{', '.join(summary['stale_experts'])} were trained with other recipe settings; "
             "`langmerge train RECIPE --all` brings them up to date", err)  # fmt: skip


def check_report(report) -> None:
    """`langmerge check`: the per-language table, notes and warnings."""
    if report.table:
        out.print(table(report.table))
    for line in report.notes:
        out.print(line)
    for w in report.warnings:
        warn(w)


def evaluation(found: dict[str, dict], metric: str, model: str) -> None:
    """One model's metrics per language, each with the primary metric's 95% interval."""
    from langmerge.evaluate.stats import METHOD
    from langmerge.workflows.evaluation import PER_EXAMPLE, interval

    rows = []
    for code, m in found.items():
        bounds = interval(m, metric)
        span = f"{bounds[0]:.3f}–{bounds[1]:.3f}" if bounds else "—"
        shown = {k: _fmt(v) for k, v in m.items() if k != PER_EXAMPLE}
        rows.append({"language": code, **shown, "95% interval": span})
    out.print(table(rows, model))
    out.print(f"{metric}: {METHOD}")


def study(found, run) -> None:
    """`langmerge run`: quality per model and language, health, cost; report.md written."""
    from langmerge.evaluate.stats import METHOD
    from langmerge.reporting.tables import cost_rows, health_rows, quality_rows, write_study_report

    out.print(table(quality_rows(found, found.alpha), f"{found.metric} on the {found.split} split"))
    out.print(f"{METHOD}; `!`: a paired difference significant at {found.alpha}")
    for line in found.notes:
        note(line)
    out.print(table(health_rows(found), "training health"))
    out.print(table(cost_rows(found.cost), "cost, from the ledger"))
    out.print(f"written: {write_study_report(run, found)}, {run.results}")


def seeds(summary: dict, count: int, run) -> None:
    """`langmerge run --seeds N`: the metric over the seeds; seeds.md written."""
    from langmerge.reporting.tables import note as seeds_note
    from langmerge.reporting.tables import seed_rows, write_seeds_report

    out.print(table(seed_rows(summary), f"{summary['metric']} over {count} seeds"))
    out.print(seeds_note(summary))
    out.print(f"written: {write_seeds_report(run, summary)}, {run.seeds_json}")


def sweep(result: dict, top: int | None = None) -> None:
    """`langmerge sweep`: the points (the best `top`), the winner and the decision."""
    from langmerge.reporting.tables import point_rows, summary_lines

    title = f"{result['metric']} on the validation split"
    if top and top < len(result["points"]):
        title += f" (the best {top} of {len(result['points'])} merges)"
    out.print(table(point_rows(result, top), title))
    for line in summary_lines(result):
        out.print(line)


def _shift(r: dict, alpha: float) -> str:
    """A shift in points, its 95% interval, and `!` when significant."""
    return (f"{r['shift']:+.1f}" + (f" ({r['low']:+.0f}–{r['high']:+.0f})" if "low" in r else "")
            + (" !" if r.get("p", 1.0) < alpha else ""))  # fmt: skip


def update_outcome(outcome) -> None:
    """`update` / `add-language`: each language's shift and the guard's verdict, then the cost
    against retraining the joint model."""
    from langmerge.workflows.maintenance import warnings_of

    a = outcome.alpha
    rows = [
        {"language": r["language"], "before": f"{r['before']:.3f}", "after": f"{r['after']:.3f}",
         "shift (points)": _shift(r, a), "p": f"{r['p']:.2f}" if "p" in r else "",
         "guard": r.get("verdict", "ok" if r["ok"] else "FAIL") + f" ({r['rule']})"}
        for r in outcome.shifts
    ]  # fmt: skip
    joint = {r["language"]: r for r in outcome.cost.get("joint_shifts") or []}
    for row in rows if joint else []:  # the joint retrain's shifts, for comparison
        j = joint.get(row["language"])
        row["joint retrain shift"] = "—" if j is None else _shift(j, a)
    out.print(table(rows, f"{outcome.metric}: {outcome.old_merge} → {outcome.new_merge}"))
    out.print(f"shift: new − old merge on the same test examples, 95% interval in brackets; "
              f"`!`: significant at {a} (McNemar exact / paired bootstrap)")  # fmt: skip
    for line in warnings_of(outcome.shifts):
        warn(line)
    out.print(table(_cost_rows(outcome.cost), "cost"))
    if outcome.served:
        out.print(f"{outcome.new_merge} is now the current merge")


def _cost_rows(c: dict) -> list[dict]:
    def seconds(x: float | None) -> str:
        return "—" if x is None else f"{x:.1f}"

    u = c["update"]
    rows = [{"job": "this update (expert + re-merge)", "wall s": f"{u['wall_s']:.1f}",
             "CPU s": seconds(u.get("cpu_s")), "FLOPs": f"{u['flops']:.3g}"}]  # fmt: skip
    if c["joint_retrain"]:
        j = c["joint_retrain"]
        rows.append({"job": f"joint retrain on all data ({j['source']})",
                     "wall s": f"{j['wall_s']:.1f}", "CPU s": seconds(j.get("cpu_s")),
                     "FLOPs": f"{j['flops']:.3g}"})  # fmt: skip
        rows.append({"job": "saving", "wall s": f"{c['wall_saving']:.0%}",
                     "CPU s": f"{c['cpu_saving']:.0%}" if "cpu_saving" in c else "—",
                     "FLOPs": f"{c.get('flops_saving', 0):.0%}"})  # fmt: skip
    return rows


def methods() -> None:
    """`langmerge methods`: every merge method, what it does, the parameters it takes and what
    it needs."""
    from langmerge.merge.methods import METHODS
    from langmerge.merge.params import listed

    t = Table("method", "what it does", "parameters", "random", "LoRA only", "needs")
    for m in METHODS.values():
        takes = listed(m.params) + (" and its fallback's" if m.data_aware else "")
        needs = "each expert's input statistics" if m.data_aware else ""
        t.add_row(m.name, m.summary, takes, "yes" if m.random else "", "yes" if m.knots else "",
                  needs)  # fmt: skip
    out.print(t)
