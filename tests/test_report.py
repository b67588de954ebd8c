"""`langmerge analyze` and `langmerge report` on a tiny project that ran, was updated once and
swept: the page is self-contained, renders in headless Chromium without errors with every figure
loaded, and the numbers it shows are the registry's."""

import json
import re

import pytest
from chromium import open_page, require_chromium
from tiny import project, sentences, write_jsonl

from langmerge.data.prepare import load_data
from langmerge.evaluate import stats
from langmerge.project.registry import Registry
from langmerge.project.state import load_recipe
from langmerge.reporting import analysis
from langmerge.workflows.evaluation import evaluation_key

SWEEP = {"grid": ["linear", {"method": "ties", "density": [0.5, 1.0]}], "lambda": [1.0]}


@pytest.fixture(scope="module")
def reported(tmp_path_factory):
    """(recipe path, HTML path) after run, an update of de (accepted), a sweep and a report."""
    from langmerge.cli import main

    root = tmp_path_factory.mktemp("report")
    path = project(root, merge={"compare": ["ties", "linear"]}, sweep=SWEEP)
    write_jsonl(root / "new_de.jsonl", sentences("de", 20, seed=5))
    for args in (
        ["run", path, "--quiet"],
        ["update", path, "--lang", "de", "--data", root / "new_de.jsonl", "--accept", "--quiet"],
        ["sweep", path, "--quiet"],
        ["report", path],
    ):
        with pytest.raises(SystemExit) as done:
            main([str(a) for a in args])
        assert done.value.code == 0
    return path, load_recipe(path).run_dir / "report" / "report.html"


def registry_scores(path, earlier: bool = False) -> dict[str, dict[str, str]]:
    """Model name → language → accuracy (3 decimals) of the newest test evaluation of the
    current data, read with SQL; with `earlier`, of any data, marked † when not today's."""
    recipe = load_recipe(path)
    data = load_data(recipe.data_spec())
    keys = {
        c: evaluation_key(recipe, data.languages[c].split_digests["test"]) for c in data.languages
    }
    registry = Registry(recipe.run_dir)
    try:
        rows = registry.db.execute(
            "SELECT model, language, metrics, data_hash FROM evaluations WHERE split='test' "
            "ORDER BY id"
        ).fetchall()
    finally:
        registry.close()
    out: dict[str, dict[str, str]] = {}
    for model, code, metrics, key in rows:
        m = json.loads(metrics)
        low, high = stats.interval(m["per_example"]["accuracy"])
        value = f"{m['accuracy']:.3f} ({low:.2f}–{high:.2f})"
        if key == keys[code]:
            out.setdefault(model, {})[code] = value
        elif earlier and "†" in out.get(model, {}).get(code, "†"):
            out.setdefault(model, {})[code] = value + "†"
    return out


def expected_quality(path) -> dict[str, list[str]]:
    """The quality table's rows as the registry has them: label → [en, de, fr]."""
    scores = registry_scores(path, earlier=True)
    recipe = load_recipe(path)
    registry = Registry(recipe.run_dir)
    try:
        current = registry.current_merge()
        merges = {m["params"]["name"]: m["id"] for m in registry.merges()}
        experts = {c: registry.latest("expert", c)["version"] for c in ("en", "de", "fr")}
    finally:
        registry.close()
    codes = ["en", "de", "fr"]
    rows = {"joint": ["joint:v1"] * 3}
    # the newest merge of each name the recipe compares; the update re-merged ties, in service
    assert merges["ties"] == current["id"]
    rows[f"merged:ties#{current['id']} (in service)"] = [f"merged:ties#{current['id']}"] * 3
    rows[f"merged:linear#{merges['linear']}"] = [f"merged:linear#{merges['linear']}"] * 3
    rows["experts (own language)"] = [f"expert:{c}:v{experts[c]}" for c in codes]
    base = next(m for m in scores if m.startswith("base@"))
    rows["base"] = [base] * 3
    return {
        label: [scores.get(name, {}).get(c, "—") for name, c in zip(names, codes)]
        for label, names in rows.items()
    }


def markdown_table(text: str, caption: str) -> list[list[str]]:
    lines = text.split(f"**{caption}**\n\n", 1)[1].split("\n\n", 1)[0].splitlines()
    return [[c.strip() for c in line.strip("|").split("|")] for line in lines if "---" not in line]


def test_the_report_is_one_self_contained_page_and_a_markdown_twin(reported):
    path, page = reported
    folder = page.parent
    assert sorted(p.name for p in (folder / "figures").iterdir()) == [
        "cost.png", "interference.png", "layers.png", "quality.png", "similarity.png", "sweep.png"
    ]  # fmt: skip
    text = page.read_text()
    assert "<script" not in text
    sources = re.findall(r'(?:src|href)="([^"#][^"]*)"', text)
    assert sources and all(s.startswith("data:image/png;base64,") for s in sources)
    markdown = (folder / "report.md").read_text()
    assert markdown.count("](figures/") == 6
    health = markdown.split("## Training health")[1].split("##")[0]
    assert "| degenerate" not in health and health.count("| healthy |") == 5
    assert not list(folder.parent.glob(".report*"))  # nothing half-written left behind


