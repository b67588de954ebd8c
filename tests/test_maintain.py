"""Maintenance on tiny models: an update retrains one expert and re-merges; the guard keeps a
worse merge out of service unless accepted; rollback; interruptions leave the model in service
as it was and a rerun finishes; one update at a time; the saving equals the ledger's figures."""

import fcntl
import math
import shutil
from pathlib import Path

import pytest
from tiny import project, sentences, write_jsonl

from langmerge.project.recipe import read_recipe
from langmerge.project.registry import Registry
from langmerge.project.state import load_recipe, origins
from langmerge.reporting import status as history
from langmerge.workflows import maintenance as maintain


@pytest.fixture(scope="module")
def ran(tmp_path_factory):
    """A tiny project after `langmerge run` (one merge, in service), and new German data."""
    from langmerge.cli import main

    root = tmp_path_factory.mktemp("ran") / "p"
    path = project(root, merge={"compare": ["ties"]})
    write_jsonl(root / "new_de.jsonl", sentences("de", 20, seed=5))
    with pytest.raises(SystemExit) as done:
        main(["run", str(path), "--quiet"])
    assert done.value.code == 0
    return root


@pytest.fixture
def fresh(ran, tmp_path):
    """A copy of that project of its own for each test (a project, its run directory included,
    can be copied: the copy uses its own files and keeps its trained models)."""
    shutil.copytree(ran, tmp_path / "p")
    return tmp_path / "p" / "recipe.yaml"


def registry(path):
    return Registry(load_recipe(path).run_dir)


def write_portuguese(path):
    """pt.jsonl next to the recipe: 30 labelled texts for a new language."""
    pt = [{"text": r["text"], "label": r["label"]} for r in sentences("fr", 30, seed=9)]
    write_jsonl(path.parent / "pt.jsonl", pt)


def update_de(cli, path, *options):
    """`langmerge update` of de with the fixture's new German examples."""
    return cli("update", path, "--lang", "de", "--data", path.parent / "new_de.jsonl", *options)


def relax_guard(path, max_drop):
    path.write_text(path.read_text() + f"guard: {{max_drop: {max_drop}}}\n")


def test_an_update_makes_a_new_expert_version_and_serves_the_new_merge(fresh, cli):
    relax_guard(fresh, 100.0)
    code, text = update_de(cli, fresh, "--quiet")
    assert code == 0, text
    reg = registry(fresh)
    assert reg.latest("expert", "de")["version"] == 2
    assert reg.latest("expert", "en")["version"] == 1  # the others are not retrained
    current = reg.current_merge()
    assert current["id"] == 2 and current["method"] == "ties"
    assert [reg.latest(k, c)["id"] for k, c in [("expert", "en"), ("expert", "de"),
            ("expert", "fr")]] == current["expert_ids"]  # fmt: skip
    assert [s["reason"] for s in reg.serving()] == [
        "the best merge of `langmerge run`",
        "update de",
    ]
    # the added data is part of the project now: a copy in the run directory
    (added,) = load_recipe(fresh).languages["de"].more
    assert added.parent == load_recipe(fresh).run_dir / "additions"
    # and the project says where that data came from; the recipe file alone is unchanged
    assert origins(load_recipe(fresh)) == {"languages.de.more[0]": f"`update` (a kept copy): "
                                           f"{added.name}"}  # fmt: skip
    assert read_recipe(fresh).languages["de"].more == []


