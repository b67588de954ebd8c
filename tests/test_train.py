"""Training experts and the joint model from a recipe, end to end on tiny models: adapters PEFT
loads, registry and ledger rows with exact token counts, caching, resuming, merging the recipe."""

import json
import shutil

import pytest
import torch
from tiny import project

from langmerge.data.prepare import load_data
from langmerge.project.registry import Registry
from langmerge.project.state import load_recipe


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """A classification project whose three experts and joint model are trained."""
    from langmerge.cli import main

    path = project(tmp_path_factory.mktemp("cls"))
    for args in (["--all"], ["--joint"]):
        with pytest.raises(SystemExit) as done:
            main(["train", str(path), *args, "--quiet"])
        assert done.value.code == 0
    return path


def token_count(recipe, languages, epochs):
    """Tokens a model trains on: every training example's length, once per epoch."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(recipe.base)
    data = load_data(recipe.data_spec())
    texts = [e.text for code in languages for e in data.languages[code].train]
    lengths = tokenizer(texts, truncation=True, max_length=recipe.training.max_length)["input_ids"]
    return epochs * sum(len(x) for x in lengths)


def test_each_expert_and_the_joint_model_leave_a_ledger_row_with_exact_token_counts(trained):
    recipe = load_recipe(trained)
    ledger = Registry(recipe.run_dir).ledger()
    assert [(r["kind"], r["languages"], r["status"]) for r in ledger] == [
        ("expert", ["en"], "done"), ("expert", ["de"], "done"), ("expert", ["fr"], "done"),
        ("joint", ["en", "de", "fr"], "done"),
    ]  # fmt: skip
    for row in ledger:
        assert row["tokens"] == token_count(recipe, row["languages"], epochs=2)
        assert row["wall_s"] > 0 and row["cpu_s"] > 0 and row["device_kind"] == "cpu"
        assert row["peak_memory_bytes"] > 0 and row["flops"] > 6 * row["tokens"]
        data = load_data(recipe.data_spec())
        assert row["examples"] == 2 * sum(len(data.languages[c].train) for c in row["languages"])


def test_an_expert_is_a_peft_adapter_with_its_head_and_its_recorded_scores(trained):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    recipe = load_recipe(trained)
    expert = Registry(recipe.run_dir).latest("expert", "de")
    meta = json.loads((recipe.run_dir / "experts/de/v1/langmerge.json").read_text())
    assert expert["path"] == str(recipe.run_dir / "experts/de/v1") and meta["labels"] == [
        "happy",
        "sad",
    ]
    base = AutoModelForSequenceClassification.from_pretrained(expert["base"])
    model = PeftModel.from_pretrained(base, expert["path"]).eval()
    tokenizer = AutoTokenizer.from_pretrained(expert["base"])
    validation = load_data(recipe.data_spec()).languages["de"].validation
    with torch.no_grad():
        predicted = [
            model(**tokenizer(e.text, return_tensors="pt")).logits.argmax(-1).item()
            for e in validation
        ]
    gold = [["happy", "sad"].index(e.answer) for e in validation]
    accuracy = sum(p == g for p, g in zip(predicted, gold)) / len(gold)
    assert accuracy == pytest.approx(expert["scores"]["de"]["accuracy"])
    assert any("classifier" in k for k in _adapter_keys(expert["path"]))  # the head is saved


def _adapter_keys(path):
    from safetensors import safe_open

    with safe_open(f"{path}/adapter_model.safetensors", "pt") as f:
        return list(f.keys())


def test_every_expert_starts_from_the_same_seeded_head(trained):
    from safetensors.torch import load_file

    recipe = load_recipe(trained)
    (base,) = {e["base"] for e in Registry(recipe.run_dir).trained("expert")}
    head = load_file(f"{base}/model.safetensors")["classifier.weight"]
    expected = torch.randn(head.shape, generator=torch.Generator().manual_seed(0)) * 0.02
    assert torch.equal(head, expected)


def test_an_unchanged_expert_is_not_retrained_and_force_makes_a_new_version(trained, cli):
    code, text = cli("train", trained, "--lang", "en", "--quiet")
    assert code == 0 and "expert en: up to date (v1" in text
    recipe = load_recipe(trained)
    assert len(Registry(recipe.run_dir).ledger()) == 4
    code, text = cli("train", trained, "--lang", "fr", "--force", "--quiet")
    assert code == 0 and "expert fr: v2 in" in text
    assert Registry(recipe.run_dir).latest("expert", "fr")["version"] == 2


def test_changed_data_retrains_only_that_language(tmp_path, cli):
    path = project(tmp_path)
    assert cli("train", path, "--all", "--quiet")[0] == 0
    data = tmp_path / "data" / "de.jsonl"
    data.write_text(data.read_text() + '{"text": "sonne und freude", "label": "happy"}\n')
    code, text = cli("train", path, "--all", "--quiet")
    assert code == 0 and "expert en: up to date" in text and "expert fr: up to date" in text
    assert "expert de: v2 in" in text
    code, text = cli("ls", path)
    assert code == 0 and "v2 *" in text
    shutil.rmtree(tmp_path / "run" / "experts" / "fr" / "v1")  # deleted by hand
    code, text = cli("merge", path, "--quiet")
    assert code == 1 and "the files of expert fr v1" in text and "are missing" in text
    code, text = cli("train", path, "--all", "--quiet")
    assert code == 0 and "expert fr: v1's files are missing from" in text
    assert "expert fr: v2 in" in text and "expert en: up to date" in text
    body = path.read_text().replace("learning_rate: 0.005", "learning_rate: 0.004")
    path.write_text(body)
    code, text = cli("merge", path, "--quiet")
    assert code == 0 and "en v1, de v2, fr v2 were trained with other recipe settings" in text


def test_an_interrupted_expert_resumes_from_its_last_checkpoint(tmp_path, cli, monkeypatch):
    from langmerge.train import trainer

    path = project(tmp_path / "resumed")
    step_end = trainer.ProgressBar.on_step_end

    def crash_at_step_9(self, args, state, control, **kw):  # in epoch 2, after checkpoint 8
        step_end(self, args, state, control, **kw)
        if state.global_step == 9:
            raise KeyboardInterrupt

    monkeypatch.setattr(trainer.ProgressBar, "on_step_end", crash_at_step_9)
    code, text = cli("train", path, "--lang", "en", "--quiet")
    assert code == 130 and "run the same command again to resume" in text
    recipe = load_recipe(path)
    (row,) = Registry(recipe.run_dir).ledger()
    assert row["status"] == "failed" and row["error"] == "interrupted"
    assert row["tokens"] > 0 and row["examples"] == 9 * 4  # 9 steps of batch 4 before the crash
    assert Registry(recipe.run_dir).latest("expert", "en") is None
    monkeypatch.undo()
    code, text = cli("train", path, "--lang", "en", "--quiet")
    assert code == 0 and "resumed from the checkpoint at step 8" in text
    assert not list((recipe.run_dir / "experts/en").glob(".train-*"))  # work folder cleaned up
    failed, done = Registry(recipe.run_dir).ledger()
    assert done["examples"] == 2 * 4  # its own work: the steps after the checkpoint, 9 and 10

    straight = project(tmp_path / "straight")
    assert cli("train", straight, "--lang", "en", "--quiet")[0] == 0
    resumed = _adapter_weights(recipe.run_dir / "experts/en/v1")
    reference = _adapter_weights(load_recipe(straight).run_dir / "experts/en/v1")
    assert resumed.keys() == reference.keys()
    assert all(torch.allclose(resumed[k], reference[k], atol=1e-6) for k in resumed)


def test_a_damaged_checkpoint_is_skipped_for_the_one_before(tmp_path, cli, monkeypatch):
    from langmerge.train import trainer

    path = project(tmp_path / "p")
    step_end = trainer.ProgressBar.on_step_end

    def crash_at_step_9(self, args, state, control, **kw):
        step_end(self, args, state, control, **kw)
        if state.global_step == 9:
            raise KeyboardInterrupt

    monkeypatch.setattr(trainer.ProgressBar, "on_step_end", crash_at_step_9)
    assert cli("train", path, "--lang", "en", "--quiet")[0] == 130
    monkeypatch.undo()
    recipe = load_recipe(path)
    (work,) = (recipe.run_dir / "experts/en").glob(".train-*")
    (work / "checkpoints/checkpoint-8/adapter_model.safetensors").write_bytes(b"\0" * 100)
    code, text = cli("train", path, "--lang", "en", "--quiet")
    assert code == 0, text
    assert "warning: expert en: skipped a damaged checkpoint, checkpoint-8: " in text
    assert "adapter_model.safetensors is unreadable" in text
    assert "resumed from the checkpoint at step 4" in text


def test_gradient_accumulation_averages_like_one_larger_batch(tmp_path, cli):
    from tiny import tiny_encoder

    for name in ("one", "two"):  # without dropout, whose draws depend on the batch shapes
        tiny_encoder(tmp_path / name / "encoder", dropout=0.0)
    one = project(tmp_path / "one", training={"batch_size": 4, "gradient_accumulation": 1})
    two = project(tmp_path / "two", training={"batch_size": 2, "gradient_accumulation": 2})
    for path in (one, two):  # en has 20 training examples: whole batches of 4
        assert cli("train", path, "--lang", "en", "--quiet")[0] == 0
    a, b = (_adapter_weights(load_recipe(p).run_dir / "experts/en/v1") for p in (one, two))
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5


def _adapter_weights(path):
    from safetensors.torch import load_file

    return load_file(path / "adapter_model.safetensors")


def test_a_generation_expert_trains_on_targets_and_loads_with_peft(tmp_path, cli):
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoTokenizer

    from langmerge.data.encode import encode

    path = project(tmp_path, kind="generation")
    code, text = cli("train", path, "--lang", "de", "--quiet")
    assert code == 0, text
    recipe = load_recipe(path)
    expert = Registry(recipe.run_dir).latest("expert", "de")
    assert set(expert["scores"]["de"]) == {"loss", "perplexity"}
    model = AutoPeftModelForCausalLM.from_pretrained(expert["path"])
    assert model.peft_config["default"].r == 4
    (row,) = Registry(recipe.run_dir).ledger()
    train = load_data(recipe.data_spec()).languages["de"].train
    tokenizer = AutoTokenizer.from_pretrained(recipe.base)
    encoded = encode(train, tokenizer, recipe.task, None, recipe.training.max_length)
    assert row["tokens"] == 2 * sum(len(x["input_ids"]) for x in encoded)
    assert row["examples"] == 2 * len(train)


def test_merging_a_recipe_uses_the_current_experts_and_is_recorded(trained, cli, tmp_path):
    from transformers import AutoModelForSequenceClassification

    out = tmp_path / "merged"
    code, text = cli("merge", trained, "-o", out, "--method", "dare_ties", "--density", "0.5")
    assert code == 0, text
    recipe = load_recipe(trained)
    registry = Registry(recipe.run_dir)
    merge = registry.merges()[-1]
    current = [registry.latest("expert", c)["id"] for c in ("en", "de", "fr")]
    assert merge["method"] == "dare_ties" and merge["current"] == 1
    assert merge["expert_ids"] == current and merge["params"]["density"] == 0.5
    assert registry.ledger()[-1]["kind"] == "merge"
    model = AutoModelForSequenceClassification.from_pretrained(out)
    assert model.config.id2label == {0: "happy", 1: "sad"}
    summary = json.loads((out / "langmerge_merge.json").read_text())
    assert [e["name"] for e in summary["config"]["experts"]] == ["en", "de", "fr"]


def test_check_and_ls_describe_the_project(trained, cli, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    code, text = cli("check", trained)
    assert code == 0 and "labels (2): happy, sad" in text and "target modules exist" in text
    code, text = cli("ls", trained)
    assert code == 0
    for expected in ("experts (* = current version)", "joint models", "en,de,fr", "experts/de/v1"):
        assert expected in text


@pytest.mark.parametrize("name", ["sentiment", "reasoning", "summarization"])
def test_the_paper_recipes_check_without_downloading_anything(name, cli, monkeypatch):
    import socket
    from pathlib import Path

    recipe = Path(__file__).parents[1] / "examples" / "paper-llama3-8b" / f"{name}.yaml"
    code, text = cli("check", recipe)  # the hub is off in the tests: the base cannot be had
    assert code == 1
    assert (
        "the base meta-llama/Llama-3.1-8B-Instruct is not on this machine, and the hub is off"
        in text
    )
    with socket.socket() as hub:  # a hub that accepts connections and answers nothing
        hub.bind(("127.0.0.1", 0))
        hub.listen()
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{hub.getsockname()[1]}")
        for variable in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
            monkeypatch.delenv(variable, raising=False)
        code, text = cli("check", recipe)
    assert code == 0, text
    flat = " ".join(text.split())
    assert "meta-llama/Llama-3.1-8B-Instruct: a hub id not on this machine" in flat
    assert flat.count("(read when training)") == 5 and f"{name}.yaml: ok" in flat
    r = load_recipe(recipe)
    assert (r.lora.r, r.lora.alpha, r.training.epochs, r.training.learning_rate) == (
        64,
        64,
        4,
        2e-5,
    )
    assert r.training.batch_size == 8 and list(r.languages) == ["en", "de", "fr", "ja", "zh"]


def test_two_processes_training_into_one_run_directory(tmp_path):
    import os
    import subprocess
    import sys

    path = project(tmp_path)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "langmerge.cli", "train", str(path), "--quiet", "--lang"]
    procs = [
        subprocess.Popen(
            [*command, code], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        for code in ("en", "de")
    ]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    registry = Registry(load_recipe(path).run_dir)
    assert {r["status"] for r in registry.ledger()} == {"done"} and len(registry.ledger()) == 2
    assert registry.latest("expert", "en") and registry.latest("expert", "de")


def test_a_second_training_of_the_same_model_is_refused_while_the_first_runs(tmp_path, cli):
    import fcntl

    path = project(tmp_path)
    recipe = load_recipe(path)
    data = load_data(recipe.data_spec())
    work = recipe.run_dir / "experts/en" / f".train-{recipe.digest()}-{data.languages['en'].digest}"
    work.mkdir(parents=True)
    with open(work / "lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # as the first process does
        code, text = cli("train", path, "--lang", "en", "--quiet")
    assert code == 1 and "another langmerge process is training expert en" in text
    assert Registry(recipe.run_dir).ledger() == []


def test_a_decoder_learns_classification_with_its_score_head(tmp_path, cli):
    from tiny import tiny_decoder

    tiny_decoder(tmp_path / "decoder")
    modules = ["q_proj", "k_proj", "v_proj", "o_proj"]
    lora = {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": modules}
    path = project(
        tmp_path, base="decoder", lora=lora, training={"epochs": 6, "learning_rate": 0.02}
    )
    code, text = cli("train", path, "--all", "--quiet")
    assert code == 0, text
    code, text = cli("merge", path, "--quiet")
    assert code == 0, text
    registry = Registry(load_recipe(path).run_dir)
    expert = registry.latest("expert", "en")
    assert any(k.endswith("score.weight") for k in _adapter_keys(expert["path"]))
    assert set(expert["scores"]["en"]) == {"accuracy", "macro_f1", "loss"}


def test_without_validation_data_an_expert_trains_and_has_no_scores(tmp_path, cli):
    path = project(tmp_path, split={"validation": 0.0, "test": 0.0, "seed": 0})
    code, text = cli("train", path, "--lang", "fr", "--quiet")
    assert code == 0, text
    assert Registry(load_recipe(path).run_dir).latest("expert", "fr")["scores"] == {"fr": {}}


def test_a_base_that_already_classifies_into_other_labels_gets_a_fresh_seeded_head(tmp_path, cli):
    from tiny import tiny_encoder
    from transformers import AutoModelForSequenceClassification

    AutoModelForSequenceClassification.from_pretrained(
        tiny_encoder(tmp_path / "plain"), num_labels=5
    ).save_pretrained(tmp_path / "encoder")  # a 5-way classifier; the recipe has 2 labels
    (tmp_path / "plain" / "tokenizer.json").rename(tmp_path / "encoder" / "tokenizer.json")
    (tmp_path / "plain" / "tokenizer_config.json").rename(
        tmp_path / "encoder" / "tokenizer_config.json"
    )
    path = project(tmp_path)
    code, text = cli("train", path, "--lang", "en", "--quiet")
    assert code == 0, text
    base = Registry(load_recipe(path).run_dir).latest("expert", "en")["base"]
    head = AutoModelForSequenceClassification.from_pretrained(base).classifier.weight
    expected = torch.randn(head.shape, generator=torch.Generator().manual_seed(0)) * 0.02
    assert head.shape == (2, 32) and torch.equal(head.detach(), expected)


def test_check_with_hub_data_and_labels_from_the_data(tmp_path, cli, monkeypatch):
    import yaml

    path = project(tmp_path)
    body = yaml.safe_load(path.read_text())
    body["task"].pop("labels")
    body["languages"]["ja"] = {"hub": {"id": "someone/reviews", "config": "ja"}}
    path.write_text(yaml.safe_dump(body))
    monkeypatch.setenv("COLUMNS", "200")
    code, text = cli("check", path)
    assert code == 0, text
    assert "ja: hub data set someone/reviews (read when training)" in text
    assert "labels: taken from the data when training" in text