def test_the_markdown_numbers_are_the_registry_s(reported):
    path, page = reported
    markdown = (page.parent / "report.md").read_text()
    table = markdown_table(markdown, "accuracy, test split")
    assert table[0] == ["model", "en", "de", "fr", "mean", "worst"]
    shown = {row[0]: row[1:4] for row in table[1:]}
    assert shown == expected_quality(path)
    # the study's comparison as `run` wrote it, kept after the update changed the scores
    from langmerge.reporting.tables import quality_rows
    from langmerge.workflows.study import Study

    found = json.loads(load_recipe(path).rundir.results.read_text())
    study = Study(**{k: found[k] for k in ("languages", "metric", "split", "quality",
                                           "best_merge", "cost", "health")})  # fmt: skip
    kept = markdown_table(markdown, "accuracy, the study")
    assert kept[1:] == [list(r.values()) for r in quality_rows(study)]
    assert kept[-1][0] == "best merge − joint"
    # the maintenance step: its costs as recorded with the addition
    registry = Registry(load_recipe(path).run_dir)
    try:
        (step,) = registry.steps()
        sweep = registry.sweeps()[-1]
    finally:
        registry.close()
    cost = step["result"]["cost"]
    (row,) = markdown_table(markdown, "maintenance steps")[1:]
    assert row[:2] == ["1. update de", "served"]
    assert row[4] == f"{cost['update']['wall_s']:.1f}"
    assert row[5] == f"{cost['joint_retrain']['wall_s']:.1f}"
    assert row[6] == "projected" and row[7] == f"{cost['wall_saving']:.0%}"
    # the initial build: the experts of the first merge in service (v1; de v2 came later)
    registry = Registry(load_recipe(path).run_dir)
    try:
        first = [e["wall_s"] for e in registry.trained("expert") if e["version"] == 1]
        joint = registry.latest("joint")["wall_s"]
    finally:
        registry.close()
    initial = {r[0]: r[1] for r in markdown_table(markdown, "initial build, from the ledger")[1:]}
    assert initial["experts, one after another"] == f"{sum(first):.1f}"
    assert initial["joint model"] == f"{joint:.1f}"
    best = markdown_table(markdown, "validation accuracy, best first")[1]
    assert best[0] == sweep["winner"] + " *" and best[4] == f"{sweep['winner_score']:.3f}"


def test_the_page_renders_in_chromium_with_every_figure_and_the_registry_s_numbers(reported):
    require_chromium()
    path, page = reported
    seen = open_page(page)
    assert seen.console_errors == []
    assert seen.requests == []  # self-contained: nothing fetched
    assert len(seen.images) == 6
    assert all(i["complete"] and i["natural_width"] > 100 for i in seen.images)
    study, quality = seen.tables[:2]  # the study as `run` found it, then today's scores
    assert study[-1][0] == "best merge − joint"
    assert quality[0] == ["model", "en", "de", "fr", "mean", "worst"]
    assert {row[0]: row[1:4] for row in quality[1:]} == expected_quality(path)


def test_analyze_relates_similarity_and_interference(reported, cli):
    path, _ = reported
    code, text = cli("analyze", path)
    assert code == 0, text
    assert "cosine similarity of the task" in text and "written:" in text
    found = json.loads((load_recipe(path).run_dir / "analysis" / "analysis.json").read_text())
    cos = found["cosine"]
    assert [cos[i][i] for i in range(3)] == [1.0, 1.0, 1.0]
    assert all(cos[i][j] == cos[j][i] for i in range(3) for j in range(3))
    assert list(found["by_type"]) == ["en/de", "en/fr", "de/fr"]
    scores = registry_scores(path)
    merge = found["merge"]
    for code, v in found["per_language"].items():
        expert = f"expert:{code}:v{found['experts'][code][1:]}"
        assert f"{v['merged']:.3f}" == scores[merge][code].split()[0]
        assert f"{v['expert']:.3f}" == scores[expert][code].split()[0]
        assert v["interference"] == pytest.approx(v["merged"] - v["expert"])


def test_the_expert_comparison_is_computed_once_per_set_of_experts(reported, monkeypatch):
    path, _ = reported
    recipe = load_recipe(path)
    first = analysis.analyze(recipe, evaluate_missing=False)  # computed, or kept by an earlier
    (kept,) = recipe.rundir.vectors.glob("*.json")

    def not_again(*_):
        raise AssertionError("compared the experts again")

    monkeypatch.setattr(analysis, "compare_experts", not_again)
    assert analysis.analyze(recipe, evaluate_missing=False) == first  # from the kept file
    kept.write_text("{not json")  # a damaged file is computed again
    monkeypatch.undo()
    assert analysis.analyze(recipe, evaluate_missing=False) == first
    assert json.loads(kept.read_text())["languages"] == ["en", "de", "fr"]


def test_report_mistakes(tmp_path, cli):
    path = project(tmp_path / "p")
    code, text = cli("report", path)
    assert code == 1 and "nothing trained yet" in text
    code, text = cli("analyze", path)
    assert code == 1 and "nothing trained yet" in text
