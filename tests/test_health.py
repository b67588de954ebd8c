"""Training health: each verdict on predictions and losses made to fail, the best checkpoint
kept instead of the last, and tiny models that learn nothing reported, never merged or served."""

import json
import math
from types import SimpleNamespace

import pytest
import torch
from tiny import project, write_jsonl

from langmerge.data.prepare import load_data
from langmerge.evaluate import health
from langmerge.project.registry import Registry
from langmerge.project.state import load_recipe


def test_one_label_for_every_text_while_the_true_labels_are_spread_is_a_collapse():
    found = health.label_problems(["happy", "sad"] * 5, ["happy"] * 10)
    assert found["problems"] == [
        "predicts `happy` for 100% of 10 validation texts (the true labels: `happy` 50%, `sad` 50%)"
    ]
    assert found["evidence"]["predicted"] == {"happy": 1.0}


def test_a_macro_f1_no_better_than_a_constant_predictor_is_degenerate():
    gold = ["a"] * 6 + ["b"] * 2 + ["c"] * 2  # always `a`: F1 0.75 for a, 0 for b and c
    assert health.constant_macro_f1(gold) == pytest.approx(2 * 0.6 / 1.6 / 3)
    predicted = ["a"] * 3 + ["b"] * 3 + ["c"] * 2 + ["b"] * 2  # spread, and mostly wrong
    found = health.label_problems(gold, predicted)
    assert found["problems"] == [
        f"macro-F1 {found['evidence']['macro_f1']:.3f} on 10 validation texts: no better than "
        "always predicting `a` (0.250)"
    ]


def test_a_model_that_learned_its_labels_has_no_problem():
    gold = ["a", "b", "c", "a", "b", "c"]
    assert health.label_problems(gold, ["a", "b", "c", "a", "c", "c"])["problems"] == []
    # one true label in the validation split: predicting it is no collapse
    assert health.label_problems(["a"] * 5, ["a"] * 5)["problems"] == []


def test_empty_or_identical_generations_are_degenerate():
    empty = health.generation_problems(["", " ", "", "yes"], ["a b", "c", "d", "e"])
    assert empty["problems"] == ["generates an empty answer for 75% of 4 validation prompts"]
    same = health.generation_problems(["the cat"] * 10, [f"answer {i}" for i in range(10)])
    assert same["problems"] == [
        "answers `the cat` to 100% of 10 validation prompts (10 different reference answers)"
    ]
    fine = health.generation_problems(["a", "b", "c", "d"], ["a", "b", "c", "x"])
    assert fine["problems"] == []


def test_losses_diverged_learned_nothing_or_only_overconfident():
    nan = health.loss_problems(float("nan"), 0.7, 0.69)
    assert nan["problems"] == ["the training loss diverged (not a finite number)"]
    nothing = health.loss_problems(0.69, 0.70, 0.69, metric=0.5, untrained_metric=0.5)
    assert nothing["problems"] == [
        "learned nothing: validation loss 0.700, the untrained model's 0.690"
    ]
    overconfident = health.loss_problems(0.1, 0.9, 0.69, metric=0.9, untrained_metric=0.5)
    assert overconfident["problems"] == [] and len(overconfident["warnings"]) == 1
    assert health.loss_problems(0.3, 0.4, 0.69)["problems"] == []


def test_the_verdict_names_the_language_and_what_to_try():
    parts = {"en": health.label_problems(["x", "y"] * 4, ["x"] * 8), "de": {"problems": [],
             "evidence": {}}}  # fmt: skip
    v = health.verdict(parts, health.loss_problems(0.2, 0.3, 0.7))
    assert v["verdict"] == "degenerate"
    assert v["problems"][0].startswith("en: predicts `x` for 100% of 8 validation texts")
    assert v["advice"] == [health.ADVICE_COLLAPSE]  # the loss fell: trained too hard
    barely = health.verdict(parts, health.loss_problems(0.5, 0.6, 0.7))
    assert barely["advice"] == [health.ADVICE_NOTHING]  # it fell by a seventh: too little
    assert health.summary(v).startswith("degenerate: en: predicts `x`")
    assert health.summary({}) == "unchecked" and not health.is_degenerate({})
    diverged = health.verdict({}, health.loss_problems(math.inf, 0.6, 0.7))
    assert diverged["advice"] == [health.ADVICE_DIVERGED]


# ---- the best checkpoint ----------------------------------------------------------------------


