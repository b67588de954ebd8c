"""`langmerge run` and `langmerge eval` end to end on tiny models: the tables hold exactly what the
registry recorded, a second run does nothing new, and mistakes are named."""

import json

import pytest
import yaml
from tiny import project

from langmerge.project.registry import Registry
from langmerge.project.state import load_recipe

COMPARE = {"compare": ["ties", {"method": "ties", "density": 0.5}]}


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """A tiny classification project after `langmerge run`."""
    from langmerge.cli import main

    path = project(tmp_path_factory.mktemp("study"), merge=COMPARE)
    with pytest.raises(SystemExit) as done:
        main(["run", str(path), "--quiet"])
    assert done.value.code == 0
    return path


def test_the_tables_hold_what_the_registry_recorded(study):
    recipe = load_recipe(study)
    results = json.loads((recipe.run_dir / "results.json").read_text())
    assert results["languages"] == ["en", "de", "fr"] and results["metric"] == "accuracy"
    rows = list(results["quality"])
    assert rows == ["joint", "merged:ties", "merged:ties-d0.5", "experts (own language)", "base"]
    registry = Registry(recipe.run_dir)
    # two merges by one method: each row is its own merge, found by its exact name
    assert results["models"]["merged:ties"] == "merged:ties#1"
    assert results["models"]["merged:ties-d0.5"] == "merged:ties-d0.5#2"
    for row, name in results["models"].items():
        for code, metrics in results["quality"][row].items():
            model = name.replace("LANG", code)
            recorded = [
                json.loads(m)
                for (m,) in registry.db.execute(
                    "SELECT metrics FROM evaluations "
                    "WHERE (model=? OR model LIKE ?) AND language=?",
                    (model, f"{model}:v%", code),
                )
            ]
            assert recorded and metrics == recorded[-1]
    assert results["best_merge"] in ("merged:ties", "merged:ties-d0.5")
    report = (recipe.run_dir / "report.md").read_text()
    assert "| model | en | de | fr | mean | worst |" in report and "best merge − joint" in report
    assert "experts, 3 parallel workers (projected)" in report


def test_cost_comes_from_the_ledger(study):
    recipe = load_recipe(study)
    cost = json.loads((recipe.run_dir / "results.json").read_text())["cost"]
    ledger = Registry(recipe.run_dir).ledger()
    experts = [r["wall_s"] for r in ledger if r["kind"] == "expert"]
    (joint,) = [r["wall_s"] for r in ledger if r["kind"] == "joint"]
    assert cost["experts_serial_s"] == pytest.approx(sum(experts))
    assert cost["experts_makespan_s"] == pytest.approx(max(experts))  # 3 workers, 3 experts
    assert cost["joint_s"] == pytest.approx(joint)
    assert cost["serial_vs_joint"] == pytest.approx((sum(experts) + cost["merge_s"]) / joint)


def test_a_second_run_does_no_new_work_and_changed_settings_make_a_new_merge(study, cli):
    run_dir = load_recipe(study).run_dir
    before = len(Registry(run_dir).ledger())
    code, text = cli("run", study, "--quiet")
    assert code == 0 and "up to date" in text
    assert len(Registry(run_dir).ledger()) == before

    body = yaml.safe_load(study.read_text())
    body["merge"]["density"] = 0.3  # `ties` (short form) takes its density from `merge:`
    study.write_text(yaml.safe_dump(body, sort_keys=False))
    code, text = cli("run", study, "--quiet")
    assert code == 0 and "merge ties-d0.5: up to date" in " ".join(text.split())
    new_jobs = [r["kind"] for r in Registry(run_dir).ledger()[before:]]
    assert new_jobs == ["merge", "evaluate"]  # the ties merge again, and its evaluation
    body["merge"]["density"] = 1.0
    study.write_text(yaml.safe_dump(body, sort_keys=False))


