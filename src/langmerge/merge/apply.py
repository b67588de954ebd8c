"""One merge, end to end: validate the inputs, merge, write the outputs atomically."""

from __future__ import annotations

import json
import math
import re
import time
from datetime import UTC, datetime
from pathlib import Path

import torch
from safetensors.torch import save_file

from langmerge import __version__
from langmerge.errors import ConfigError, InputError
from langmerge.files import atomic_output_dir, parse_size, write_json
from langmerge.merge.config import MergeConfig
from langmerge.merge.io import Adapter, ModelFiles, Statistics, is_adapter_dir, load_adapter
from langmerge.merge.lora import (
    PEFT_METHODS,
    LoraUpdate,
    exact,
    factor_product,
    merge_lora_factored,
    merge_lora_peft,
)
from langmerge.merge.methods import check_inputs, get_method, merge_tensor
from langmerge.merge.regmean import regmean, regmean_lora
from langmerge.merge.stream import (
    adapter_merge,
    check_adapters,
    check_full_experts,
    full_model_merge,
    regmean_merge,
    stream_merge,
)
from langmerge.merge.writer import copy_model_files
from langmerge.progress import progress_bar

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def run_merge(cfg: MergeConfig, out: Path, *, force: bool = False, progress: bool = True) -> dict:
    """Merge the experts of `cfg` into `out`; returns a summary (also saved in the output)."""
    start = time.perf_counter()
    method = get_method(cfg.method)
    check_inputs(method, len(cfg.experts), cfg.weights)
    params = cfg.params()
    base = ModelFiles(cfg.base, allow_pickle=cfg.allow_pickle, label="base")
    experts: list[ModelFiles] = []
    stats: list[Statistics] = []
    try:
        check_before_writing(cfg, method, out)
        if method.data_aware:
            stats.extend(open_statistics(cfg))
        return _run(cfg, method, params, base, experts, stats, out, force, progress, start)
    finally:
        for files in (base, *experts, *stats):
            files.close()


def open_statistics(cfg: MergeConfig) -> list[Statistics]:
    """Each expert's input statistics, which a data-aware method needs."""
    missing = [e.label for e in cfg.experts if e.statistics is None]
    if missing:
        raise ConfigError(
            f"{cfg.method} needs each expert's input statistics: set `statistics:` (a folder "
            f"written by langmerge.train.statistics.collect) for {', '.join(missing)}; a recipe's "
            "merge collects them itself"
        )
    opened: list[Statistics] = []
    try:
        for e in cfg.experts:
            opened.append(Statistics(e.statistics, e.label))
    except BaseException:
        for s in opened:
            s.close()
        raise
    return opened


def _run(cfg, method, params, base, experts, stats, out, force, progress, start) -> dict:
    if gone := [str(e.path) for e in cfg.experts if not Path(e.path).is_dir()]:
        raise InputError(f"expert {', '.join(gone)} does not exist")
    lora = [is_adapter_dir(e.path) for e in cfg.experts]
    if any(lora) and not all(lora):
        raise ConfigError("experts mix LoRA adapters and full models; merge one kind at a time")
    if all(lora):
        adapters = [
            load_adapter(e.path, allow_pickle=cfg.allow_pickle, label=e.label) for e in cfg.experts
        ]
        check_adapters(base, adapters)
        if cfg.space == "factors":
            check_factor_space(cfg, method, adapters)
        if cfg.emit != "full" and not any(a.modules for a in adapters):
            raise ConfigError("the adapters hold no LoRA modules: there is no adapter to write")
        if method.data_aware:
            fallback = adapter_merge(adapters, get_method(cfg.fallback), cfg.weights, params)
        else:
            merged = adapter_merge(adapters, method, cfg.weights, params, cfg.space)
    else:
        if method.knots:
            raise ConfigError(f"{method.name} merges LoRA adapters; the experts are full models")
        if cfg.emit != "full" or cfg.space != "delta":
            raise ConfigError("adapter output and space 'factors' need LoRA experts")
        adapters = []
        experts.extend(
            ModelFiles(e.path, allow_pickle=cfg.allow_pickle, label=e.label) for e in cfg.experts
        )
        check_full_experts(base, experts)
        if method.data_aware:
            fallback = full_model_merge(experts, get_method(cfg.fallback), cfg.weights, params)
        else:
            merged = full_model_merge(experts, method, cfg.weights, params)
    tally: dict[str, int] = {}
    if method.data_aware:
        if cfg.space != "delta":
            raise ConfigError(f"{method.name} merges in space 'delta' only")
        merged = regmean_merge(
            adapters or experts, stats, cfg.weights, params.alpha, fallback, tally, params.lam
        )

    summary: dict = {
        "langmerge_version": __version__,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "config": cfg.model_dump(mode="json", by_alias=True),
        "experts_kind": "lora" if adapters else "full",
    }
    with atomic_output_dir(out, force) as tmp:
        if cfg.emit in ("full", "both"):
            dtype = DTYPES[cfg.dtype] if cfg.dtype else None
            summary["full"] = stream_merge(
                base,
                merged,
                tmp,
                out_dtype=dtype,
                shard_bytes=parse_size(cfg.shard_size),
                progress=progress,
                inputs=experts,
            )
            copy_model_files(cfg.base, tmp)
            if cfg.dtype:
                set_config_dtype(tmp / "config.json", cfg.dtype)
            (tmp / "README.md").write_text(model_card(cfg, summary))
        if cfg.emit in ("adapter", "both"):
            adapter_dir = tmp if cfg.emit == "adapter" else tmp / "adapter"
            adapter_dir.mkdir(exist_ok=True)
            summary["adapter"] = write_adapter(cfg, adapters, base, adapter_dir, progress, stats)
        if method.data_aware:
            summary["data_aware"] = {
                "tensors": tally.get("regmean", 0),
                "fallback_tensors": tally.get("fallback", 0),
                "fallback": cfg.fallback,
                "alpha": cfg.alpha,
            }
        summary["seconds"] = round(time.perf_counter() - start, 3)
        write_json(tmp / "langmerge_merge.json", summary)
    return summary


