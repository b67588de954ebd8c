"""Streaming full-model merge: base tensor by tensor, never a whole model in memory.

For each tensor of the base, a `TensorMerge` returns the merged delta (or None to keep the base
tensor); the result θ₀ + τ is cast to the output dtype and appended to the output shard on disk.
Peak memory is about one tensor per input plus the tensor being written.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import Tensor

from langmerge.errors import InputError
from langmerge.merge.io import Adapter, ModelFiles, check_finite
from langmerge.merge.lora import merge_lora, merge_lora_peft
from langmerge.merge.methods import MergeParams, Method, merge_tensor
from langmerge.merge.regmean import regmean, regmean_lora
from langmerge.merge.writer import ShardedWriter
from langmerge.progress import progress_bar

TensorMerge = Callable[[str, Tensor], Tensor | None]


def check_full_experts(base: ModelFiles, experts: Sequence[ModelFiles]) -> None:
    """Every expert must hold exactly the base's tensors, with the same shapes."""
    for e in experts:
        missing = [n for n in base.tensors if n not in e.tensors]
        extra = [n for n in e.tensors if n not in base.tensors]
        if missing or extra:
            what = (
                f"lacks {len(missing)} base tensor(s), e.g. {missing[:3]}"
                if missing
                else f"has {len(extra)} tensor(s) the base lacks, e.g. {extra[:3]}"
            )
            raise InputError(
                f"expert {e.label} ({e.path}) {what}: experts must be fine-tunes of "
                "the same base architecture"
            )
        for name, info in base.tensors.items():
            if e.tensors[name].shape != info.shape:
                raise InputError(
                    f"expert {e.label}: tensor {name} has shape "
                    f"{e.tensors[name].shape}, the base has {info.shape}"
                )


def full_model_merge(
    experts: Sequence[ModelFiles], method: Method, weights: Sequence[float], params: MergeParams
) -> TensorMerge:
    """Merged delta of each tensor from full fine-tuned experts: τᵢ = θᵢ − θ₀."""

    def merged(name: str, base32: Tensor) -> Tensor:
        deltas = []
        for e in experts:
            t = e.read(name)
            check_finite(t, name, f"expert {e.label}")
            t = t.float() if t.dtype != torch.float32 else t
            deltas.append(t.sub_(base32))
        return merge_tensor(method, deltas, weights, params, name, base32)

    return merged


TIED = (
    "the base ties its output head to the input embeddings (tie_word_embeddings), so the head "
    "has no weight of its own to merge; adapt the embeddings instead, or untie the base"
)


def _tied(base: ModelFiles) -> bool:
    config = base.path / "config.json"
    try:
        return bool(json.loads(config.read_text()).get("tie_word_embeddings"))
    except (OSError, ValueError):
        return False


def check_adapters(base: ModelFiles, adapters: Sequence[Adapter]) -> None:
    """Adapters must come from one base model and update tensors the base has, shape for shape."""
    # a hub id and a local copy of the same model share their last path component
    origins = {
        str(a.config.get("base_model_name_or_path") or "").rstrip("/").rsplit("/", 1)[-1]
        for a in adapters
    } - {""}
    if len(origins) > 1:
        raise InputError(
            "the adapters were trained on different base models: "
            + ", ".join(f"{a.label}: {a.config.get('base_model_name_or_path')}" for a in adapters)
        )
    for a in adapters:
        for name, mod in a.modules.items():
            info = base.tensors.get(name)
            want = (mod.B.shape[0], mod.A.shape[1])
            if info is None:
                raise InputError(
                    f"adapter {a.label} updates {name}, which the base model "
                    f"{base.path} does not store: "
                    + (TIED if _tied(base) else "is it for another base model?")
                )
            if not info.dtype.is_floating_point:
                raise InputError(
                    f"adapter {a.label} updates {name}, stored as {info.dtype} in the base "
                    "(quantized?): merge onto a floating-point base"
                )
            if tuple(info.shape) != want:
                raise InputError(
                    f"adapter {a.label}: {name} gets a {want[0]}×{want[1]} update, "
                    f"but the base weight is {tuple(info.shape)}"
                )
        for name, t in a.saved.items():
            info = base.tensors.get(name)
            if info is None:
                raise InputError(
                    f"adapter {a.label} trains {name} (modules_to_save), which the base model "
                    f"{base.path} does not store; "
                    + (
                        TIED
                        if _tied(base)
                        else "save the base with that module's initial "
                        "weights so its delta can be formed"
                    )
                )
            if tuple(info.shape) != tuple(t.shape):
                raise InputError(
                    f"adapter {a.label}: {name} has shape {tuple(t.shape)}, the base "
                    f"has {tuple(info.shape)}"
                )


