"""Which model to evaluate: `base`, `joint`, `expert:de`, `merged:ties`, or a directory; resolved
against a recipe's registry and loaded ready for inference, checked against the recipe's task."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch

from langmerge.errors import ConfigError, InputError
from langmerge.models.backbones import (
    check_weight_format,
    find_base,
    load_config,
    load_tokenizer,
    load_weights,
    model_class,
    quiet_transformers,
)
from langmerge.project.recipe import Recipe
from langmerge.project.registry import Registry
from langmerge.workflows.bases import prepared_base

REFERENCES = (
    "base, joint (or joint:vN), expert:LANG (or expert:LANG:vN), merged (the newest merge), "
    "merged:NAME (a merge of `langmerge run` or a method; merged:NAME#ID one merge), or a "
    "model directory"
)


@dataclass(frozen=True)
class ModelRef:
    """A resolved reference: a name for tables and the registry, and where the weights are."""

    name: str  # e.g. expert:de:v2, merged:ties#3, joint:v1, base@…, or the directory@…
    path: Path  # a full model directory or a PEFT adapter directory
    base: Path  # the model adapters apply to (and whose tokenizer every model uses)
    language: str | None = None  # an expert's own language


def resolve(recipe: Recipe, ref: str, labels: list[str] | None) -> ModelRef:
    """Find the model `ref` names (see REFERENCES)."""
    base = _base_dir(recipe, labels)
    if ref == "base":  # the name says which base: the cache must not mix up two of them
        return ModelRef(f"base@{_fingerprint(base)}", base, base)
    kind, _, arg = ref.partition(":")
    if kind in ("joint", "expert", "merged"):
        recipe.rundir.require_trained(f"there is no {ref}")
        with recipe.rundir.registry() as registry:
            return _from_registry(registry, kind, arg, ref, base)
    path = Path(ref)
    if path.is_dir():  # named by its files' sizes and times: changed weights, a new name
        return ModelRef(f"{path.absolute()}@{_fingerprint(path)}", path, base)
    raise ConfigError(f"unknown model {ref!r}: give {REFERENCES}")


def _from_registry(registry: Registry, kind: str, arg: str, ref: str, base: Path) -> ModelRef:
    if kind == "joint":  # joint, or joint:vN for one version
        rows = registry.trained("joint")
        if arg:
            rows = [r for r in rows if f"v{r['version']}" == arg]
            if not rows:
                raise ConfigError(f"no joint model {arg}: `langmerge ls` lists the versions")
        row = max(rows, key=lambda r: r["version"]) if rows else None
        if row is None:
            raise ConfigError("no joint model yet: run `langmerge train RECIPE --joint`")
        return ModelRef(f"joint:v{row['version']}", Path(row["path"]), Path(row["base"]))
    if kind == "expert":
        code, _, version = arg.partition(":")  # expert:LANG, or expert:LANG:vN for one version
        if not code:
            raise ConfigError("say which expert: expert:LANG, e.g. expert:de")
        rows = registry.trained("expert", code)
        if version:
            rows = [r for r in rows if f"v{r['version']}" == version]
            if not rows:
                raise ConfigError(f"no expert {code} {version}: `langmerge ls` lists the versions")
        if not rows:
            raise ConfigError(f"no expert for {code!r}: run `langmerge train RECIPE --lang {code}`")
        row = max(rows, key=lambda r: r["version"])
        name = f"expert:{code}:v{row['version']}"
        return ModelRef(name, Path(row["path"]), Path(row["base"]), code)
    merges = registry.merges()
    if not merges:
        raise ConfigError("no merges yet: run `langmerge run RECIPE` or `langmerge merge RECIPE`")
    arg, _, wanted = arg.partition("#")  # merged:NAME#ID names one merge exactly
    if wanted:
        merges = [m for m in merges if str(m["id"]) == wanted]
    # a merge's own name first (ties-d0.5), its method only when no name matches (ties)
    chosen = [m for m in merges if not arg or m["params"].get("name") == arg]
    chosen = chosen or [m for m in merges if m["method"] == arg]
    if not chosen:
        known = sorted({m["params"].get("name") or m["method"] for m in merges})
        raise ConfigError(f"no merge named {arg!r} in the registry; there are {', '.join(known)}")
    m = chosen[-1]
    return ModelRef(merge_ref(m), Path(m["path"]), base)


def merge_ref(merge: dict) -> str:
    """The exact reference of a registry merge row: merged:NAME#ID."""
    return f"merged:{merge['params'].get('name') or merge['method']}#{merge['id']}"


def _fingerprint(path: Path) -> str:
    """A short hash of a model directory's path and its files' names, sizes and change times."""
    h = hashlib.sha256(str(path.absolute()).encode())
    for f in sorted(path.iterdir()):
        if f.is_file():
            st = f.stat()
            h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns};".encode())
    return h.hexdigest()[:10]


def _base_dir(recipe: Recipe, labels: list[str] | None) -> Path:
    """The base experts were trained from: with a seeded head (classification) or as it is."""
    if recipe.task.kind == "classification":
        return prepared_base(recipe, labels)
    found = find_base(recipe.base)
    if found is None:
        raise InputError(f"the base model {recipe.base} is not on this machine")
    check_weight_format(found, recipe.allow_pickle)
    return found


def load(ref: ModelRef, recipe: Recipe, labels: list[str] | None):
    """(model in eval mode on the best device, tokenizer), checked against the recipe."""
    quiet_transformers()
    tokenizer = load_tokenizer(ref.base)
    cls = model_class(recipe.task.kind)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        if (ref.path / "adapter_config.json").is_file():
            from peft import PeftModel

            base = load_weights(cls.from_pretrained, ref.base)
            model = PeftModel.from_pretrained(base, ref.path).merge_and_unload()
        else:
            model = load_weights(cls.from_pretrained, ref.path)
    except (OSError, ValueError, RuntimeError) as e:
        raise InputError(f"cannot load {ref.name} from {ref.path}: {e}") from None
    check_model(model, tokenizer, recipe, labels, ref)
    model.config.pad_token_id = tokenizer.pad_token_id
    return model.to(device).eval(), tokenizer


def check_model(model, tokenizer, recipe: Recipe, labels: list[str] | None, ref: ModelRef) -> None:
    """Refuse a model that is not of this recipe: vocabulary, architecture, width, labels."""

    base = load_config(ref.base)
    rows = model.get_input_embeddings().weight.shape[0]
    if rows < len(tokenizer) or rows != base.vocab_size:
        raise InputError(
            f"{ref.name} has {rows} token embeddings but the recipe's base has "
            f"{base.vocab_size} (its tokenizer {len(tokenizer)} tokens): it is not a model of "
            "this recipe"
        )
    theirs = (model.config.model_type, getattr(model.config, "hidden_size", None))
    ours = (base.model_type, getattr(base, "hidden_size", None))
    if theirs != ours:
        raise InputError(
            f"{ref.name} is a {theirs[0]} model of width {theirs[1]}, the recipe's base a "
            f"{ours[0]} of width {ours[1]}: it is not a model of this recipe"
        )
    if recipe.task.kind == "classification":
        theirs = [model.config.id2label[i] for i in range(model.config.num_labels)]
        if theirs != labels:
            raise InputError(
                f"{ref.name} classifies into {theirs}, the recipe into {labels}: "
                "evaluate a model trained for this recipe"
            )