def set_config_dtype(path: Path, dtype: str) -> None:
    """Record the output dtype in the copied config.json (transformers reads it on load)."""
    if path.exists():
        config = json.loads(path.read_text())
        for key in ("torch_dtype", "dtype"):
            if key in config:
                config[key] = dtype
        write_json(path, config)


def check_before_writing(cfg: MergeConfig, method, out: Path) -> None:
    """Config errors that would otherwise surface half-way through a merge."""
    out = Path(out).resolve()
    for path in [cfg.base, *(e.path for e in cfg.experts)]:
        path = Path(path).resolve()
        if path == out or path.is_relative_to(out):
            raise ConfigError(f"the output {out} would replace the input {path}; choose another")
    if method.combine == "slerp" and cfg.emit != "full":
        raise ConfigError("slerp interpolates full weights: it cannot be written as an adapter")
    normalize = method.normalize if cfg.normalize is None else cfg.normalize
    if method.combine == "sum" and normalize and math.fsum(cfg.weights) == 0.0:
        raise ConfigError(f"weights {cfg.weights} sum to zero; a normalized merge divides by it")


def check_factor_space(cfg: MergeConfig, method, adapters: list[Adapter]) -> None:
    """`space: factors` is PEFT's add_weighted_adapter: only what that call can express."""
    if method.name not in PEFT_METHODS:
        raise ConfigError(f"space 'factors' supports {', '.join(PEFT_METHODS)}; got {method.name}")
    unsupported = [
        name
        for name, is_set in [
            ("lambda", cfg.lam != 1.0),
            ("normalize", cfg.normalize is not None),
            ("rescale", cfg.rescale != "density"),
            ("adapter_rank", cfg.adapter_rank is not None),
            ("per-expert density", any(e.density is not None for e in cfg.experts)),
        ]
        if is_set
    ]
    if unsupported:
        raise ConfigError(
            f"space 'factors' reproduces PEFT's add_weighted_adapter, which has no "
            f"{', '.join(unsupported)}; remove them or use space 'delta'"
        )
    ranks = {m.A.shape[0] for a in adapters for m in a.modules.values()}
    if len(ranks) > 1:
        raise ConfigError(
            f"space 'factors' needs LoRA experts of one rank (as PEFT); got {sorted(ranks)}"
        )


