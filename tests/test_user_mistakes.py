"""A user's mistakes with files and the command line: each gets one plain line that says what to
fix and exit code 1, never a traceback; messages print exactly as written."""

import yaml
from tiny import sentences, write_jsonl

from langmerge.data.prepare import MAX_CHARS, load_data
from langmerge.project.state import load_recipe
from langmerge.workflows.maintenance import guard


def recipe_file(tmp_path, languages=None) -> str:
    (tmp_path / "base").mkdir(exist_ok=True)
    write_jsonl(tmp_path / "en.jsonl", sentences("en", 30, 0))
    body = {
        "base": "base",
        "task": {"kind": "classification", "labels": ["happy", "sad"]},
        "languages": languages or {"en": {"data": "en.jsonl"}},
    }
    return yaml.safe_dump(body, allow_unicode=True)


def test_a_recipe_saved_in_latin_1_is_refused_with_its_line(tmp_path, cli):
    path = tmp_path / "recipe.yaml"
    path.write_bytes(recipe_file(tmp_path).replace("base: base", "base: café").encode("latin-1"))
    code, printed = cli("check", path)
    assert code == 1 and "Traceback" not in printed
    assert f"{path}:1: the recipe is not UTF-8 text (byte 0xe9); save it as UTF-8" in printed


def test_a_data_file_saved_in_latin_1_is_refused_with_its_line(tmp_path, cli):
    path = tmp_path / "recipe.yaml"
    path.write_text(recipe_file(tmp_path))
    body = "text,label\nbonjour,happy\nà bientôt,sad\n"
    (tmp_path / "en.csv").write_bytes(body.encode("cp1252"))  # what Excel's plain "CSV" writes
    path.write_text(path.read_text().replace("en.jsonl", "en.csv"))
    code, printed = cli("check", path)
    assert code == 1
    assert f"{tmp_path / 'en.csv'}:3: the data file is not UTF-8 text (byte 0xe0)" in printed


def test_a_key_given_twice_is_refused_with_both_lines(tmp_path, cli):
    write_jsonl(tmp_path / "fr.jsonl", sentences("fr", 30, 0))
    path = tmp_path / "recipe.yaml"
    recipe_file(tmp_path)
    path.write_text(
        "base: base\ntask: {kind: classification}\nlanguages:\n"
        "  en:\n    data: en.jsonl\n  en:\n    data: fr.jsonl\n"
    )
    code, printed = cli("check", path)
    assert code == 1
    assert "the key 'en' is given twice (lines 4 and 6): keep one" in printed


def test_a_recipe_that_is_a_folder(tmp_path, cli):
    code, printed = cli("check", tmp_path)
    assert code == 1 and f"recipe {tmp_path} is a folder: give the YAML file inside it" in printed


def test_messages_print_as_written_even_with_brackets(tmp_path, cli):
    folder = tmp_path / ("a-long-folder-name-" * 6)
    folder.mkdir()
    path = folder / "recipe.yaml"
    path.write_text(recipe_file(folder, {"en": {"data": "data/[red]fr[/red].jsonl"}}))
    code, printed = cli("check", path)
    assert code == 1
    # no markup is applied, and a long path is not wrapped when the output is not a terminal
    assert f"the data of language 'en', {folder / 'data/[red]fr[/red].jsonl'}, does not" in printed


def test_version_and_short_help(cli):
    from importlib.metadata import version

    assert cli("--version") == (0, f"langmerge {version('langmerge')}\n")
    code, printed = cli("-h")
    assert code == 0 and "merge" in printed and "Usage" in printed


def test_a_huge_record_is_refused_before_anything_tokenises_it(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text(recipe_file(tmp_path))
    rows = sentences("en", 30, 0)
    rows[4]["text"] = "x" * (MAX_CHARS + 1)
    write_jsonl(tmp_path / "en.jsonl", rows)
    (problem,) = load_data(load_recipe(path).data_spec()).problems
    assert problem == (
        "en data: 1 records are longer than 1,000,000 characters (record 5's text has "
        "1,000,001 characters); a model reads only the first max_length tokens: shorten or "
        "remove them"
    )


def test_a_drop_of_exactly_max_drop_is_allowed():
    # 85/100 → 84/100 in floating point is a shift of −1.0000000000000009 points
    before = {"en": {"accuracy": 0.85}, "de": {"accuracy": 0.9}}
    after = {"en": {"accuracy": 0.84}, "de": {"accuracy": 0.95}}
    rows = guard(before, after, "accuracy", "de", add=False, max_drop=1.0)
    assert [(r["language"], r["verdict"]) for r in rows] == [("en", "ok"), ("de", "ok")]
    rows = guard(before, after, "accuracy", "de", add=False, max_drop=0.9)
    assert rows[0]["verdict"] == "FAIL"
