"""`langmerge sweep` on a tiny project: every point is merged in memory and scores exactly as the
same merge written to disk; the best point (by mean or worst language) becomes the recipe's merge
setting and is served only when it beats the merge in service; points are cached and an
interrupted sweep resumes."""

import json

import pytest
import yaml
from tiny import project, sentences, write_jsonl

from langmerge.project.recipe import Sweep, read_recipe
from langmerge.project.registry import Registry
from langmerge.project.state import load_recipe, origins
from langmerge.reporting.status import merge_source
from langmerge.reporting.tables import point_rows
from langmerge.workflows import sweep as sweeping
from langmerge.workflows.recipe_merge import merge_recipe

GRID = {
    "grid": [
        "linear",
        {"method": "ties", "density": [0.5, 1.0]},
        {"method": "dare_ties", "density": 0.5},
    ],  # fmt: skip
    "lambda": [1.0, 1.2],
}


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    """A tiny project after `langmerge run` (ties in service) and one `langmerge sweep`."""
    from langmerge.cli import main

    path = project(tmp_path_factory.mktemp("sweep"), merge={"compare": ["ties"]}, sweep=GRID)
    for args in (["run", str(path), "--quiet"], ["sweep", str(path), "--quiet"]):
        with pytest.raises(SystemExit) as done:
            main(args)
        assert done.value.code == 0
    return path


def last_sweep(path):
    registry = Registry(load_recipe(path).run_dir)
    try:
        return registry.sweeps()[-1]
    finally:
        registry.close()


def test_the_default_grid_is_simplest_first():
    names = [name for name, _ in sweeping.grid(Sweep())]
    # linear ×3 λ, ties ×4 densities ×3 λ, dare_ties ×3 (density 1 is ties) ×3 λ, knots ×3 λ,
    # regmean ×3 λ ×3 α
    assert len(names) == 36
    assert names[:7] == ["linear-l1", "linear-l1.2", "linear-l0.8", "ties-d1-l1", "ties-d0.8-l1",
                         "ties-d0.5-l1", "ties-d0.2-l1"]  # fmt: skip
    assert names[26] == "knots_ties-d1-l0.8"
    assert names[27:30] == ["regmean-l1-a0.9", "regmean-l1-a1", "regmean-l1-a0.5"]
    assert sweeping.duplicates(Sweep()) == {
        f"dare_ties-d1-l{lam}": f"ties-d1-l{lam}" for lam in ("1", "1.2", "0.8")
    }


def test_a_best_point_at_the_end_of_a_range_is_flagged():
    edges = sweeping.edges(Sweep(), sweeping.Point("ties", 0.2, 1.2))
    assert edges == [
        "lambda 1.2 is the largest value tried: the best may lie beyond it (widen sweep.lambda)",
        "density 0.2 is the smallest value tried: the best may lie beyond it (widen the grid's "
        "densities of ties)",
    ]
    assert sweeping.edges(Sweep(), sweeping.Point("ties", 1.0, 1.0)) == []  # d 1 is the limit


def test_the_best_point_by_mean_or_by_worst_language():
    def scores(en, de):
        return {"en": {"accuracy": en}, "de": {"accuracy": de}}

    points = [("a", scores(0.9, 0.3)), ("b", scores(0.6, 0.5)), ("c", scores(0.3, 0.9))]
    assert sweeping.choose(points, "accuracy", "mean") == "a"  # 0.6 = 0.6: the earlier
    assert sweeping.choose(points, "accuracy", "worst") == "b"  # 0.5 > 0.3


def test_the_sweep_writes_no_merge_and_records_its_choice(swept):
    recipe = load_recipe(swept)
    result = last_sweep(swept)
    assert len(result["points"]) == 8
    assert [p["name"] for p in result["points"]][:2] == ["linear-l1", "linear-l1.2"]
    assert result["winner"] == sweeping.choose(
        [(p["name"], p["metrics"]) for p in result["points"]], "accuracy", "mean"
    )
    registry = Registry(recipe.run_dir)
    try:
        merges = registry.merges()
        job = registry.job(result["job_id"])
    finally:
        registry.close()
    assert job["kind"] == "sweep" and job["status"] == "done" and job["examples"] > 0
    # the tiny merges all score alike on validation: the ties in service is not beaten
    assert result["current"]["name"] == "merged:ties#1"
    assert result["winner_score"] <= result["current"]["score"]
    assert "served" not in result and [m["id"] for m in merges] == [1]
    assert list(result["test"]) == ["en", "de", "fr"]  # the winner's, merged in memory
    chosen = {k: getattr(recipe.merge, k) for k in ("method", "density", "lam")}
    point = next(p for p in result["points"] if p["name"] == result["winner"])
    assert chosen == {k: point[k] for k in ("method", "density", "lam")}
    # the table: each point minus the best, paired on the same validation examples
    rows = {r["merge"].removesuffix(" *"): r for r in point_rows(result)}
    best = result.get("best", result["winner"])
    assert rows[best]["− best (95%)"] == "best"
    found = {p["name"]: p for p in result["points"]}
    other = next(name for name in found if name != best)
    c = sweeping.compare_points(found[other]["metrics"], found[best]["metrics"], "accuracy",
                                "mean")  # fmt: skip
    mark = " !" if c.significant(result["alpha"]) else ""
    assert rows[other]["− best (95%)"] == f"{c.difference:+.3f} [{c.low:+.3f}, {c.high:+.3f}]{mark}"
    assert c.difference == pytest.approx(found[other]["score"] - found[best]["score"])