def adapter_merge(
    adapters: Sequence[Adapter],
    method: Method,
    weights: Sequence[float],
    params: MergeParams,
    space: str = "delta",
) -> TensorMerge:
    """Merged delta of each tensor from LoRA experts: exact per-module ΔW, or PEFT's factor space.

    An expert that does not adapt a module contributes a zero delta there (its weight is the
    base's), except in factor space, where PEFT skips it.
    """

    def merged(name: str, base32: Tensor) -> Tensor | None:
        if any(name in a.modules for a in adapters):
            if space == "factors":  # PEFT skips the adapters that do not adapt this module
                mods = [
                    (a.modules[name], wi) for a, wi in zip(adapters, weights) if name in a.modules
                ]
                up = merge_lora_peft(
                    method.name,
                    [m.peft_factors() for m, _ in mods],
                    scalings=[m.scaling for m, _ in mods],
                    weights=[wi for _, wi in mods],
                    density=params.density_of(0),
                    seed=params.seed,
                    name=name,
                )
                delta = up.B @ up.A
                return delta if mods[0][0].layout == "linear" else delta.T
            factors, scalings = [], []
            for a in adapters:
                mod = a.modules.get(name)
                if mod is None:  # this expert leaves the weight as it is: a zero delta
                    factors.append(
                        (base32.new_zeros(base32.shape[0], 1), base32.new_zeros(1, base32.shape[1]))
                    )
                    scalings.append(1.0)
                else:
                    factors.append((mod.B, mod.A))
                    scalings.append(mod.scaling)
            w = list(weights)
            dens = params.density
            return merge_lora(
                method.name,
                factors,
                scalings=scalings,
                weights=w,
                density=list(dens) if isinstance(dens, tuple) else dens,
                lam=params.lam,
                seed=params.seed,
                normalize=params.normalize,
                gamma=params.gamma,
                epsilon=params.epsilon,
                t=params.t,
                rescale=params.rescale,
                base=base32,
                name=name,
            )
        if any(name in a.saved for a in adapters):
            deltas = [
                a.saved[name].float() - base32 if name in a.saved else torch.zeros_like(base32)
                for a in adapters
            ]
            return merge_tensor(method, deltas, weights, params, name, base32)
        return None

    return merged


