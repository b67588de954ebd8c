"""Tiny projects for the training tests, made from the tiny example (examples/tiny): its recipes
and data, with its tiny encoder or decoder built from config. No network."""

from __future__ import annotations

import functools
import shutil
import sys
import tempfile
from pathlib import Path

import yaml

EXAMPLE = Path(__file__).parents[1] / "examples" / "tiny"
sys.path.insert(0, str(EXAMPLE))

from make import (  # noqa: E402
    LANGS,
    sentences,
    tiny_decoder,
    tiny_encoder,
    write_jsonl,
)

__all__ = ["LANGS", "project", "sentences", "tiny_decoder", "tiny_encoder", "write_jsonl"]


@functools.cache
def built(kind: str) -> Path:
    """The tiny encoder (classification) or decoder, built once per test process (building the
    encoder pretrains it for a few seconds)."""
    out = Path(tempfile.mkdtemp(prefix=f"tiny-{kind}-")) / "model"
    (tiny_encoder if kind == "classification" else tiny_decoder)(out)
    return out


def project(root: Path, kind: str = "classification", **overrides) -> Path:
    """A copy of the tiny example's recipe for `kind` and its data in `root`, with its model
    built there; top-level `overrides` replace (mappings: update) the recipe's entries."""
    root.mkdir(parents=True, exist_ok=True)
    name = "recipe.yaml" if kind == "classification" else "recipe-generation.yaml"
    recipe = yaml.safe_load((EXAMPLE / name).read_text())
    shutil.copytree(EXAMPLE / "data", root / "data", dirs_exist_ok=True)
    model = root / recipe["base"]
    if not model.exists():
        shutil.copytree(built(kind), model)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(recipe.get(key), dict):
            recipe[key] = {**recipe[key], **value}
        else:
            recipe[key] = value
    path = root / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, allow_unicode=True, sort_keys=False))
    return path