def test_a_point_scores_exactly_as_the_same_merge_written_to_disk(swept, tmp_path, cli):
    result = last_sweep(swept)
    point = next(p for p in result["points"] if p["name"] == "ties-d0.5-l1.2")
    out = tmp_path / "written"
    code, text = cli("merge", swept, "--method", "ties", "--density", "0.5", "--lambda", "1.2",
                     "-o", out)  # fmt: skip
    assert code == 0, text
    from langmerge.workflows.evaluation import evaluate

    recipe = load_recipe(swept)
    assert evaluate(recipe, str(out), split="validation") == point["metrics"]


def test_an_edit_of_the_recipe_merge_settings_wins_over_the_sweep(swept, tmp_path):
    data = yaml.safe_load(swept.read_text())
    data["merge"]["method"] = "knots_ties"
    data["run_dir"] = str(load_recipe(swept).run_dir)
    edited = swept.parent / "edited.yaml"
    edited.write_text(yaml.safe_dump(data, sort_keys=False))
    assert load_recipe(edited).merge.method == "knots_ties"
    # `langmerge status` says where the next merge's settings come from
    winner = last_sweep(swept)["winner"]
    point = next(p for p in last_sweep(swept)["points"] if p["name"] == winner)
    assert merge_source(load_recipe(swept)) == {
        "method": point["method"], "density": point["density"], "λ": point["lam"],
        "weights": "equal", "from": f"`langmerge sweep` (its choice {winner})",
    }  # fmt: skip
    assert merge_source(load_recipe(edited))["method"] == "knots_ties"
    # each setting the sweep replaced is traced to it; the edited recipe's are its own
    changed = {f"merge.{k}" for k, v in (("method", point["method"]),
               ("density", point["density"]), ("lam", point["lam"]))
               if v != getattr(read_recipe(swept).merge, k)}  # fmt: skip
    sweep_id = last_sweep(swept)["id"]
    assert origins(load_recipe(swept)) == dict.fromkeys(
        changed, f"sweep #{sweep_id} (its choice {winner})"
    )
    assert origins(load_recipe(edited)) == {}
    assert merge_source(load_recipe(edited))["from"] == (
        f"the recipe's `merge:` section, edited since the last sweep chose {winner}"
    )


def test_points_are_cached_and_an_interrupted_sweep_resumes(swept, monkeypatch):
    recipe = load_recipe(swept)
    said = []
    sweeping.sweep(recipe, progress=False, say=said.append)
    assert said[0] == "sweep: 8 points, 8 already scored"

    # two new points; the run is interrupted while scoring the second
    data = yaml.safe_load(swept.read_text())
    data["sweep"]["lambda"] = [1.0, 1.2, 0.9]
    swept.write_text(yaml.safe_dump(data, sort_keys=False))
    recipe = load_recipe(swept)
    real, calls = sweeping.InMemoryMerge.score, []

    def interrupted(self, codes, split):
        calls.append(split)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(self, codes, split)

    monkeypatch.setattr(sweeping.InMemoryMerge, "score", interrupted)
    with pytest.raises(KeyboardInterrupt):
        sweeping.sweep(recipe, progress=False)
    monkeypatch.setattr(sweeping.InMemoryMerge, "score", real)
    said.clear()
    result = sweeping.sweep(recipe, progress=False, say=said.append)
    assert said[0] == "sweep: 12 points, 9 already scored"
    assert len(result["points"]) == 12
    registry = Registry(recipe.run_dir)
    try:
        failed = [j for j in registry.ledger() if j["kind"] == "sweep" and j["status"] == "failed"]
    finally:
        registry.close()
    assert len(failed) == 1 and failed[0]["examples"] > 0  # the point it scored is counted