def test_the_guard_keeps_a_worse_merge_out_of_service_until_accepted(fresh, cli, monkeypatch):
    def worse(*args):
        rows = real_guard(*args)
        return [{**r, "ok": r["language"] != "fr", "shift": -5.0} for r in rows]

    real_guard = maintain.guard
    monkeypatch.setattr(maintain, "guard", worse)
    new = fresh.parent / "new_de.jsonl"
    code, text = cli("update", fresh, "--lang", "de", "--data", new, "--quiet")
    assert code == 1 and "recorded but not in service" in text and "fr -5.0" in text
    reg = registry(fresh)
    assert reg.current_merge()["id"] == 1 and len(reg.merges()) == 2
    assert load_recipe(fresh).languages["de"].more == []  # the project's data is as it was
    before = len(reg.ledger())
    code, text = cli("update", fresh, "--lang", "de", "--data", new, "--quiet", "--accept")
    assert code == 0 and "merged:ties#2 is now the current merge" in " ".join(text.split())
    reg = registry(fresh)
    assert reg.current_merge()["id"] == 2 and reg.serving()[-1]["reason"].endswith("overridden)")
    assert {r["kind"] for r in reg.ledger()[before:]} <= {"evaluate"}  # nothing retrained

    code, text = cli("rollback", fresh)
    assert code == 0 and "merge 1 (ties) is now the current merge" in text
    assert registry(fresh).current_merge()["id"] == 1
    code, text = cli("rollback", fresh)  # nothing was served before merge 1
    assert code == 1 and "nothing to roll back to" in text
    assert cli("rollback", fresh, "--to", "2")[0] == 0
    assert registry(fresh).current_merge()["id"] == 2


@pytest.mark.parametrize("phase", ["fit", "merge_recipe", "evaluate_all"])
def test_an_interruption_leaves_the_served_model_and_a_rerun_finishes(fresh, cli, monkeypatch,
                                                                      phase):  # fmt: skip
    import langmerge.workflows.training as training

    relax_guard(fresh, 100.0)
    import langmerge.workflows.recipe_merge as merging

    target = {"fit": training, "merge_recipe": merging, "evaluate_all": maintain}[phase]

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(target, phase, interrupted)
    new = fresh.parent / "new_de.jsonl"
    code, text = cli("update", fresh, "--lang", "de", "--data", new, "--quiet")
    assert code == 130 and "the model in service is unchanged" in text
    reg = registry(fresh)
    assert reg.current_merge()["id"] == 1 and load_recipe(fresh).languages["de"].more == []
    monkeypatch.undo()
    code, text = cli("update", fresh, "--lang", "de", "--data", new, "--quiet")
    assert code == 0, text
    reg = registry(fresh)
    assert reg.current_merge()["expert_ids"][1] == reg.latest("expert", "de")["id"]
    assert reg.latest("expert", "de")["version"] == 2  # trained once, whatever was interrupted