def test_the_best_step_is_kept_when_a_later_epoch_is_worse(tmp_path, monkeypatch):
    """Scripted validation scores: step 0 (untrained) 0.5, epoch 1 0.9, epoch 2 0.6. The model
    ends with the weights it had at epoch 1, and the curve says so."""
    from langmerge.train import trainer as trainer_module

    model = torch.nn.Linear(2, 2)
    accuracy = iter([0.5, 0.9, 0.6])
    scored = []

    def scripted(model, encoded, kind, pad_id, batch_size):
        a = next(accuracy)
        scored.append(a)
        n = 10  # `a` of 10 right
        right = round(a * n)
        return {"loss": 1.0 - a, "gold": [0] * n, "predicted": [0] * right + [1] * (n - right)}

    monkeypatch.setattr(trainer_module, "validation_pass", scripted)
    recipe = load_recipe(project(tmp_path / "p"))
    best = trainer_module.BestCheckpoint(
        model, {"en": [{}]}, recipe.fit_settings(), 0, tmp_path / "w", True
    )
    state = SimpleNamespace(global_step=0, epoch=0.0)
    best.on_train_begin(None, state, None)
    with torch.no_grad():
        model.weight.fill_(1.0)
    state.global_step, state.epoch = 5, 1.0
    best.on_epoch_end(None, state, None)
    with torch.no_grad():
        model.weight.fill_(2.0)
    state.global_step, state.epoch = 10, 2.0
    best.on_epoch_end(None, state, None)
    assert best.finish(10, keep_best=True) == 5
    assert torch.equal(model.weight, torch.ones(2, 2))
    assert [(p["step"], p["accuracy"]) for p in best.curve] == [(0, 0.5), (5, 0.9), (10, 0.6)]
    saved = json.loads((tmp_path / "w" / "curve.json").read_text())
    assert saved["best"]["step"] == 5 and len(saved["curve"]) == 3
    # a run resumed at step 10 finds the best step on disk
    again = trainer_module.BestCheckpoint(
        model, {"en": [{}]}, recipe.fit_settings(), 0, tmp_path / "w", True
    )
    again.on_train_begin(None, SimpleNamespace(global_step=10, epoch=2.0), None)
    assert again.best["step"] == 5 and torch.equal(again.weights["weight"], torch.ones(2, 2))


def test_training_records_its_steps_the_best_step_and_the_curve(tmp_path, cli):
    path = project(tmp_path / "p")
    code, out = cli("train", path, "--lang", "en", "--quiet")
    assert code == 0, out
    expert = Registry(load_recipe(path).run_dir).latest("expert", "en")
    training = expert["training"]
    n_train = len(load_data(load_recipe(path).data_spec()).languages["en"].train)
    per_epoch = math.ceil(n_train / 4)  # batch size 4, two epochs
    assert training["steps"] == 2 * per_epoch
    assert [p["step"] for p in training["curve"]] == [0, per_epoch, 2 * per_epoch]
    best = max(training["curve"][1:], key=lambda p: (p["accuracy"], -p["loss"]))
    assert training["best_step"] == best["step"]
    assert f"en: training on {n_train} examples, {2 * per_epoch} optimiser steps" in out
    assert f"warning: expert en gets only {2 * per_epoch} optimiser steps" in out
    assert expert["health"]["verdict"] in ("healthy", "degenerate")


def test_a_step_budget_per_job_kind_replaces_the_epochs(tmp_path):
    recipe = load_recipe(project(tmp_path / "p", training={"steps": {"expert": 30, "joint": 90}}))
    assert recipe.training.budget("expert", 24) == 30
    assert recipe.training.budget("joint", 72) == 90
    recipe = load_recipe(project(tmp_path / "q", training={"epochs": 1, "min_steps": 20}))
    assert recipe.training.budget("expert", 24) == 20  # 6 steps from one epoch: the floor wins


# ---- tiny models made to fail -------------------------------------------------------------------


def one_label_project(root):
    """Every training text of en but one, happy or sad, is labelled `happy` (a language with
    one label only is refused before training); its validation texts are labelled as they are.
    Trained to the last step (the best checkpoint could be an early step before the collapse)."""
    from tiny import sentences

    rows = [{**r, "label": "happy"} for r in sentences("en", 40, seed=1)]
    rows[0]["label"] = "sad"
    mixed = sentences("en", 12, seed=2)
    write_jsonl(root / "data" / "en-train.jsonl", rows)
    write_jsonl(root / "data" / "en-validation.jsonl", mixed)
    write_jsonl(root / "data" / "en-test.jsonl", mixed)
    en = {"train": "data/en-train.jsonl", "validation": "data/en-validation.jsonl",
          "test": "data/en-test.jsonl"}  # fmt: skip
    others = {"de": {"data": "data/de.jsonl"}, "fr": {"data": "data/fr.jsonl"}}
    training = {"epochs": 10, "best_checkpoint": False}
    return project(root, training=training, languages={"en": en, **others})