def write_adapter(
    cfg: MergeConfig,
    adapters: list[Adapter],
    base: ModelFiles,
    out_dir: Path,
    progress: bool,
    stats: list[Statistics] | None = None,
) -> dict:
    """Write the merge as one PEFT LoRA adapter; report how well it reproduces the merge."""
    method, params, weights = get_method(cfg.method), cfg.params(), cfg.weights
    stats = stats or []
    data_aware = method.data_aware

    def by_regmean(name: str, mods: list) -> bool:
        return (
            data_aware
            and all(name in s for s in stats)
            and all(m is None or m.layout == "linear" for m in mods)
        )

    if method.data_aware:  # tensors without statistics are merged by the fallback method
        method = get_method(cfg.fallback)
    names = [n for n in base.tensors if any(n in a.modules for a in adapters)]
    ranks = [max((m.A.shape[0] for m in a.modules.values()), default=0) for a in adapters]
    rank = max(ranks) if cfg.space == "factors" else cfg.adapter_rank or sum(ranks)
    state: dict[str, torch.Tensor] = {}
    err_sq = norm_sq = 0.0
    worst = (0.0, "")
    with progress_bar("adapter", len(names), progress) as step:
        for name in names:
            step(name)
            mods = [(a.modules.get(name), w) for a, w in zip(adapters, weights, strict=True)]
            present = [(m, w) for m, w in mods if m is not None]
            layout = present[0][0].layout
            shape = (present[0][0].B.shape[0], present[0][0].A.shape[1])
            if cfg.space == "factors":
                up = merge_lora_peft(
                    method.name,
                    [m.peft_factors() for m, _ in present],
                    scalings=[m.scaling for m, _ in present],
                    weights=[w for _, w in present],
                    density=params.density_of(0),
                    seed=params.seed,
                    name=name,
                )
                if layout != "linear":  # back to the weight's orientation, as in delta space
                    up = LoraUpdate(up.A.T, up.B.T, up.rel_error, up.norm)
            elif by_regmean(name, [m for m, _ in mods]):
                factors = [
                    (m.B, m.A) if m else (torch.zeros(shape[0], 1), torch.zeros(1, shape[1]))
                    for m, _ in mods
                ]
                b, a = regmean_lora(factors, [m.scaling if m else 1.0 for m, _ in mods],
                                    [s.gram(name) for s in stats], weights=weights,
                                    alpha=params.alpha)  # fmt: skip
                b = b * params.lam
                up = exact(b, a, rank) if rank >= b.shape[1] else factor_product(b, a, rank)
            else:
                factors = [
                    (m.B, m.A) if m else (torch.zeros(shape[0], 1), torch.zeros(1, shape[1]))
                    for m, _ in mods
                ]
                dens = params.density
                up = merge_lora_factored(
                    method.name,
                    factors,
                    scalings=[m.scaling if m else 1.0 for m, _ in mods],
                    weights=weights,
                    density=list(dens) if isinstance(dens, tuple) else dens,
                    lam=params.lam,
                    seed=params.seed,
                    normalize=params.normalize,
                    gamma=params.gamma,
                    epsilon=params.epsilon,
                    rescale=params.rescale,
                    name=name,
                    rank=rank,
                    power_iters=cfg.adapter_power_iters,
                )
            norm_sq += up.norm**2
            err_sq += (up.rel_error * up.norm) ** 2
            worst = max(worst, (up.rel_error, name))
            module = "base_model.model." + name.removesuffix(".weight")
            if layout == "linear":
                state[f"{module}.lora_A.weight"] = up.A.contiguous()
                state[f"{module}.lora_B.weight"] = up.B.contiguous()
            else:  # stored transposed by PEFT: ΔW = (B·A)ᵀ
                kind = "lora_embedding" if layout == "embedding" else "lora"
                suffix = "" if layout == "embedding" else ".weight"
                state[f"{module}.{kind}_A{suffix}"] = up.B.T.contiguous()
                state[f"{module}.{kind}_B{suffix}"] = up.A.T.contiguous()
    saved = sorted({n for a in adapters for n in a.saved})
    for name in saved:
        theta0 = base.read(name).float()
        deltas = [
            a.saved[name].float() - theta0 if name in a.saved else torch.zeros_like(theta0)
            for a in adapters
        ]
        if theta0.dim() == 2 and by_regmean(name, []):
            delta = regmean(deltas, [s.gram(name) for s in stats], weights=weights,
                            alpha=params.alpha).mul_(params.lam)  # fmt: skip
        else:
            delta = merge_tensor(method, deltas, weights, params, name, theta0)
        state[f"base_model.model.{name}"] = (theta0 + delta).to(base.tensors[name].dtype)
    save_file(state, str(out_dir / "adapter_model.safetensors"), metadata={"format": "pt"})
    write_json(out_dir / "adapter_config.json", adapter_config(adapters, rank, saved))
    rel = math.sqrt(err_sq / norm_sq) if norm_sq > 0 else 0.0
    result = {
        "rank": rank,
        "modules": len(names),
        "rel_error": rel,
        "worst_module": worst[1],
        "worst_rel_error": worst[0],
        "exact": worst[0] == 0.0 and cfg.space == "delta",
    }
    (out_dir / "README.md").write_text(adapter_card(cfg, adapters, result))
    return result


