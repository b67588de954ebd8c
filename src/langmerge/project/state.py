"""The project as it stands: the recipe file as written, plus what its run directory changed
since — data that `update` and `add-language` added, the merge settings the newest `sweep`
chose — applied here, in one place, with where each changed setting came from.

    recipe = load_recipe("recipe.yaml")      # the recipe file + the run directory's changes
    origins(recipe)  # {"merge.method": "sweep #2 (its choice ties-d0.5)", …}
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from langmerge.data.spec import LanguageData
from langmerge.errors import ConfigError
from langmerge.project.recipe import Recipe, read_recipe
from langmerge.project.registry import read_additions, read_sweep_choice

CHOSEN = ("method", "density", "lam", "alpha", "weights")  # the merge settings a sweep chooses


@dataclass
class Applied:
    """What the run directory changed in a recipe: the sweep whose choice replaced `merge:`
    settings (None: the file's own), and setting → where its value came from."""

    sweep: dict | None = None
    origins: dict[str, str] = field(default_factory=dict)


def load_recipe(path: Path) -> Recipe:
    """The project's recipe now: the file, the data maintenance added, the sweep's choice;
    refused when a data file it names is missing."""
    path = Path(path).absolute()
    recipe = read_recipe(path)
    for added in read_additions(recipe.run_dir):
        source = f"`{'add-language' if added['kind'] == 'add' else 'update'}` (a kept copy)"
        recipe = with_data(recipe, added["language"], Path(added["path"]), source)
    recipe = with_sweep_choice(recipe, read_sweep_choice(recipe.run_dir))
    spec = recipe.data_spec()
    for code in recipe.languages:
        lang = spec.source(code)
        for f in lang.files():
            if not f.exists():
                whose = f"language {code!r}" if lang is not recipe.data else "all languages"
                raise ConfigError(
                    f"invalid recipe {path}: the data of {whose}, {f}, does not exist"
                )
    return recipe


def origins(recipe: Recipe) -> dict[str, str]:
    """Where each setting the run directory changed came from (every other setting is the
    recipe file's)."""
    return dict(_applied(recipe).origins)


def _applied(recipe: Recipe) -> Applied:
    return recipe._state or Applied()


def _changed(recipe: Recipe, update: dict, origins: dict[str, str], **applied) -> Recipe:
    before = _applied(recipe)
    out = recipe.model_copy(update=update)
    out._state = Applied(**{"sweep": before.sweep, **applied},
                         origins={**before.origins, **origins})  # fmt: skip
    return out


def with_data(recipe: Recipe, language: str, path: Path, source: str = "added") -> Recipe:
    """The recipe with the data file `path` added to `language` (a new language gets it as its
    only data); added data is split like `data:`."""
    languages = dict(recipe.languages)
    if language in languages:
        lang = languages[language]
        if path in lang.files():  # added before (a rerun)
            return recipe
        languages[language] = lang.model_copy(update={"more": [*lang.more, path]})
        where = f"languages.{language}.more[{len(lang.more)}]"
    else:
        languages[language] = LanguageData(data=path)
        where = f"languages.{language}"
    return _changed(recipe, {"languages": languages}, {where: f"{source}: {path.name}"})


def merge_settings(recipe: Recipe) -> dict:
    """The recipe file's own choice of merge (method, density, λ, weights), as JSON values."""
    sweep = _applied(recipe).sweep
    if sweep is not None:
        return sweep["recipe_merge"]
    return recipe.merge.model_dump(mode="json", include=set(CHOSEN))


def applied_sweep(recipe: Recipe) -> dict | None:
    """The sweep whose choice replaced the recipe file's merge settings, or None."""
    return _applied(recipe).sweep


def with_sweep_choice(recipe: Recipe, sweep: dict | None) -> Recipe:
    """The recipe with the merge settings `langmerge sweep` chose, unless the recipe file's
    `merge:` settings changed since that sweep: then the file's edit wins."""
    if sweep is None or sweep.get("recipe_merge") != merge_settings(recipe):
        return recipe
    choice = sweep["choice"]  # (a sweep made before regmean chose no alpha)
    update = {k: choice.get(k, getattr(recipe.merge, k)) for k in CHOSEN}
    merge = recipe.merge.model_copy(update=update)
    source = f"sweep #{sweep['id']} (its choice {sweep['winner']})" if "id" in sweep else (
        f"the sweep's choice {sweep['winner']}")  # fmt: skip
    changed = {f"merge.{k}": source for k, v in update.items() if v != getattr(recipe.merge, k)}
    return _changed(recipe, {"merge": merge}, changed, sweep=sweep)
