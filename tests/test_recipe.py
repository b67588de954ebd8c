"""Recipes: validated up front, paths resolved against the recipe, errors that name the field."""

import pytest
import yaml

from langmerge.errors import ConfigError
from langmerge.project.state import load_recipe

RECIPE = {
    "base": "models/base",
    "task": {"kind": "classification", "labels": ["happy", "sad"]},
    "languages": {"en": {"data": "data/en.jsonl"},
                  "de": {"train": "data/de_train.jsonl", "test": "data/de_test.jsonl"}},
    "lora": {"r": 4, "alpha": 8, "target_modules": ["query", "value"]},
    "training": {"epochs": 1, "batch_size": 4},
    "merge": {"method": "ties", "density": 1.0, "weights": {"de": 0.5}},
    "run_dir": "runs/demo",
}  # fmt: skip


def write(tmp_path, recipe, files=("en.jsonl", "de_train.jsonl", "de_test.jsonl")):
    (tmp_path / "data").mkdir(exist_ok=True)
    (tmp_path / "models" / "base").mkdir(parents=True, exist_ok=True)
    for name in files:
        (tmp_path / "data" / name).write_text('{"text": "hi", "label": "happy"}\n')
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_a_recipe_loads_with_paths_taken_from_its_folder(tmp_path):
    recipe = load_recipe(write(tmp_path, RECIPE))
    assert recipe.languages["en"].data == tmp_path / "data" / "en.jsonl"
    assert recipe.languages["de"].validation is None
    assert recipe.run_dir == tmp_path / "runs" / "demo"
    assert recipe.base == str(tmp_path / "models" / "base")
    assert recipe.training.learning_rate == 1e-3 and recipe.merge.lam == 1.0


def test_the_learning_rate_and_epochs_default_by_task_kind_unless_given(tmp_path):
    classify = load_recipe(write(tmp_path, {**RECIPE, "training": {}}))
    assert (classify.training.learning_rate, classify.training.epochs) == (1e-3, 10.0)
    generate = {**RECIPE, "task": {"kind": "generation"}, "training": {"epochs": 1}}
    generate = load_recipe(write(tmp_path, generate))
    assert (generate.training.learning_rate, generate.training.epochs) == (2e-4, 1.0)


def test_a_hub_id_stays_a_hub_id(tmp_path):
    recipe = load_recipe(write(tmp_path, {**RECIPE, "base": "intfloat/multilingual-e5-small"}))
    assert recipe.base == "intfloat/multilingual-e5-small"


def test_the_recipe_hash_follows_training_settings_not_merge_settings(tmp_path):
    one = load_recipe(write(tmp_path, RECIPE)).digest()
    other_merge = load_recipe(write(tmp_path, {**RECIPE, "merge": {"method": "dare_ties"}}))
    other_rank = load_recipe(write(tmp_path, {**RECIPE, "lora": {"r": 16}}))
    assert other_merge.digest() == one and other_rank.digest() != one


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"trainig": {}}, "trainig: Extra inputs are not permitted"),
        ({"lora": {"r": 0}}, "lora.r: Input should be greater than or equal to 1"),
        ({"languages": {"english": {"data": "data/en.jsonl"}}}, "BCP 47"),
        (
            {"languages": {"jp": {"data": "data/en.jsonl"}}},
            "'jp' names no language (ISO 639-1): did you mean ja?",
        ),
        ({"languages": {"en": {}}}, "have no data"),
        ({"merge": {"method": "tie"}}, "unknown merge method 'tie'"),
        ({"merge": {"weights": {"fr": 1.0}}}, "lacks: ['fr']"),
        ({"task": {"kind": "generation", "prompt": "Summarize"}}, "prompt must use"),
        ({"task": {"kind": "generation", "prompt": "Summarize: {}"}}, "must be field names"),
        ({"task": {"kind": "generation", "prompt": "Summarize: {text"}}, "not a valid template"),
        ({"task": {"kind": "generation", "prompt": "{text.upper}"}}, "must be field names"),
        ({"task": {"kind": "generation", "prompt": "{text!r}"}}, "no conversion"),
        ({"task": {"kind": "generation", "prompt": "{{text}}"}}, "prompt must use"),
        ({"task": {"kind": "regression"}}, "task.kind"),
    ],
)
def test_mistakes_are_named(tmp_path, change, message):
    with pytest.raises(ConfigError, match="invalid recipe") as err:
        load_recipe(write(tmp_path, {**RECIPE, **change}))
    assert message in str(err.value)


def test_a_missing_data_file_is_named(tmp_path):
    path = write(tmp_path, RECIPE, files=("en.jsonl", "de_train.jsonl"))
    with pytest.raises(ConfigError, match="language 'de'.*de_test.jsonl.*does not exist"):
        load_recipe(path)


def test_yaml_spellings_mean_what_a_user_wrote(tmp_path):
    path = tmp_path / "recipe.yaml"
    (tmp_path / "models" / "base").mkdir(parents=True)
    (tmp_path / "no.jsonl").write_text("")
    path.write_text(
        "base: models/base\n"
        "task: {kind: classification, labels: [0, 1]}\n"
        "languages:\n  no: {data: no.jsonl}\n"  # Norwegian, which YAML 1.1 reads as false
    )
    recipe = load_recipe(path)
    assert list(recipe.languages) == ["no"] and recipe.task.labels == ["0", "1"]