def regmean_merge(
    experts: Sequence[ModelFiles] | Sequence[Adapter],
    statistics: Sequence,
    weights: Sequence[float],
    alpha: float,
    fallback: TensorMerge,
    tally: dict[str, int],
    lam: float = 1.0,
) -> TensorMerge:
    """RegMean (its delta scaled by λ) for every linear map whose input Gram matrix every
    expert's statistics hold (LoRA experts in factored form); `fallback` merges every other
    tensor. `tally` counts the tensors merged each way."""
    lora = bool(experts) and isinstance(experts[0], Adapter)

    def merged(name: str, base32: Tensor) -> Tensor | None:
        out = by_regmean(name, base32)
        if out is not None:
            tally["regmean"] = tally.get("regmean", 0) + 1
            return out if lam == 1.0 else out.mul_(lam)
        out = fallback(name, base32)
        if out is not None:
            tally["fallback"] = tally.get("fallback", 0) + 1
        return out

    def by_regmean(name: str, base32: Tensor) -> Tensor | None:
        if base32.dim() == 2 and all(name in s for s in statistics):
            if lora and any(name in a.modules for a in experts):
                mods = [a.modules.get(name) for a in experts]
                if all(m is None or m.layout == "linear" for m in mods):
                    factors = [(m.B, m.A) if m else (base32.new_zeros(base32.shape[0], 1),
                                base32.new_zeros(1, base32.shape[1])) for m in mods]  # fmt: skip
                    b, a = regmean_lora(factors, [m.scaling if m else 1.0 for m in mods],
                                        [s.gram(name) for s in statistics], weights=weights,
                                        alpha=alpha)  # fmt: skip
                    return b @ a
            elif lora and any(name in a.saved for a in experts):  # a trained head
                deltas = [a.saved[name].float() - base32 if name in a.saved
                          else torch.zeros_like(base32) for a in experts]  # fmt: skip
                return regmean(deltas, [s.gram(name) for s in statistics], weights=weights,
                               alpha=alpha)  # fmt: skip
            elif not lora:
                deltas = []
                for e in experts:
                    t = e.read(name)
                    check_finite(t, name, f"expert {e.label}")
                    deltas.append(t.float().sub_(base32))
                return regmean(deltas, [s.gram(name) for s in statistics], weights=weights,
                               alpha=alpha)  # fmt: skip
        return None

    return merged


def stream_merge(
    base: ModelFiles,
    merged_delta: TensorMerge,
    out_dir,
    *,
    out_dtype: torch.dtype | None = None,
    shard_bytes: int = 2 * 10**9,
    progress: bool = True,
    inputs: Sequence[ModelFiles] = (),
) -> dict[str, int]:
    """Write θ₀ + τ for every base tensor to sharded safetensors in `out_dir`.

    While one tensor is merged, the next one is read from the base and from `inputs` (the
    experts that `merged_delta` reads) and the previous one is written, in background threads.
    """
    plan = []
    for name, info in base.tensors.items():
        floating = info.dtype.is_floating_point
        plan.append(
            (name, out_dtype if out_dtype is not None and floating else info.dtype, info.shape)
        )
    writer = ShardedWriter(out_dir, plan, shard_bytes)
    try:
        merged, copied = _stream(base, merged_delta, plan, writer, progress, inputs)
    except BaseException:
        writer.abort()
        raise
    writer.close()
    return {"tensors_merged": merged, "tensors_copied": copied, "shards": len(writer.names)}


def _stream(base, merged_delta, plan, writer, progress, inputs) -> tuple[int, int]:
    merged = copied = 0
    with (
        ThreadPoolExecutor(1, thread_name_prefix="langmerge-write") as write_pool,
        progress_bar("merging", len(plan), progress) as step,
    ):
        written = None
        for i, (name, dtype, _) in enumerate(plan):
            step(name)
            if i + 1 < len(plan):
                following = plan[i + 1][0]
                base.prefetch(following)
                if base.tensors[following].dtype.is_floating_point:  # experts are read too
                    for files in inputs:
                        files.prefetch(following)
            theta = base.read(name)
            delta = None
            if theta.is_floating_point():
                check_finite(theta, name, f"base model {base.label}")
                base32 = theta if theta.dtype == torch.float32 else theta.float()
                delta = merged_delta(name, base32)
            if delta is None:
                out = theta.to(dtype)
                copied += 1
            else:
                out = base32.add_(delta).to(dtype)  # base32 is a fresh tensor owned here
                check_finite(out, name, "the merged model (overflow?)")
                merged += 1
            if written is not None:
                written.result()  # one write in flight at a time, in plan order
            written = write_pool.submit(writer.write, name, out)
        if written is not None:
            written.result()
    return merged, copied