def test_an_expert_trained_on_one_label_is_degenerate_and_not_merged(tmp_path, cli):
    path = one_label_project(tmp_path / "p")
    code, out = cli("train", path, "--lang", "en", "--quiet")
    assert code == 1
    assert "expert en: DEGENERATE" in out
    assert "predicts `happy` for 100% of 12 validation texts" in out
    expert = Registry(load_recipe(path).run_dir).latest("expert", "en")
    assert expert["health"]["verdict"] == "degenerate"
    assert expert["health"]["evidence"]["en"]["predicted"] == {"happy": 1.0}
    assert cli("train", path, "--lang", "de", "--lang", "fr", "--quiet")[0] == 0
    code, out = cli("merge", path)
    assert code == 1 and "expert en v1 is degenerate" in out and "--allow-degenerate" in out
    code, out = cli("merge", path, "--allow-degenerate")
    assert code == 0 and "not served: it merges degenerate experts" in " ".join(out.split())
    assert Registry(load_recipe(path).run_dir).current_merge() is None
    code, out = cli("ls", path)
    assert code == 0 and "degenerate models" in out
    assert "predicts `happy` for 100% of 12 validation texts" in " ".join(out.split())


def test_a_run_with_an_exploding_learning_rate_is_flagged_and_serves_nothing(tmp_path, cli):
    path = project(tmp_path / "p", training={"learning_rate": 1.0e30})
    code, out = cli("run", path, "--quiet")
    assert code == 1
    assert "DEGENERATE" in out and "4 degenerate model(s)" in out
    assert "no merge made" in out
    registry = Registry(load_recipe(path).run_dir)
    assert registry.current_merge() is None and registry.merges() == []
    for model in registry.trained("expert") + registry.trained("joint"):
        assert model["health"]["verdict"] == "degenerate"
        assert "the validation loss diverged (not a finite number)" in model["health"]["problems"]
        assert model["health"]["advice"] == [health.ADVICE_DIVERGED]
    results = json.loads((load_recipe(path).run_dir / "results.json").read_text())
    assert results["best_merge"] is None
    code, out = cli("status", path)
    assert "degenerate" in out
    # the report's health table says the same, with what to try
    assert cli("report", path)[0] == 0
    markdown = (load_recipe(path).run_dir / "report" / "report.md").read_text()
    health_table = markdown.split("## Training health")[1].split("##")[0]
    assert health_table.count("| degenerate: ") == 4
    assert health.ADVICE_DIVERGED in health_table


def test_a_comparison_with_a_degenerate_joint_model_is_void():
    from langmerge.reporting.tables import quality_rows
    from langmerge.workflows.study import Study

    def scores(values):
        return {c: {"accuracy": v, "macro_f1": v} for c, v in zip(("en", "de"), values)}

    collapsed = health.verdict({"en": health.label_problems(["a", "b"] * 5, ["a"] * 10)})
    study = Study(["en", "de"], "accuracy", "test",
                  {"joint": scores([0.5, 0.5]), "merged:ties": scores([0.8, 0.7])},
                  "merged:ties", {}, health={"joint": collapsed, "merged:ties": {}})  # fmt: skip
    rows = quality_rows(study)
    assert rows[0]["model"] == "joint (degenerate)"
    assert rows[-1] == {"model": "best merge − joint",
                        "en": "void: the joint model is degenerate",
                        "de": "void: the joint model is degenerate",
                        "mean": "void", "worst": "void", "F1 mean": ""}  # fmt: skip


def test_identical_merges_are_one_group_not_a_ranking():
    from langmerge.workflows.study import identical_groups

    same = {"en": {"per_example": {"predicted": ["a", "b"]}}}
    other = {"en": {"per_example": {"predicted": ["a", "a"]}}}
    groups = identical_groups({"merged:ties": same, "merged:linear": same, "merged:x": other})
    assert groups == [["merged:ties", "merged:linear"]]


def test_empty_generations_make_a_degenerate_model(tmp_path):
    """A tiny decoder whose every answer is empty (its output layer zeroed: every logit equal,
    so greedy decoding picks token 0, a special token that decodes to nothing)."""
    from transformers import AutoModelForCausalLM

    from langmerge.models.backbones import load_tokenizer
    from langmerge.workflows.training import check_health

    recipe = load_recipe(project(tmp_path / "p", kind="generation"))
    tokenizer = load_tokenizer(recipe.base)
    assert 0 in tokenizer.all_special_ids
    model = AutoModelForCausalLM.from_pretrained(recipe.base)
    with torch.no_grad():
        model.lm_head.weight.zero_()
    data = load_data(recipe.data_spec())
    result = SimpleNamespace(model=model, curve=[], best_step=4, steps=4, last_loss=1.0)
    verdict = check_health(result, recipe, data, ["en"], tokenizer, {"en": {"loss": 1.0}}, None)
    n = len(data.languages["en"].validation)
    assert verdict["problems"] == [f"en: generates an empty answer for 100% of {n} validation "
                                   "prompts"]  # fmt: skip
