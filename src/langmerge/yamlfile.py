"""Reading YAML configs into pydantic models, with errors a user can act on."""

from __future__ import annotations

from pathlib import Path
from typing import TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from langmerge.errors import ConfigError, InputError
from langmerge.textfile import read_text

M = TypeVar("M", bound=BaseModel)


class Strict(BaseModel):
    """A config model that refuses keys it does not know (a typo is an error, not a default)."""

    model_config = ConfigDict(extra="forbid")


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (plain YAML keeps the
    last, so `en:` written twice would silently train one language on another's data)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.setdefault(key, key_node.start_mark.line + 1)
            except TypeError:  # an unhashable key: the base class reports it
                break
            if first != key_node.start_mark.line + 1:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"the key {key!r} is given twice (lines {first} and "
                    f"{key_node.start_mark.line + 1}): keep one",
                    key_node.start_mark,
                )
        return super().construct_mapping(node, deep)


def read_mapping(path: Path, kind: str, keys_hint: str) -> dict:
    """The mapping at the top of YAML file `path` (a `kind` such as "recipe")."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{kind} {path} is a folder: give the YAML file inside it")
    if not path.is_file():
        raise ConfigError(f"{kind} {path} does not exist")
    try:
        data = yaml.load(read_text(path, kind), Loader=_UniqueKeyLoader)  # noqa: S506
    except InputError as e:
        raise ConfigError(str(e)) from None
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