def test_one_command_at_a_time_changes_what_is_served(fresh, cli):
    write_portuguese(fresh)
    with open(load_recipe(fresh).run_dir / ".serving.lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # as a running update, merge, sweep… holds it
        for args in [
            ("update", fresh, "--lang", "de", "--data", fresh.parent / "new_de.jsonl", "--quiet"),
            ("add-language", fresh, "--lang", "pt", "--data", fresh.parent / "pt.jsonl", "--quiet"),
            ("merge", fresh),
            ("sweep", fresh, "--quiet"),
            ("rollback", fresh),
            ("run", fresh, "--quiet"),
        ]:
            code, text = cli(*args)
            assert code == 1 and "is changing what" in text and "wait for it to finish" in text, (
                args
            )
    assert registry(fresh).current_merge()["id"] == 1


def test_adding_a_language(fresh, cli):
    relax_guard(fresh, 100.0)
    write_portuguese(fresh)
    code, text = cli("add-language", fresh, "--lang", "pt", "--data", fresh.parent / "pt.jsonl",
                     "--quiet")  # fmt: skip
    assert code == 0, text
    assert "pt" in load_recipe(fresh).languages
    assert len(registry(fresh).current_merge()["expert_ids"]) == 4
    again = cli(
        "add-language", fresh, "--lang", "pt", "--data", fresh.parent / "pt.jsonl", "--quiet"
    )
    assert again[0] == 0 and len(registry(fresh).merges()) == 2  # the same request: nothing new
    other = fresh.parent / "new_de.jsonl"
    code, text = cli("add-language", fresh, "--lang", "pt", "--data", other)
    assert code == 1 and "already a language" in text


def test_the_saving_is_computed_from_the_ledger(fresh, cli):
    relax_guard(fresh, 100.0)
    outcome = maintain.update(fresh, "de", fresh.parent / "new_de.jsonl", progress=False)
    reg = registry(fresh)
    expert = reg.latest("expert", "de")
    merge_job = reg.job(reg.current_merge()["job_id"])
    joint = reg.latest("joint")
    recipe = load_recipe(fresh)
    from langmerge.data.prepare import load_data

    examples = sum(len(d.train) for d in load_data(recipe.data_spec()).languages.values())
    steps = 2 * math.ceil(examples / 4)  # 2 epochs of batches of 4 on all data, new data included
    update = expert["wall_s"] + merge_job["wall_s"]
    projected = joint["wall_s"] * steps / joint["training"]["steps"]
    assert outcome.cost["update"]["wall_s"] == pytest.approx(update)
    assert outcome.cost["joint_retrain"]["wall_s"] == pytest.approx(projected)
    assert outcome.cost["wall_saving"] == pytest.approx(1 - update / projected)
    assert "projected" in outcome.cost["joint_retrain"]["source"]


def test_update_mistakes(fresh, cli):
    code, text = cli("update", fresh, "--lang", "xx", "--data", fresh.parent / "new_de.jsonl")
    assert code == 1 and "no language xx" in text and "add-language" in text
    code, text = cli("update", fresh, "--lang", "de", "--data", fresh.parent / "missing.jsonl")
    assert code == 1 and "does not exist" in text
    bad = fresh.parent / "bad.jsonl"
    bad.write_text('{"text": "x", "label": "angry"}\n')
    code, text = cli("update", fresh, "--lang", "de", "--data", bad)
    assert code == 1 and "'angry'" in text
    empty = fresh.parent / "empty.jsonl"
    empty.write_text("")
    code, text = cli("update", fresh, "--lang", "de", "--data", empty)
    assert code == 1 and f"the data file {empty} holds no examples: nothing to add" in text
    own = fresh.parent / "data" / "de.jsonl"  # the language's own file, given again
    code, text = cli("update", fresh, "--lang", "de", "--data", own)
    assert code == 1 and f"every example of {own} is already in de's data" in text
    assert registry(fresh).current_merge()["id"] == 1
    assert load_recipe(fresh).languages["de"].more == []


def test_a_refused_update_does_not_slip_into_the_next_merge(fresh, cli, monkeypatch):
    real_guard = maintain.guard

    def refuse(*args):
        return [{**r, "ok": False} for r in real_guard(*args)]

    monkeypatch.setattr(maintain, "guard", refuse)
    assert update_de(cli, fresh)[0] == 1
    monkeypatch.undo()
    relax_guard(fresh, 100.0)
    write_portuguese(fresh)
    code, text = cli("add-language", fresh, "--lang", "pt", "--data", fresh.parent / "pt.jsonl",
                     "--quiet")  # fmt: skip
    assert code == 0, text
    reg = registry(fresh)
    served = {e["id"]: e for e in reg.trained("expert")}
    versions = {
        served[i]["language"]: served[i]["version"] for i in reg.current_merge()["expert_ids"]
    }
    assert versions == {"en": 1, "de": 1, "fr": 1, "pt": 1}  # de v2 was refused: not served


def test_continue_trains_the_served_expert_further_on_the_new_examples_only(fresh, cli):
    import json

    relax_guard(fresh, 100.0)
    code, text = update_de(cli, fresh, "--mode", "continue", "--quiet")
    assert code == 0, text
    flat = " ".join(text.split())
    assert "training v1 further on" in flat
    reg = registry(fresh)
    v2 = reg.latest("expert", "de")
    meta = json.loads((load_recipe(fresh).run_dir / "experts/de/v2/langmerge.json").read_text())
    assert meta["continued_from"].endswith("experts/de/v1")
    (job,) = [r for r in reg.ledger() if r["id"] == v2["job_id"]]
    new_examples = int(flat.split("further on ")[1].split()[0])
    assert job["examples"] == 2 * new_examples < 2 * 30  # 2 epochs of the new examples only
    code, text = cli("train", fresh, "--lang", "de", "--quiet")  # a retrain is another model
    assert code == 0 and "expert de: v3" in text


def test_compare_joint_measures_the_retrain_and_scores_it(fresh, cli):
    relax_guard(fresh, 100.0)
    code, text = update_de(cli, fresh, "--compare-joint", "--quiet")
    assert code == 0, text
    reg = registry(fresh)
    joint = reg.latest("joint")
    (step,) = reg.steps()
    cost = step["result"]["cost"]
    assert joint["version"] == 2 and cost["joint_retrain"]["source"] == "measured"
    assert cost["joint_retrain"]["wall_s"] == pytest.approx(joint["wall_s"])
    # both joint models scored on the same test examples: the retrain's own shift per language
    scores = {
        v: {c: reg.evaluation(f"joint:v{v}", c, "test", None) for c in ("en", "de", "fr")}
        for v in (1, 2)
    }
    for row in cost["joint_shifts"]:
        old, new = (scores[v][row["language"]] for v in (1, 2))
        assert row["shift"] == pytest.approx((new["accuracy"] - old["accuracy"]) * 100)
    assert [r["language"] for r in cost["joint_shifts"]] == ["en", "de", "fr"]
    assert "joint retrain shift" in text


def test_a_refused_new_language_stays_out_of_the_project(fresh, cli, monkeypatch):
    real_guard = maintain.guard
    monkeypatch.setattr(maintain, "guard", lambda *a: [{**r, "ok": False} for r in real_guard(*a)])
    write_portuguese(fresh)
    assert cli("add-language", fresh, "--lang", "pt", "--data", fresh.parent / "pt.jsonl")[0] == 1
    monkeypatch.undo()
    assert "pt" not in load_recipe(fresh).languages
    relax_guard(fresh, 100.0)
    assert update_de(cli, fresh)[0] == 0
    assert len(registry(fresh).current_merge()["expert_ids"]) == 3  # en, de v2, fr: no pt


def scored(right: int, wrong: int, flipped: int = 0) -> dict:
    """Metrics with per-example right/wrong: `right` right, `wrong` wrong, then `flipped`
    examples wrong that the model before got right."""
    per = [1.0] * right + [0.0] * wrong + [0.0] * flipped
    return {"accuracy": sum(per) / len(per), "per_example": {"accuracy": per}}


def test_the_guard_blocks_a_large_drop_only_when_it_is_significant():
    # en: 2 of 10 examples flipped to wrong (−20 points, McNemar p = 0.5); de: 10 of 40 (p ≈ 0.002)
    before = {"en": scored(8, 2), "de": scored(40, 0), "fr": scored(8, 2)}
    after = {"en": scored(6, 2, 2), "de": scored(30, 0, 10), "fr": scored(8, 2)}
    rows = {r["language"]: r for r in maintain.guard(before, after, "accuracy", "fr", False, 1.0,
                                                       0.05)}  # fmt: skip
    assert rows["en"]["verdict"] == "warn" and rows["en"]["ok"] and rows["en"]["p"] == 0.5
    assert rows["de"]["verdict"] == "FAIL" and not rows["de"]["ok"]
    assert rows["de"]["p"] == 2 / 2**10 and rows["de"]["test"] == "McNemar exact"
    assert rows["fr"]["verdict"] == "ok" and rows["fr"]["p"] == 1.0  # unchanged: paired anyway
    assert rows["fr"]["low"] == rows["fr"]["high"] == 0.0
    (advice,) = maintain.warnings_of(list(rows.values()))
    assert advice.startswith("en dropped 20.0 points, more than allowed, but not significantly")
    assert "add test examples for en" in advice
    # without the significance requirement any drop beyond max_drop blocks
    strict = {r["language"]: r for r in maintain.guard(before, after, "accuracy", "fr", False,
                                                         1.0)}  # fmt: skip
    assert strict["en"]["verdict"] == "FAIL" and strict["de"]["verdict"] == "FAIL"


def test_status_and_history_after_an_update(fresh, cli):
    relax_guard(fresh, 100.0)
    code, text = update_de(cli, fresh, "--quiet")
    assert code == 0, text
    reg = registry(fresh)
    try:
        current = reg.current_merge()
        scores = dict(
            reg.db.execute(
                "SELECT language, json_extract(metrics, '$.accuracy') "
                "FROM evaluations WHERE model = 'merged:ties#2'"
            )
        )
    finally:
        reg.close()
    status = history.status_rows(fresh)
    (title, rows), (source_title, source), (changed_title, changed) = status.items()
    assert title == (
        f"in service: merge ties#2 (merges/{Path(current['path']).name}); its experts, and the "
        "merge's newest score on each language"
    )
    assert [(r["language"], r["expert"], r["path"]) for r in rows] == [
        ("en", "v1", "experts/en/v1"), ("de", "v2", "experts/de/v2"), ("fr", "v1", "experts/fr/v1")
    ]  # fmt: skip
    for r in rows:
        assert r["merge's score"].startswith(f"accuracy {scores[r['language']]:.3f}")
    assert source == [{"method": "ties", "density": 1.0, "λ": 1.0, "weights": "equal",
                       "from": "the recipe's `merge:` section"}]  # fmt: skip
    # what the run directory changed in the project: the update's data, traced to it
    (kept,) = load_recipe(fresh).languages["de"].more
    assert changed_title.startswith("settings the run directory changed")
    assert changed == [{"setting": "languages.de.more[0]",
                        "from": f"`update` (a kept copy): {kept.name}"}]  # fmt: skip
    found = history.history_rows(fresh)
    assert [(e["language"], e["version"]) for e in found["experts"]] == [
        ("en", 1), ("de", 1), ("fr", 1), ("de", 2)
    ]  # fmt: skip
    assert [(m["id"], m["experts"], m["in service"]) for m in found["merges"]] == [
        (1, "en v1, de v1, fr v1", ""), (2, "en v1, de v2, fr v1", "yes")
    ]  # fmt: skip
    assert [(s["step"], s["what"], s["new merge"], s["outcome"])
            for s in found["maintenance steps"]] == [(1, "update de", 2, "served")]  # fmt: skip
    assert [s["why"] for s in found["in service over time"]] == [
        "the best merge of `langmerge run`", "update de"
    ]  # fmt: skip
    for command in ("status", "history"):
        code, text = cli(command, fresh)
        assert code == 0 and "ties" in text, text


def test_a_generation_project_is_maintained_and_guarded_by_rouge(tmp_path, cli):
    root = tmp_path / "g"
    path = project(root, "generation", merge={"compare": ["ties"]}, guard={"max_drop": 100.0})
    write_jsonl(root / "new_de.jsonl", sentences("de", 20, seed=5))
    code, text = cli("run", path, "--quiet")
    assert code == 0, text
    code, text = update_de(cli, path, "--quiet")
    assert code == 0, text
    assert "rougeL: merged:ties#1 → merged:ties#2" in text
    reg = registry(path)
    try:
        (step,) = reg.steps()
        rouge = dict(reg.db.execute(
            "SELECT language, json_extract(metrics, '$.rougeL') FROM evaluations "
            "WHERE model = 'merged:ties#2' AND split = 'test'"
        ))  # fmt: skip
        assert reg.latest("expert", "de")["version"] == 2 and reg.current_merge()["id"] == 2
    finally:
        reg.close()
    assert step["served"] and step["merge_id"] == 2
    shifts = {s["language"]: s for s in step["result"]["shifts"]}
    assert set(shifts) == {"en", "de", "fr"}
    for code, s in shifts.items():
        assert s["after"] == rouge[code]  # the guard compared the registry's ROUGE-L scores
        assert s["shift"] == pytest.approx((s["after"] - s["before"]) * 100)
        # a paired test on the per-example ROUGE-L (McNemar when every answer scores 0 or 1)
        assert s["test"] in ("paired bootstrap", "McNemar exact"), shifts
        assert s["low"] <= s["shift"] <= s["high"], shifts
