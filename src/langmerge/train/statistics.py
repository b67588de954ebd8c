"""Input statistics of a trained model's linear modules, for data-aware merging (RegMean).

For every linear module a model changes, the mean Gram matrix of its inputs over a data set,
Ḡ = XᵀX / N (in × in, N the rows of X: real tokens, or pooled examples for a head), collected in
forward passes with hooks. Modules fed the very same input (query/key/value, gate/up) share one
matrix. The matrices are written as safetensors shards in a folder next to the expert they
describe, with `statistics.json` (tokens per module, aliases, dtype, size). When all matrices do
not fit the memory budget at once, the data is passed through again for each group of modules.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from langmerge.data.batching import PadToLongest
from langmerge.errors import InputError
from langmerge.files import atomic_output_dir, write_json
from langmerge.merge.io import STATISTICS_META
from langmerge.merge.writer import ShardedWriter

FOLDER = "statistics"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
BUDGET = 8 * 2**30  # bytes of float32 Gram matrices held at once while collecting


def adapted_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """The linear modules whose weights the trained model changes, by base weight name: the
    LoRA-adapted and fully trained (modules_to_save) ones of a PEFT model; every linear module
    of a plain model."""
    peft = hasattr(model, "peft_config")
    found: dict[str, nn.Linear] = {}
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        name = name.removeprefix("base_model.model.")
        if peft:
            if name.endswith(".base_layer"):
                name = name.removesuffix(".base_layer")
            elif name.endswith(".modules_to_save.default"):
                name = name.removesuffix(".modules_to_save.default")
            else:
                continue  # lora_A/lora_B themselves, frozen layers, original_module copies
        found[f"{name}.weight"] = module
    return found


def _rows(x: Tensor, mask: Tensor | None) -> Tensor:
    """The input rows that real tokens produced: padding is left out."""
    x = x.detach()
    if mask is not None and x.dim() == 3 and x.shape[:2] == mask.shape:
        return x[mask.bool()]
    return x.reshape(-1, x.shape[-1])


def _aliases(
    model: nn.Module, modules: dict[str, nn.Linear], batch: dict
) -> tuple[dict[str, str], list[str]]:
    """From one forward pass: name → the first module fed the very same input tensor, and the
    modules that got an input at all."""
    seen: dict[str, Tensor] = {}  # holding each input keeps its memory from being reused
    handles = [
        m.register_forward_pre_hook(lambda _m, args, n=n: seen.setdefault(n, args[0]))
        for n, m in modules.items()
    ]
    try:
        with torch.no_grad():
            model(**batch)
    finally:
        for h in handles:
            h.remove()
    first: dict[int, str] = {}
    out = {}
    for n in modules:
        if n in seen:
            key = id(seen[n])
            if key in first:
                out[n] = first[key]
            else:
                first[key] = n
    return out, list(seen)


def _groups(modules: dict[str, nn.Linear], budget: int) -> list[list[str]]:
    groups: list[list[str]] = [[]]
    size = 0
    for n, m in modules.items():
        nbytes = m.in_features**2 * 4
        if groups[-1] and size + nbytes > budget:
            groups.append([])
            size = 0
        groups[-1].append(n)
        size += nbytes
    return groups


@dataclass
class Collected:
    """What `collect` wrote: modules, distinct matrices, bytes on disk, rows and seconds."""

    modules: int
    matrices: int
    bytes: int
    tokens: int
    passes: int
    seconds: float


def collect(
    model: nn.Module,
    batches: Callable[[], Iterable[dict]],
    out: Path,
    *,
    dtype: str = "float32",
    budget: int = BUDGET,
    force: bool = False,
) -> Collected:
    """Collect the mean input Gram matrix of every adapted linear module of `model` over the
    batches (`batches()` is called once per pass; each batch a dict of model inputs with an
    `attention_mask`), and write them to the folder `out` atomically."""
    start = time.perf_counter()
    store = DTYPES[dtype]
    modules = adapted_linears(model)
    if not modules:
        raise InputError("the model has no trained linear modules to collect statistics for")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()

    def moved(batch: dict) -> dict:
        return {k: v.to(device) for k, v in batch.items() if k != "labels"}

    first = next(iter(batches()), None)
    if first is None:
        raise InputError("no data to collect statistics on")
    aliases, reached = _aliases(model, modules, moved(first))
    distinct = {n: modules[n] for n in modules if n in reached and n not in aliases}
    groups = _groups(distinct, budget)
    plan = [(n, store, (distinct[n].in_features,) * 2) for g in groups for n in g]
    counts: dict[str, int] = {}
    try:
        with atomic_output_dir(out, force) as tmp:
            writer = ShardedWriter(tmp, plan, 2 * 10**9)
            try:
                for group in groups:
                    sums = _one_pass(model, batches, {n: distinct[n] for n in group}, moved,
                                     device, counts)  # fmt: skip
                    for n in group:
                        mean = sums.pop(n).div_(max(counts[n], 1))
                        writer.write(n, mean.to("cpu", store))
            except BaseException:
                writer.abort()
                raise
            writer.close()
            nbytes = sum(p.stat().st_size for p in tmp.glob("*.safetensors"))
            meta = {
                "dtype": dtype,
                "rows": {n: counts[n] for n in distinct},
                "aliases": {n: a for n, a in aliases.items()},
                "bytes": nbytes,
                "passes": len(groups),
            }
            write_json(tmp / STATISTICS_META, meta)
    finally:
        model.train(was_training)
    tokens = max(counts.values(), default=0)
    return Collected(len(modules), len(distinct), nbytes, tokens, len(groups),
                     time.perf_counter() - start)  # fmt: skip


def _one_pass(model, batches, group: dict[str, nn.Linear], moved, device, counts) -> dict:
    sums = {n: torch.zeros(m.in_features, m.in_features, device=device) for n, m in group.items()}
    mask: list[Tensor | None] = [None]

    def hook(name):
        def record(_module, args):
            rows = _rows(args[0], mask[0]).float()
            sums[name].addmm_(rows.T, rows)
            counts[name] = counts.get(name, 0) + rows.shape[0]

        return record

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in group.items()]
    try:
        with torch.no_grad():
            for batch in batches():
                inputs = moved(batch)
                mask[0] = inputs.get("attention_mask")
                model(**inputs)
    finally:
        for h in handles:
            h.remove()
    return sums


def present(folder: Path) -> bool:
    """Whether `folder` holds complete statistics (they are written atomically)."""
    return (Path(folder) / STATISTICS_META).is_file()


def encoded_batches(encoded: list[dict], pad_id: int, size: int) -> Callable[[], Iterator[dict]]:
    """Batches of encoded examples sorted by length (little padding), for `collect`."""
    ordered = sorted(encoded, key=lambda x: len(x["input_ids"]))
    collate = PadToLongest(pad_id)

    def batches() -> Iterator[dict]:
        for i in range(0, len(ordered), size):
            yield collate(ordered[i : i + size])

    return batches


def describe(c: Collected) -> str:
    """'38 matrices for 73 modules, 151.2 MB, 5,120 tokens, 3.1 s'"""
    return (f"{c.matrices} matrices for {c.modules} modules, {c.bytes / 1e6:.1f} MB, "
            f"{c.tokens:,} tokens, {c.seconds:.1f} s")  # fmt: skip
