"""The merge config: langmerge's own YAML, or a mergekit YAML translated to it.

Validated up front with pydantic; relative paths resolve against the config file's folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

from langmerge.errors import ConfigError
from langmerge.files import parse_size
from langmerge.merge.methods import METHODS, check_params, get_method
from langmerge.merge.params import PARAMETERS, Density, MergeParams
from langmerge.merge.regmean import ALPHA
from langmerge.yamlfile import read_mapping, validate


def _known_method(name: str) -> str:
    try:
        get_method(name)
    except ConfigError as e:  # a ValueError, so that pydantic names the field
        raise ValueError(str(e)) from None
    return name


MethodName = Annotated[str, AfterValidator(_known_method)]
"""A merge method's name, checked against the registry when a config is validated."""


class ExpertSpec(BaseModel):
    """One expert: a full model directory or a PEFT LoRA adapter directory."""

    model_config = ConfigDict(extra="forbid")
    path: Path
    weight: float = 1.0
    density: Density | None = None
    name: str | None = None
    statistics: Path | None = None  # folder of input Gram matrices (data-aware methods)

    @property
    def label(self) -> str:
        return self.name or self.path.name


class MergeConfig(BaseModel):
    """Everything one merge needs. See README, section "Merging"."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    method: MethodName
    base: Path
    experts: list[ExpertSpec] = Field(min_length=1)
    density: Density = 1.0
    lam: float = Field(1.0, alias="lambda")
    normalize: bool | None = None
    gamma: float = Field(0.01, ge=0.0, lt=1.0)
    epsilon: float = Field(0.15, ge=0.0, lt=1.0)
    t: float = Field(0.5, ge=0.0, le=1.0)
    rescale: Literal["density", "l1", "none"] = "density"
    seed: int = 0
    alpha: float = Field(ALPHA, gt=0.0, le=1.0)  # regmean: share of off-diagonal Gram entries
    fallback: MethodName = "linear"  # regmean: the method for tensors that are no linear map
    space: Literal["delta", "factors"] = "delta"
    emit: Literal["full", "adapter", "both"] = "full"
    adapter_rank: int | None = Field(None, ge=1)
    adapter_power_iters: int = Field(1, ge=0, le=10)
    dtype: Literal["float32", "float16", "bfloat16"] | None = None
    shard_size: int | str = "2GB"
    allow_pickle: bool = False
    source: str = "langmerge"  # or "mergekit": where the config came from, for the model card

    @field_validator("shard_size")
    @classmethod
    def _shard_size(cls, v: int | str) -> int | str:

        try:
            ok = parse_size(v) > 0
        except ValueError:
            ok = False
        if not ok:
            raise ValueError(f"shard_size must be a size such as 2GB, 500MB or 1000000; got {v!r}")
        return v

    @field_validator("experts", mode="before")
    @classmethod
    def _paths_as_experts(cls, v: Any) -> Any:
        return (
            [{"path": e} if isinstance(e, str | Path) else e for e in v]
            if isinstance(v, list)
            else v
        )

    @model_validator(mode="after")
    def _consistent(self) -> MergeConfig:
        fallback = get_method(self.fallback)
        if fallback.data_aware or fallback.knots or fallback.combine == "slerp":
            raise ValueError(
                f"fallback {self.fallback} cannot merge single tensors; use linear, ties, …"
            )
        labels = [e.label for e in self.experts]
        if len(set(labels)) != len(labels):
            raise ValueError(f"expert names must be unique, got {labels}; set `name:` on each")
        try:
            check_params(get_method(self.method), self.set_params(), fallback)
        except ConfigError as e:
            raise ValueError(str(e)) from None
        return self

    def set_params(self) -> set[str]:
        """The parameters (names of `merge.params.PARAMETERS`) this config sets to a value other
        than their default; a per-expert density counts as `density`. A default written out
        (as in the `config` of a merge's langmerge_merge.json) sets nothing."""
        fields = type(self).model_fields
        out = {
            name
            for name in self.model_fields_set & PARAMETERS.keys()
            if getattr(self, name) != fields[name].default
        }
        if any(e.density is not None for e in self.experts):
            out.add("density")
        return out

    def params(self) -> MergeParams:
        """What the maths gets: the parameters, with one density per expert where they differ."""
        return MergeParams.from_settings(
            len(self.experts),
            density=[e.density if e.density is not None else self.density for e in self.experts],
            lam=self.lam,
            normalize=self.normalize,
            gamma=self.gamma,
            epsilon=self.epsilon,
            t=self.t,
            rescale=self.rescale,
            seed=self.seed,
            alpha=self.alpha,
        )

    @property
    def weights(self) -> list[float]:
        return [e.weight for e in self.experts]

    def resolved(self, root: Path) -> MergeConfig:
        """A copy whose relative paths are taken relative to `root`."""

        def fix(p: Path) -> Path:
            return p if p.is_absolute() else (root / p)

        experts = [
            e.model_copy(
                update={
                    "path": fix(e.path),
                    "statistics": fix(e.statistics) if e.statistics is not None else None,
                }
            )
            for e in self.experts
        ]
        return self.model_copy(update={"base": fix(self.base), "experts": experts})


def build_config(data: dict, where: str = "config") -> MergeConfig:
    """Validate a dict as a MergeConfig; errors name the field and say what is allowed (a
    parameter the method does not take, set to other than its default, is one)."""
    return validate(MergeConfig, data, where)


def load_config(path: Path, **overrides: Any) -> MergeConfig:
    """Read a merge config file (langmerge's own format or mergekit's) and validate it; a
    parameter the method does not take is an error (`overrides` included)."""
    data = read_mapping(path, "config file", "method:, base:, experts: …")
    if "merge_method" in data:
        data = from_mergekit(data)
    data.update({k: v for k, v in overrides.items() if v is not None})
    return build_config(data, str(path)).resolved(Path(path).parent)


# ---------------------------------------------------------------------------------------------
# mergekit YAML.

# mergekit name → (langmerge method, mergekit's default for `normalize`, rescale of kept entries)
MERGEKIT_METHODS: dict[str, tuple[str, bool, str]] = {
    "linear": ("linear", True, "density"),
    "task_arithmetic": ("task_arithmetic", False, "density"),
    "ties": ("ties", True, "density"),
    "dare_ties": ("dare_ties", False, "l1"),
    "dare_linear": ("dare_linear", False, "l1"),
    "breadcrumbs": ("breadcrumbs", False, "density"),
    "breadcrumbs_ties": ("breadcrumbs_ties", False, "density"),
    "della": ("della_ties", True, "l1"),
    "della_linear": ("della", False, "l1"),
    "model_stock": ("model_stock", False, "density"),
    "slerp": ("slerp", False, "density"),
}
MERGEKIT_KEYS = {
    "models",
    "base_model",
    "merge_method",
    "parameters",
    "dtype",
    "out_dtype",
    "tokenizer_source",
    "tokenizer",
}
MERGEKIT_PARAMS = {
    "weight",
    "density",
    "lambda",
    "normalize",
    "gamma",
    "epsilon",
    "t",
    "rescale",
    "int8_mask",
}


def _scalar(value: Any, where: str) -> Any:
    if isinstance(value, list | dict):
        raise ConfigError(
            f"{where}: gradients and per-tensor filters are not supported; give a single value"
        )
    return value


def from_mergekit(data: dict) -> dict:
    """Translate a mergekit YAML into langmerge's config, keeping mergekit's semantics.

    mergekit's defaults differ by method (e.g. `normalize` is off for dare_ties and
    task_arithmetic, and DARE rescales by L1 norm); they are made explicit here.
    """
    unknown = set(data) - MERGEKIT_KEYS
    if unknown:
        raise ConfigError(
            f"unsupported mergekit option(s): {', '.join(sorted(unknown))} "
            f"(supported: {', '.join(sorted(MERGEKIT_KEYS))})"
        )
    if data.get("tokenizer_source") not in (None, "base") or data.get("tokenizer"):
        raise ConfigError(
            "mergekit tokenizer_source/tokenizer are not supported; the merged "
            "model keeps the base model's tokenizer"
        )
    mk_method = data["merge_method"]
    if mk_method not in MERGEKIT_METHODS:
        raise ConfigError(
            f"mergekit merge_method {mk_method!r} is not supported; supported: "
            f"{', '.join(sorted(MERGEKIT_METHODS))}"
        )
    method, normalize_default, rescale_default = MERGEKIT_METHODS[mk_method]
    params = {k: _scalar(v, f"parameters.{k}") for k, v in (data.get("parameters") or {}).items()}
    bad = set(params) - MERGEKIT_PARAMS
    if bad:
        raise ConfigError(f"unsupported mergekit parameter(s): {', '.join(sorted(bad))}")
    models = data.get("models") or []
    if not models:
        raise ConfigError("mergekit config has no `models`")
    base = data.get("base_model")
    experts = []
    for i, entry in enumerate(models):
        entry = {"model": entry} if isinstance(entry, str) else entry
        if not isinstance(entry, dict) or "model" not in entry:
            raise ConfigError(f"models[{i}] must be a path or a mapping with `model:`")
        path = str(entry.get("model", ""))
        if "+" in path:
            raise ConfigError(
                f"models[{i}]: mergekit's 'model+lora' syntax is not supported; "
                "list the LoRA adapter directory as an expert instead"
            )
        mp = {
            k: _scalar(v, f"models[{i}].parameters.{k}")
            for k, v in (entry.get("parameters") or {}).items()
        }
        if set(mp) - {"weight", "density"}:
            raise ConfigError(f"models[{i}]: only weight and density can be set per model")
        if base is not None and path == str(base) and method != "slerp" and method != "linear":
            continue  # mergekit drops the base model from the task vectors
        expert = {"path": path, "weight": float(mp.get("weight", params.get("weight", 1.0)))}
        if "density" in mp:
            expert["density"] = float(mp["density"])
        experts.append(expert)
    if base is None:
        if method != "linear":
            raise ConfigError(f"mergekit {mk_method} needs base_model")
        base = experts[0]["path"]  # linear needs no base: deltas against the first model

    if method == "linear" and params.get("normalize") is False:
        raise ConfigError(
            "mergekit linear with normalize: false (Σ wᵢθᵢ) is not supported; use "
            "task_arithmetic for an unnormalized sum of deltas"
        )
    if method == "slerp" and len(experts) != 2:
        raise ConfigError("mergekit slerp takes the base model and one other model")
    if method == "slerp" and experts[0]["path"] != str(base):
        experts.reverse()  # t = 0 is the base model
    rescale = rescale_default
    if "rescale" in params:
        rescale = rescale_default if params["rescale"] else "none"
    out: dict[str, Any] = {
        "method": method,
        "base": str(base),
        "experts": experts,
        "source": "mergekit",
    }
    takes = get_method(method).params
    if "normalize" in takes or "normalize" in params:  # mergekit's default made explicit
        out["normalize"] = bool(params.get("normalize", normalize_default))
    if "rescale" in takes or "rescale" in params:
        out["rescale"] = rescale
    for ours, theirs in [
        ("density", "density"),
        ("lam", "lambda"),
        ("gamma", "gamma"),
        ("epsilon", "epsilon"),
        ("t", "t"),
    ]:
        if theirs in params:
            out[ours] = float(params[theirs])
    dtype = data.get("out_dtype") or data.get("dtype")
    if dtype is not None:
        out["dtype"] = {
            "float32": "float32",
            "fp32": "float32",
            "float16": "float16",
            "fp16": "float16",
            "bfloat16": "bfloat16",
            "bf16": "bfloat16",
        }.get(str(dtype), str(dtype))
    return out


__all__ = ["METHODS", "ExpertSpec", "MergeConfig", "build_config", "from_mergekit", "load_config"]