def test_eval_one_model_on_chosen_languages(study, cli):
    code, text = cli("eval", study, "--model", "expert:de", "--lang", "fr", "--lang", "de")
    assert code == 0 and "accuracy" in text and "macro_f1" in text
    code, text = cli("eval", study, "--model", "merged:nope")
    assert code == 1 and "no merge named 'nope'" in text and "ties-d0.5" in text
    code, text = cli("eval", study, "--model", "expert")
    assert code == 1 and "expert:LANG" in text


def test_a_model_of_another_label_set_is_refused(study, cli, tmp_path):
    from transformers import AutoModelForSequenceClassification

    recipe = load_recipe(study)
    other = AutoModelForSequenceClassification.from_pretrained(recipe.base, num_labels=3)
    other.save_pretrained(tmp_path / "three-way")
    code, text = cli("eval", study, "--model", tmp_path / "three-way")
    assert code == 1 and "classifies into" in text and "['happy', 'sad']" in text


def test_a_language_without_a_test_split(tmp_path, cli):
    path = project(tmp_path, split={"validation": 0.2, "test": 0.0, "seed": 0})
    code, text = cli("eval", path, "--model", "base")
    assert code == 1 and "have no test examples" in text
    code, text = cli("run", path, "--quiet")  # said before any training
    assert code == 1 and "have no test examples" in text
    assert not (load_recipe(path).run_dir / "registry.sqlite").exists()


def test_the_evaluation_cache_follows_the_generation_settings(tmp_path):
    from langmerge.workflows.evaluation import evaluation_key

    recipe = load_recipe(project(tmp_path, kind="generation"))
    longer = recipe.model_copy(
        update={"task": recipe.task.model_copy(update={"max_new_tokens": 8})}
    )
    assert evaluation_key(recipe, "d") != evaluation_key(longer, "d")
    assert recipe.digest() == longer.digest()  # no retraining for it


def test_generation_is_scored_by_rouge_and_by_parsed_labels(tmp_path, cli):
    path = project(tmp_path, kind="generation")
    assert cli("train", path, "--lang", "de", "--quiet")[0] == 0
    code, text = cli("eval", path, "--model", "expert:de", "--lang", "de")
    assert code == 0, text
    recipe = load_recipe(path)
    (row,) = Registry(recipe.run_dir).db.execute("SELECT metrics FROM evaluations").fetchall()
    metrics = json.loads(row[0])
    assert {"rouge1", "rouge2", "rougeL", "exact_match", "token_f1", "empty"} <= set(metrics)

    body = yaml.safe_load(path.read_text())  # the same data, answers as labels: happy / sad
    body["task"].update(target_field="label", labels=["happy", "sad"], max_new_tokens=3)
    path.write_text(yaml.safe_dump(body))
    code, text = cli("eval", path, "--model", "base", "--lang", "de")
    assert code == 0, text
    rows = Registry(recipe.run_dir).db.execute("SELECT metrics FROM evaluations").fetchall()
    labels = json.loads(rows[-1][0])
    assert {"accuracy", "macro_f1", "unparseable"} <= set(labels)
    assert 0.0 <= labels["unparseable"] <= 1.0


def test_a_model_with_another_vocabulary_is_refused(study, cli, tmp_path):
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(vocab_size=10, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                        intermediate_size=64, num_labels=2)  # fmt: skip
    BertForSequenceClassification(config).save_pretrained(tmp_path / "small-vocab")
    code, text = cli("eval", study, "--model", tmp_path / "small-vocab")
    assert code == 1 and "has 10 token embeddings" in text and "not a model of this recipe" in text


