"""Data: every supported source reads the same examples; splits are deterministic and stable as
data grows; every problem is named; the data hash follows what training sees."""

import csv

import pytest
import yaml
from tiny import sentences, write_jsonl

from langmerge.data.encode import IGNORE, encode
from langmerge.data.prepare import Example, count_table, load_data
from langmerge.errors import InputError
from langmerge.project.recipe import Task
from langmerge.project.state import load_recipe, with_data

TASK = {"kind": "classification", "labels": ["happy", "sad"]}


def recipe_at(tmp_path, languages, **extra):
    path = tmp_path / "recipe.yaml"
    (tmp_path / "base").mkdir(exist_ok=True)
    body = {"base": "base", "task": TASK, "languages": languages, **extra}
    path.write_text(yaml.safe_dump(body, allow_unicode=True))
    return load_recipe(path)


def texts(split):
    return [e.text for e in split]


def test_jsonl_csv_parquet_and_a_saved_dataset_give_the_same_examples(tmp_path):
    import datasets

    records = sentences("de", 30, seed=1)
    write_jsonl(tmp_path / "de.jsonl", records)
    with (tmp_path / "de.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(records[0]))
        writer.writeheader()
        writer.writerows(records)
    datasets.Dataset.from_list(records).to_parquet(tmp_path / "de.parquet")
    datasets.Dataset.from_list(records).save_to_disk(tmp_path / "de_saved")
    loaded = [
        load_data(recipe_at(tmp_path, {"de": {"data": name}}).data_spec()).languages["de"]
        for name in ("de.jsonl", "de.csv", "de.parquet", "de_saved")
    ]
    assert all(d.train == loaded[0].train and d.test == loaded[0].test for d in loaded)
    assert len({d.digest for d in loaded}) == 1
    kept = set(texts(loaded[0].train))
    assert texts(loaded[0].train) == [r["text"] for r in records if r["text"] in kept]  # in order
    assert sum(len(loaded[0].split(s)) for s in ("train", "validation", "test")) == 30


def test_a_saved_dataset_dict_gives_its_splits(tmp_path):
    import datasets

    split = {"train": sentences("fr", 20, 1), "test": sentences("fr", 5, 2)}
    datasets.DatasetDict({k: datasets.Dataset.from_list(v) for k, v in split.items()}).save_to_disk(
        tmp_path / "fr"
    )
    d = load_data(
        recipe_at(tmp_path, {"fr": {"data": "fr"}}, split={"validation": 0.0}).data_spec()
    ).languages["fr"]
    assert texts(d.test) == [r["text"] for r in split["test"]]
    assert texts(d.train) == [r["text"] for r in split["train"]] and d.validation == []


def test_one_file_with_a_language_column(tmp_path):
    rows = [{**r, "lang": code} for code in ("en", "de") for r in sentences(code, 20, 0)]
    rows += [{"text": "olá", "label": "happy", "lang": "pt"}]
    write_jsonl(tmp_path / "all.jsonl", rows)
    data = load_data(
        recipe_at(
            tmp_path, ["en", "de"], data={"data": "all.jsonl"}, language_field="lang"
        ).data_spec()
    )
    assert set(data.languages) == {"en", "de"}
    assert all(
        sum(len(d.split(s)) for s in ("train", "validation", "test")) == 20
        for d in data.languages.values()
    )
    assert any("pt ×1" in w for w in data.warnings)


def test_splits_are_deterministic_and_stay_put_when_data_grows(tmp_path):
    write_jsonl(tmp_path / "en.jsonl", sentences("en", 60, 0))
    before = load_data(recipe_at(tmp_path, {"en": {"data": "en.jsonl"}}).data_spec()).languages[
        "en"
    ]
    again = load_data(recipe_at(tmp_path, {"en": {"data": "en.jsonl"}}).data_spec()).languages["en"]
    assert before == again
    write_jsonl(tmp_path / "en.jsonl", sentences("en", 60, 0) + sentences("en", 30, 7))
    after = load_data(recipe_at(tmp_path, {"en": {"data": "en.jsonl"}}).data_spec()).languages["en"]
    assert set(texts(before.test)) <= set(texts(after.test))  # old test examples stay in test
    assert set(texts(before.train)) <= set(texts(after.train))
    assert after.digest != before.digest
    other_seed = load_data(
        recipe_at(tmp_path, {"en": {"data": "en.jsonl"}}, split={"seed": 1}).data_spec()
    )
    assert texts(other_seed.languages["en"].test) != texts(after.test)


def test_given_splits_are_kept_and_a_missing_validation_is_carved_from_train(tmp_path):
    train, test = sentences("en", 50, 0), sentences("en", 10, 3)
    write_jsonl(tmp_path / "train.jsonl", train)
    write_jsonl(tmp_path / "test.jsonl", test)
    d = load_data(
        recipe_at(tmp_path, {"en": {"train": "train.jsonl", "test": "test.jsonl"}}).data_spec()
    ).languages["en"]
    assert texts(d.test) == [r["text"] for r in test]
    assert sorted(texts(d.train) + texts(d.validation)) == sorted(r["text"] for r in train)
    assert 0 < len(d.validation) < 20


def test_every_problem_is_listed_at_once(tmp_path):
    write_jsonl(tmp_path / "en.jsonl", sentences("en", 30, 0) + [{"text": "x", "label": "angry"}])
    write_jsonl(tmp_path / "de.jsonl", [{"text": "ein", "label": "happy"}, {"label": "sad"}])
    leak = sentences("fr", 30, 0)
    write_jsonl(tmp_path / "fr_train.jsonl", leak)
    write_jsonl(
        tmp_path / "fr_test.jsonl", leak[:2] + [{"text": leak[2]["text"].upper(), "label": "sad"}]
    )
    fr = {"train": "fr_train.jsonl", "test": "fr_test.jsonl"}
    recipe = recipe_at(tmp_path, {"en": {"data": "en.jsonl"}, "de": {"data": "de.jsonl"}, "fr": fr})
    data = load_data(recipe.data_spec())
    text = "\n".join(data.problems)
    assert "labels outside task.labels: 'angry' ×1" in text
    assert "de data: 1 of 2 records miss a required field" in text and "record 2 lacks text" in text
    assert "de: only" in text and "min_examples is 10" in text
    assert "fr: 3 test examples also occur in train (leakage)" in text  # case and spaces ignored
    with pytest.raises(InputError, match="the recipe's data has problems"):
        data.require_valid()


def test_an_empty_language_and_an_unknown_one(tmp_path):
    (tmp_path / "en.jsonl").write_text("")
    recipe = recipe_at(tmp_path, {"en": {"data": "en.jsonl"}})
    assert "en: no training examples" in load_data(recipe.data_spec()).problems
    with pytest.raises(InputError, match="no language xx; it has en"):
        load_data(recipe.data_spec(), ["xx"])


def test_unreadable_files_name_the_place(tmp_path):
    (tmp_path / "en.jsonl").write_text('{"text": "a", "label": "happy"}\n{"text": \n')
    with pytest.raises(InputError, match=r"en.jsonl:2: not valid JSON"):
        load_data(recipe_at(tmp_path, {"en": {"data": "en.jsonl"}}).data_spec())
    (tmp_path / "en.txt").write_text("hello")
    with pytest.raises(InputError, match="cannot read .txt"):
        load_data(recipe_at(tmp_path, {"en": {"data": "en.txt"}}).data_spec())


def test_the_count_table(tmp_path):
    write_jsonl(tmp_path / "en.jsonl", sentences("en", 40, 0))
    (row,) = count_table(load_data(recipe_at(tmp_path, {"en": {"data": "en.jsonl"}}).data_spec()))
    assert row["train"] + row["validation"] + row["test"] == 40
    assert row["labels"] == "2/2" and row["rarest"] > 0


def test_generation_examples_learn_only_the_target(tmp_path):
    import tiny

    model = tiny.tiny_decoder(tmp_path / "decoder")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    task = Task(kind="generation", prompt="{text}")
    (item,) = encode([Example("joy and sun", "happy")], tokenizer, task, None, max_length=32)
    words = tokenizer.convert_ids_to_tokens(item["input_ids"])
    assert words == ["<s>", "joy", "and", "sun", "answer", ":", "happy", "</s>"]  # chat template
    assert item["labels"] == [IGNORE] * 6 + item["input_ids"][6:]
    (cut,) = encode([Example("joy " * 40, "happy sad")], tokenizer, task, None, max_length=16)
    # too long: the prompt loses its beginning, the target stays whole
    assert len(cut["input_ids"]) == 16
    assert tokenizer.convert_ids_to_tokens(cut["input_ids"][-5:]) == [
        "answer",
        ":",
        "happy",
        "sad",
        "</s>",
    ]


def test_a_csv_saved_with_a_byte_order_mark(tmp_path):
    rows = sentences("en", 20, 0)
    body = "text,label\n" + "".join(f"{r['text']},{r['label']}\n" for r in rows)
    (tmp_path / "en.csv").write_text("\ufeff" + body)  # as Excel writes "CSV UTF-8"
    data = load_data(recipe_at(tmp_path, {"en": {"data": "en.csv"}}).data_spec())
    assert data.problems == [] and sum(len(d.train) for d in data.languages.values()) > 0


def test_a_label_set_taken_from_the_data_is_part_of_every_hash(tmp_path):
    for code in ("en", "de"):
        write_jsonl(tmp_path / f"{code}.jsonl", sentences(code, 20, 0))
    task = {"kind": "classification"}  # no labels: the set found in the data
    languages = {"en": {"data": "en.jsonl"}, "de": {"data": "de.jsonl"}}
    before = load_data(recipe_at(tmp_path, languages, task=task).data_spec())
    with (tmp_path / "de.jsonl").open("a") as f:
        f.write('{"text": "wut und zorn", "label": "angry"}\n')
    after = load_data(recipe_at(tmp_path, languages, task=task).data_spec())
    assert after.labels == ["angry", "happy", "sad"]
    assert after.languages["en"].digest != before.languages["en"].digest  # en's head changes too


def test_a_split_column_gives_each_record_its_split(tmp_path):
    rows = sentences("en", 40, 0)
    for i, r in enumerate(rows):
        r["part"] = ["train", "train", "dev", "TEST"][i % 4]
    write_jsonl(tmp_path / "en.jsonl", rows)
    recipe = recipe_at(tmp_path, {"en": {"data": "en.jsonl"}}, split_field="part")
    d = load_data(recipe.data_spec()).languages["en"]
    assert texts(d.train) == [r["text"] for i, r in enumerate(rows) if i % 4 < 2]
    assert texts(d.validation) == [r["text"] for r in rows[2::4]]
    assert texts(d.test) == [r["text"] for r in rows[3::4]]
    # added data with the column keeps its splits; without it, it is split by the recipe
    new = sentences("en", 8, 7)
    for r in new:
        r["part"] = "test"
    write_jsonl(tmp_path / "more.jsonl", new)
    grown = load_data(with_data(recipe, "en", tmp_path / "more.jsonl").data_spec()).languages["en"]
    assert texts(grown.test) == texts(d.test) + [r["text"] for r in new]
    rows[5]["part"] = "holdout"
    del rows[6]["part"]
    write_jsonl(tmp_path / "en.jsonl", rows)
    (problem,) = load_data(recipe.data_spec()).problems
    assert problem == (
        "en data: split_field 'part' must say train, validation (or valid, val, dev) or test in "
        "every record; found 'holdout' ×1, '(missing)' ×1"
    )


def test_added_examples_already_in_the_data_are_not_counted_twice(tmp_path):
    rows = sentences("en", 30, 0)
    write_jsonl(tmp_path / "en.jsonl", rows)
    write_jsonl(tmp_path / "more.jsonl", rows[:5] + sentences("en", 3, 9))
    recipe = recipe_at(tmp_path, {"en": {"data": "en.jsonl"}})
    before = load_data(recipe.data_spec()).languages["en"]
    data = load_data(with_data(recipe, "en", tmp_path / "more.jsonl").data_spec())
    after = data.languages["en"]
    total = sum(len(d.split(s)) for d in (before,) for s in ("train", "validation", "test"))
    assert sum(len(after.split(s)) for s in ("train", "validation", "test")) == total + 3
    assert data.warnings == [
        "en: 5 examples of the added data are already in its data and are left out (not counted "
        "twice)"
    ]


def test_a_language_with_one_label_has_no_expert_to_train(tmp_path):
    write_jsonl(tmp_path / "en.jsonl", sentences("en", 30, 0))
    write_jsonl(tmp_path / "de.jsonl", [r for r in sentences("de", 60, 0) if r["label"] == "sad"])
    data = load_data(
        recipe_at(tmp_path, {"en": {"data": "en.jsonl"}, "de": {"data": "de.jsonl"}}).data_spec()
    )
    assert data.problems == [
        "de: every training example has the label 'sad', so its expert could learn only to "
        "predict that: add examples of other labels"
    ]


def test_training_data_alone_leaves_the_test_split_and_its_scores_as_they_were(tmp_path):
    rows = [
        {**r, "part": "train" if i % 3 else "test"} for i, r in enumerate(sentences("en", 30, 0))
    ]
    write_jsonl(tmp_path / "en.jsonl", rows)
    write_jsonl(tmp_path / "more.jsonl", [{**r, "part": "train"} for r in sentences("en", 6, 9)])
    recipe = recipe_at(tmp_path, {"en": {"data": "en.jsonl"}}, split_field="part")
    before = load_data(recipe.data_spec()).languages["en"]
    after = load_data(with_data(recipe, "en", tmp_path / "more.jsonl").data_spec()).languages["en"]
    assert after.digest != before.digest and len(after.train) == len(before.train) + 6
    # an evaluation on test is keyed by the test examples: still valid, no † in the report
    assert after.split_digests["test"] == before.split_digests["test"]
    assert after.split_digests["train"] != before.split_digests["train"]