def adapter_card(cfg: MergeConfig, adapters: list[Adapter], result: dict) -> str:
    """README.md of a merged adapter; one that approximates the merge says by how much."""
    if result["exact"]:
        fidelity = "It is exact: base + this adapter is the merged model, to float32 rounding."
    elif cfg.space == "factors":
        fidelity = "It merges the LoRA factors as PEFT's add_weighted_adapter does (space factors)."
    else:
        fidelity = (
            f"It approximates the merge: rank {result['rank']} leaves a relative reconstruction "
            f"error of {result['rel_error']:.3g} over all modules (worst module "
            f"{result['worst_module']}: {result['worst_rel_error']:.3g}); the full merge "
            "(`emit: full`) is exact."
        )
    return f"""---
{_card_header(cfg)}
library_name: peft
---
# LoRA adapter merged with langmerge {__version__}

Method `{cfg.method}`, rank {result["rank"]}, experts: {", ".join(a.label for a in adapters)}.
{fidelity}
"""


HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
E5 = "intfloat/multilingual-e5-small"  # what the embedded backbone is


def hub_id(base: Path) -> str | None:
    """The hub id of the model `base` is (for the card's `base_model`), or None when unknown:
    what a prepared base was made from, the embedded backbone's origin, or a hub cache path."""
    base = Path(base)
    for meta, key in (("prepared.json", "base"), ("config.json", "_name_or_path")):
        try:
            named = str(json.loads((base / meta).read_text()).get(key) or "")
        except (OSError, ValueError, AttributeError):
            continue
        if named == "embedded" or named.startswith("embedded:"):
            return E5
        if HUB_ID.match(named) and not Path(named).exists():
            return named
        if named and Path(named).is_dir() and Path(named).resolve() != base.resolve():
            return hub_id(Path(named))
    if (base / "embedded.json").is_file():
        return E5
    cached = re.search(r"models--([^/]+?)--([^/]+)/snapshots/", str(base.absolute()))
    return f"{cached[1]}/{cached[2]}" if cached else None


def _card_header(cfg: MergeConfig) -> str:
    found = hub_id(cfg.base)
    return "tags:\n- langmerge\n- merge" + (f"\nbase_model: {found}" if found else "")


def adapter_config(adapters: list[Adapter], rank: int, saved: list[str]) -> dict:
    """The first expert's PEFT config, with the merged rank (scaling 1) and the union of targets."""
    cfg = dict(adapters[0].config)
    targets = [a.config.get("target_modules") for a in adapters]
    if any(isinstance(t, str) for t in targets):
        target_modules: object = "|".join(f"({t})" for t in targets if t)
    else:
        target_modules = sorted({m for t in targets for m in (t or [])})
    saved_modules = sorted({m for a in adapters for m in (a.config.get("modules_to_save") or [])})
    cfg.update(
        r=rank,
        lora_alpha=rank,
        use_rslora=False,
        rank_pattern={},
        alpha_pattern={},
        target_modules=target_modules,
        use_dora=False,
        inference_mode=True,
        modules_to_save=saved_modules if saved else None,
    )
    return cfg


def model_card(cfg: MergeConfig, summary: dict) -> str:
    """README.md of a merged model: what was merged, how, and by which tool."""
    rows = "\n".join(
        f"| {e.label} | `{e.path}` | {e.weight} | "
        f"{e.density if e.density is not None else cfg.density} |"
        for e in cfg.experts
    )
    params = ", ".join(
        f"{k}={v}"
        for k, v in [
            ("density", cfg.density),
            ("lambda", cfg.lam),
            ("normalize", cfg.normalize),
            ("seed", cfg.seed),
            ("space", cfg.space),
        ]
    )
    return f"""---
{_card_header(cfg)}
---
# Merged model

Merged with langmerge {__version__} on {summary["created"]}.

- method: `{cfg.method}` ({params})
- base: `{cfg.base}`
- experts ({summary["experts_kind"]}):

| expert | path | weight | density |
|---|---|---|---|
{rows}

The full configuration is in `langmerge_merge.json`.
"""