def test_the_winner_goes_into_service_when_it_beats_the_merge_in_service(swept):
    recipe = load_recipe(swept)
    # put a merge in service that is worse than any point of the grid: the experts' deltas
    # subtracted from the base instead of added (every label flipped on these tiny experts)
    weaker = {"method": "linear", "lam": -1.0}
    summary, _ = merge_recipe(recipe, overrides=weaker, progress=False, name="weak",
                              serve="a weaker merge, for the test")  # fmt: skip
    result = sweeping.sweep(recipe, progress=False)
    assert result["current"]["name"] == f"merged:weak#{summary['merge_id']}"
    assert result["winner_score"] > result["current"]["score"]  # the case this test is about
    registry = Registry(recipe.run_dir)
    try:
        current = registry.current_merge()
        reason = registry.serving()[-1]["reason"]
    finally:
        registry.close()
    assert result["served"] == f"merged:{result['winner']}#{current['id']}"
    assert current["params"]["name"] == result["winner"]
    assert reason.startswith(f"sweep winner {result['winner']}: validation mean accuracy")
    # the test scores of the merge now in service are the registry's evaluation
    from langmerge.workflows.evaluation import evaluate

    assert result["test"] == evaluate(recipe, result["served"], split="test")
    assert json.loads(json.dumps(result["test"])) == result["test"]


def test_sweep_mistakes(tmp_path, cli):
    path = project(tmp_path / "p")
    code, text = cli("sweep", path)
    assert code == 1 and "nothing trained yet" in text and "langmerge run" in text
    data = yaml.safe_load(path.read_text())
    data["sweep"] = {"grid": [{"method": "ties", "density": [0.0]}]}
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    code, text = cli("sweep", path)
    assert code == 1 and "density must be in (0, 1], got 0.0" in text
    data["sweep"] = {"weights": [{"xx": 2.0}]}
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    code, text = cli("check", path)
    assert code == 1 and "sweep.weights name languages the recipe lacks" in text


def test_a_generation_project_is_swept_by_rouge(tmp_path, cli):
    grid = {"grid": ["linear", {"method": "ties", "density": 0.5}], "lambda": [1.0]}
    path = project(tmp_path / "g", "generation", merge={"compare": ["ties"]}, sweep=grid)
    code, text = cli("run", path, "--quiet")
    assert code == 0, text
    result = sweeping.sweep(load_recipe(path), progress=False)
    assert result["metric"] == "rougeL"
    assert [p["name"] for p in result["points"]] == ["linear-l1", "ties-d0.5-l1"]
    assert all(set(p["metrics"]["en"]) >= {"rougeL", "exact_match"} for p in result["points"])


def test_an_expert_the_guard_refused_is_not_swept(tmp_path, cli, monkeypatch):
    from langmerge.workflows import maintenance as maintain

    grid = {"grid": ["linear"], "lambda": [1.0]}
    path = project(tmp_path / "p", merge={"compare": ["ties"]}, sweep=grid)
    write_jsonl(tmp_path / "p" / "new_de.jsonl", sentences("de", 20, seed=5))
    assert cli("run", path, "--quiet")[0] == 0

    def refuse(*args):
        return [{**r, "ok": False} for r in real(*args)]

    real = maintain.guard
    monkeypatch.setattr(maintain, "guard", refuse)
    code, _ = cli("update", path, "--lang", "de", "--data", tmp_path / "p" / "new_de.jsonl",
                  "--quiet")  # fmt: skip
    assert code == 1  # refused: de v2 exists but its data is not part of the project
    recipe = load_recipe(path)
    registry = Registry(recipe.run_dir)
    try:
        in_service = registry.current_merge()["expert_ids"]
        assert registry.latest("expert", "de")["id"] not in in_service
    finally:
        registry.close()
    sweeping.sweep(recipe, progress=False)
    registry = Registry(recipe.run_dir)
    try:
        (row,) = registry.db.execute("SELECT expert_ids FROM sweep_points").fetchall()
    finally:
        registry.close()
    assert json.loads(row[0]) == in_service


def test_a_more_complex_point_must_win_significantly_to_be_chosen():
    def point(right: int, n: int = 40) -> dict:
        per = [1.0] * right + [0.0] * (n - right)
        return {"metrics": {"en": {"accuracy": right / n, "per_example": {"accuracy": per}}}}

    names = ["linear-l1", "ties-d1-l1", "knots_ties-d1-l1"]  # simplest first
    close = {"linear-l1": point(28), "ties-d1-l1": point(29), "knots_ties-d1-l1": point(30)}
    winner, why = sweeping.settle(names, close, "knots_ties-d1-l1", "accuracy", "mean", 0.05)
    assert winner == "linear-l1" and why["than"] == "linear-l1" and why["p"] > 0.05
    assert why["difference"] == pytest.approx(2 / 40)
    far = {"linear-l1": point(10), "ties-d1-l1": point(12), "knots_ties-d1-l1": point(38)}
    assert sweeping.settle(names, far, "knots_ties-d1-l1", "accuracy", "mean", 0.05) == (
        "knots_ties-d1-l1", None
    )  # fmt: skip