def test_the_experts_makespan_is_measured_only_for_one_parallel_run(tmp_path):
    from langmerge.meter import Cost
    from langmerge.project.registry import TrainedModel
    from langmerge.workflows.study import cost_table

    recipe = load_recipe(project(tmp_path / "p"))

    def expert(registry, code, start, end):
        job = registry.start_job("expert", [code], "r", "d", started=start)
        model = TrainedModel("expert", code, [code], "base", "r", "d", {}, path=f"/x/{code}")
        registry.finish_training(job, Cost(), model, ended=end)

    registry = Registry(recipe.run_dir)
    try:
        job = registry.start_job("joint", ["en", "de", "fr"], "r", "d", started=0.0)
        registry.finish_training(job, Cost(), TrainedModel("joint", None, ["en", "de", "fr"],
                                 "base", "r", "d", {}, path="/x/joint"), ended=40.0)  # fmt: skip
        for code, start, end in (("en", 100.0, 110.0), ("de", 102.0, 112.0), ("fr", 111.0, 120.0)):
            expert(registry, code, start, end)
    finally:
        registry.close()
    cost = cost_table(recipe, ["en", "de", "fr"])
    assert cost["makespan_measured"] and cost["workers"] == 2
    assert cost["experts_makespan_s"] == 20.0 and cost["experts_serial_s"] == 29.0
    registry = Registry(recipe.run_dir)
    try:
        expert(registry, "fr", 500.0, 509.0)  # retrained later, alone: not one parallel run
    finally:
        registry.close()
    cost = cost_table(recipe, ["en", "de", "fr"])
    assert not cost["makespan_measured"] and cost["makespan_source"].startswith("projected")


def test_a_study_over_two_seeds_keeps_each_seed_apart_and_aggregates(tmp_path, cli):
    import statistics

    path = project(tmp_path / "p", merge={"compare": ["ties"]})
    code, text = cli("run", path, "--quiet", "--seeds", "2")
    assert code == 0, text
    recipe = load_recipe(path)
    dirs = [recipe.run_dir, recipe.run_dir / "seeds" / "seed-1"]
    per_seed = [json.loads((d / "results.json").read_text()) for d in dirs]
    summary = json.loads((recipe.run_dir / "seeds.json").read_text())
    assert summary["seeds"] == [0, 1]
    for row in ("joint", "merged:ties", "base"):
        for code in ("en", "de", "fr"):
            values = [r["quality"][row][code]["accuracy"] for r in per_seed]
            got = summary["quality"][row][code]
            assert got["values"] == values and got["mean"] == statistics.fmean(values)
            assert got["sd"] == statistics.stdev(values)
    # every seed trained its own experts (another recipe hash) into its own ledger
    hashes, walls = [], 0.0
    for d in dirs:
        registry = Registry(d)
        try:
            hashes.append({e["recipe_hash"] for e in registry.trained("expert")})
            walls += sum(j["wall_s"] for j in registry.ledger() if j["kind"] == "expert")
        finally:
            registry.close()
    assert len(hashes[0]) == len(hashes[1]) == 1 and hashes[0] != hashes[1]
    assert summary["cost"]["experts_serial_s"] == pytest.approx(walls)
    assert "over seeds 0, 1" in " ".join(text.split())
    assert summary["degenerate"] == {"0": [], "1": []}
    assert "No model was degenerate in any seed." in " ".join(text.split())
    # the report shows the seeds' table as seeds.json has it
    from langmerge.reporting.tables import seed_rows

    assert cli("report", path)[0] == 0
    markdown = (recipe.run_dir / "report" / "report.md").read_text()
    assert "## Over several training seeds" in markdown
    joint = next(r for r in seed_rows(summary) if r["model"] == "joint")
    assert f"| joint | {joint['en']} | {joint['de']} | {joint['fr']} |" in markdown


def test_each_example_s_prediction_and_score_are_kept(study):
    from langmerge.reporting.tables import paired_text

    results = json.loads((load_recipe(study).run_dir / "results.json").read_text())
    joint, merged = results["quality"]["joint"]["en"], results["quality"]["merged:ties"]["en"]
    per = joint["per_example"]
    assert len(per["predicted"]) == len(per["accuracy"]) == joint["examples"]
    assert set(per["predicted"]) <= {"happy", "sad"}
    assert sum(per["accuracy"]) / len(per["accuracy"]) == joint["accuracy"]
    # a comparison recomputed from the kept scores, without a model
    assert paired_text(merged, joint, "accuracy", 0.05).startswith(
        f"{merged['accuracy'] - joint['accuracy']:+.3f} ("
    )
