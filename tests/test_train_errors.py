"""A user's mistakes in a project: one clear error, a non-zero exit, the registry untouched."""

import sqlite3

import pytest
import yaml
from tiny import project

from langmerge.project.registry import DB_NAME, SCHEMA_VERSION


@pytest.fixture
def recipe(tmp_path):
    return project(tmp_path)


def edit(path, change):
    body = yaml.safe_load(path.read_text())
    change(body)
    path.write_text(yaml.safe_dump(body, allow_unicode=True))
    return path


def refused(cli, recipe, *expected):
    """`train --all` fails with every expected phrase and leaves no registry behind."""
    code, text = cli("train", recipe, "--all", "--quiet")
    assert code == 1, text
    flat = " ".join(text.split())
    for phrase in expected:
        assert phrase in flat
    assert not (recipe.parent / "run" / DB_NAME).exists()
    return flat


def test_a_typo_in_a_key(cli, recipe):
    edit(recipe, lambda b: b.update(trainig=b.pop("training")))
    refused(cli, recipe, "trainig: Extra inputs are not permitted")


def test_a_missing_data_file(cli, recipe):
    (recipe.parent / "data" / "fr.jsonl").unlink()
    refused(cli, recipe, "the data of language 'fr'", "fr.jsonl, does not exist")


def test_a_language_with_no_examples(cli, recipe):
    (recipe.parent / "data" / "de.jsonl").write_text("")
    refused(cli, recipe, "de: no training examples")


def test_a_label_outside_the_label_set(cli, recipe):
    with (recipe.parent / "data" / "en.jsonl").open("a") as f:
        f.write('{"text": "the day was grey", "label": "neutral"}\n')
    refused(cli, recipe, "labels outside task.labels: 'neutral' ×1")


def test_a_base_model_that_is_not_on_this_machine(cli, recipe, monkeypatch):
    edit(recipe, lambda b: b.update(base="nobody/no-such-model"))
    refused(cli, recipe, "the base model nobody/no-such-model is not on this machine")
    # with the hub allowed but unreachable: said at once, no retries
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens on port 9
    refused(cli, recipe, "cannot be reached")


def test_a_target_module_the_model_lacks(cli, recipe):
    edit(recipe, lambda b: b["lora"].update(target_modules=["query", "q_proj"]))
    text = refused(cli, recipe, "lora.target_modules ['q_proj'] are not linear layers")
    assert "'query'" in text and "'value'" in text  # the names it does have


def test_a_run_directory_from_a_newer_langmerge(cli, recipe):
    run = recipe.parent / "run"
    run.mkdir()
    db = sqlite3.connect(run / DB_NAME)
    db.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    db.close()
    before = (run / DB_NAME).read_bytes()
    code, text = cli("train", recipe, "--lang", "en", "--quiet")
    assert code == 1 and "written by a newer langmerge" in text
    assert (run / DB_NAME).read_bytes() == before
    code, text = cli("check", recipe)
    assert code == 1 and "newer langmerge" in text


def test_check_lists_every_data_problem_and_exits_non_zero(cli, recipe):
    (recipe.parent / "data" / "de.jsonl").write_text("")
    with (recipe.parent / "data" / "en.jsonl").open("a") as f:
        f.write('{"text": "grey", "label": "neutral"}\n')
    code, text = cli("check", recipe)
    assert code == 1 and "2 problem(s)" in text
    assert "de: no training examples" in text and "'neutral' ×1" in text
    assert not (recipe.parent / "run").exists()


def test_train_needs_to_be_told_what_to_train(cli, recipe):
    code, text = cli("train", recipe)
    assert code == 1 and "--lang CODE (repeatable), --all, or --joint" in text
    code, text = cli("train", recipe, "--lang", "xx", "--quiet")
    assert code == 1 and "no language xx; it has en, de, fr" in text


def test_merging_before_training(cli, recipe):
    code, text = cli("merge", recipe)
    assert code == 1 and "no experts trained yet" in text


class NotATensor:
    """What a pickle can carry besides tensors (and what could run code when unpickled)."""


def test_a_pickle_only_base_is_loaded_only_when_allowed(tmp_path, cli):
    import shutil

    import torch
    from safetensors.torch import load_file

    path = project(tmp_path / "p")
    base = tmp_path / "p" / yaml.safe_load(path.read_text())["base"]
    weights = load_file(base / "model.safetensors")
    (base / "model.safetensors").unlink()
    torch.save(weights, base / "pytorch_model.bin")
    code, text = cli("train", path, "--lang", "en", "--quiet")
    assert code == 1 and "stores its weights only as pickle (pytorch_model.bin)" in text
    assert "--allow-pickle" in text
    code, text = cli("train", path, "--lang", "en", "--quiet", "--allow-pickle")
    assert code == 0, text
    torch.save({**weights, "extra": NotATensor()}, base / "pytorch_model.bin")
    shutil.rmtree(tmp_path / "p" / "run")  # else training starts from the base prepared above
    code, text = cli("train", path, "--lang", "de", "--quiet", "--allow-pickle")
    assert code == 1 and "holds more than plain tensors" in text and "Traceback" not in text


def test_a_full_disk_during_training_is_a_clear_error_and_a_failed_job(tmp_path, cli, monkeypatch):
    import sqlite3

    import langmerge.workflows.training as jobs
    from langmerge.project.registry import Registry
    from langmerge.project.state import load_recipe

    def full(*args, **kwargs):  # what torch.save raises when the disk fills up
        raise RuntimeError("PytorchStreamWriter failed writing file data/3: file write failed")

    path = project(tmp_path / "p")
    monkeypatch.setattr(jobs, "fit_and_stage", full)
    code, text = cli("train", path, "--lang", "en", "--quiet")
    assert code == 1 and "Traceback" not in text
    assert "expert en: the disk is full (PytorchStreamWriter failed" in text
    assert "run the same command again: it resumes from the last checkpoint" in text
    (job,) = Registry(load_recipe(path).run_dir).ledger()
    assert job["status"] == "failed" and "file write failed" in job["error"]
    for command in ("ls", "status"):  # after a crash, both say what happened
        code, text = cli(command, path)
        assert code == 0 and "unfinished jobs (failed or interrupted, and not done since)" in text
        assert "expert" in text and "RuntimeError: PytorchStreamWriter failed" in text
    assert "no merge in service yet" in text

    def no_row(*args, **kwargs):  # the registry cannot record the failure either
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(Registry, "fail_job", no_row)
    code, text = cli("train", path, "--lang", "de", "--quiet")
    assert code == 1 and "expert de: the disk is full" in text and "Traceback" not in text
