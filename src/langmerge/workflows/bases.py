"""The seed the experts branch from (`experts.start: seed`): a short joint warm-up on every
language's training data, merged into the base and saved once in the run directory.

Experts then train fresh LoRA adapters on top of the seed, so each starts from what the joint
warm-up learned, and a merge's deltas are taken against the seed (the experts' base). The seed
depends on the recipe, not on the data's later changes: a retrained or added language branches
from the same seed, so maintenance stays one expert's training plus a re-merge. Its training is
one `seed` row in the ledger, part of the initial cost.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from langmerge.data.encode import encode
from langmerge.data.prepare import ProjectData
from langmerge.errors import ConfigError
from langmerge.files import write_json
from langmerge.models.backbones import (
    PREPARED,
    check_target_modules,
    load_config,
    load_tokenizer,
    prepare_base,
    resolve_base,
)
from langmerge.processes import exclusive
from langmerge.project.recipe import Recipe
from langmerge.project.registry import Registry
from langmerge.train.trainer import Counts, fit


def check_recipe_targets(config, recipe: Recipe, labels: list[str] | None) -> None:
    """Refuse the recipe's LoRA target modules when its base (`config`) lacks them."""
    check_target_modules(config, recipe.lora.target_modules, recipe.task.kind, recipe.base,
                         len(labels) if labels else None)  # fmt: skip


def prepared_base(recipe: Recipe, labels: list[str] | None) -> Path:
    """The directory experts train from: the base itself (generation), or the base with a
    seeded classification head, saved once in the run directory."""
    source = resolve_base(recipe.base, recipe.allow_pickle)
    check_recipe_targets(load_config(source), recipe, labels)
    if recipe.task.kind == "generation":
        return source
    seed = recipe.training.seed
    key = hashlib.sha256(json.dumps([recipe.base_key(), labels, seed]).encode()).hexdigest()[:12]
    return prepare_base(source, labels, seed, recipe.rundir.base(key), recipe.base)


def seed_dir(recipe: Recipe, labels: list[str] | None) -> Path:
    """Where the seed of this recipe (its training settings and label set) lives."""
    key = hashlib.sha256(f"{recipe.digest('expert')}\0{labels}".encode()).hexdigest()[:12]
    return recipe.rundir.seed(key)


def expert_base(recipe: Recipe, labels: list[str] | None) -> Path:
    """The model an expert trains from: the prepared base, or the seed (which must exist)."""
    if recipe.experts.start == "base":
        return prepared_base(recipe, labels)
    out = seed_dir(recipe, labels)
    if not (out / PREPARED).is_file():
        raise ConfigError(
            f"the seed the experts branch from is missing ({out}): `langmerge train RECIPE "
            "--all` trains it first"
        )
    return out


def ensure_seed(
    recipe: Recipe,
    registry: Registry,
    data: ProjectData,
    progress: bool = True,
    say: Callable[[str], None] = lambda _: None,
) -> Path | None:
    """Train the seed unless it exists (recipe `experts.start: seed`); its directory, or None
    for experts that start from the base. `data` must hold every language."""
    if recipe.experts.start == "base":
        return None
    out = seed_dir(recipe, data.labels)
    if (out / PREPARED).is_file():
        return out
    work = out.parent / f".train-{out.name}"
    with exclusive(work.parent / f".{out.name}.lock",
                   "another langmerge process is training the seed; wait for it"):  # fmt: skip
        if (out / PREPARED).is_file():
            return out
        return _train_seed(recipe, registry, data, out, work, progress, say)


def _train_seed(recipe, registry, data, out: Path, work: Path, progress, say) -> Path:

    base_dir = prepared_base(recipe, data.labels)
    tokenizer = load_tokenizer(base_dir)
    t = recipe.training
    codes = list(data.languages)
    train_set = [
        x
        for code in codes
        for x in encode(
            data.languages[code].split("train"), tokenizer, recipe.task, data.labels, t.max_length
        )  # fmt: skip
    ]
    steps = recipe.experts.seed_budget(len(train_set), t.batch_size * t.gradient_accumulation)
    say(f"seed: a joint warm-up of {steps} optimiser steps on {len(train_set)} examples of "
        f"{', '.join(codes)}; every expert branches from it")  # fmt: skip
    counts = Counts()
    hashes = (recipe.digest("expert"), data.joint_digest())
    with recipe.rundir.job(registry, "seed", codes, hashes, counts) as job:
        result = fit(base_dir, recipe.fit_settings(), train_set, tokenizer.pad_token_id,
                     work / "checkpoints", progress, counts, kind="seed", steps=steps)  # fmt: skip
        model = result.model.merge_and_unload()
        tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        write_json(tmp / PREPARED, {"base": recipe.base, "labels": data.labels, "seed": {
            "from": str(base_dir), "steps": result.steps, "examples": len(train_set),
            "languages": codes, "data_hash": data.joint_digest(), "train_loss": result.loss,
        }})  # fmt: skip
        tmp.rename(out)
    shutil.rmtree(work, ignore_errors=True)
    say(f"seed: {out} ({job.wall_s():.1f} s, {counts.tokens} tokens)")
    return out
