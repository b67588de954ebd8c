"""Reading YAML configs into pydantic models, with errors a user can act on."""

from __future__ import annotations

from pathlib import Path
from typing import TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from langmerge.errors import ConfigError

M = TypeVar("M", bound=BaseModel)


def read_mapping(path: Path, kind: str, keys_hint: str) -> dict:
    """The mapping at the top of YAML file `path` (a `kind` such as "recipe")."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{kind} {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping ({keys_hint})")
    return data


def validate(model: type[M], data: dict, where: str) -> M:
    """`model` from `data`; every error names its field and says what is allowed."""
    try:
        return model.model_validate(data)
    except ValidationError as e:
        lines = [
            f"  {'.'.join(str(x) for x in err['loc']) or '(top level)'}: "
            + err["msg"].removeprefix("Value error, ")
            for err in e.errors()
        ]
        raise ConfigError(f"invalid {where}:\n" + "\n".join(lines)) from None
