"""Benchmark: merging five LoRA adapters into one adapter, langmerge vs PEFT.

What it measures (one run, side by side): five rank-64 LoRA adapters on every linear module
(q, k, v, o, gate, up, down) at Llama-3.2-1B shapes (hidden 2048, intermediate 8192, 32 heads,
8 kv heads, so k/v out 512), random factors (A ~ randn/sqrt(in), B ~ 0.01·randn, lora_alpha = r,
so scaling 1; fixed seed), merged into ONE adapter by

- langmerge `merge_lora_factored` with `ties` and `knots_ties` (density 1.0), at its default rank
  (sum of input ranks, 320) and at rank 64; the loop over all modules is timed;
- PEFT `add_weighted_adapter` with `ties_svd` and `dare_ties_svd` (density 1.0: at 1.0 PEFT's DARE
  prunes nothing, so `dare_ties_svd` does the same arithmetic as `ties_svd`) at its default
  svd_rank (64), and `ties_svd` at svd_rank 320; only the add_weighted_adapter call is timed.

Reconstruction error, per module ||ΔW − B@A||_F / ||ΔW||_F, aggregated over modules as
sqrt(Σ ||ΔW − B@A||²) / sqrt(Σ ||ΔW||²). For `ties` / `*ties_svd`, ΔW is PEFT's own dense merge
(`peft.utils.merge_utils.ties` on its `get_delta_weight` tensors), which at density 1 and equal
weights is also langmerge's `ties`; the same reference is used for both tools. For `knots_ties`, ΔW
is the exact KnOTS merge: the error is langmerge's reported `rel_error`, weighted by ||B@A|| of the
exact (rank-320) result, and it is cross-checked against a dense float64 KnOTS reference on the
smaller modules of layer 0 (KnOTS-TIES is ill-conditioned: the vote on singular vectors of close
singular values moves by ~1e-3 under 1e-7 input noise, so expect agreement to ~1e-3 in float32).
Wall and process CPU time are both recorded; the machine should be otherwise idle.

PEFT's SVD path is slow (full SVD per module), so the model has `--layers N` decoder layers
(default 2). Per-layer and per-module-type timings are reported; figures for the full 16 layers are
extrapolated linearly (all layers have the same shapes) unless run with `--layers 16`.

Run:  .venv/bin/python bench/merge_lora.py            (default, ~4–6 min on 2 cores, ~3.5 GB)
      .venv/bin/python bench/merge_lora.py --quick    (tiny shapes, seconds)
      .venv/bin/python bench/merge_lora.py --layers 16  (about 30 min)
Writes bench/results/merge_lora.json (merge_lora_quick.json with --quick).

Goals: PEFT time / langmerge time ≥ 10 for `ties` at equal or lower reconstruction error;
`knots_ties` exact at the default rank (rel_error ≈ 0).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import sys
import time
import warnings
from pathlib import Path

import torch

MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
N_ADAPTERS = 5
FULL_LAYERS = 16
SEED = 0
# Dense KnOTS cross-check only on layer-0 modules whose concatenation [ΔW_1 … ΔW_5] is this small.
CHECK_MAX_NUMEL = 2048 * 2048 * N_ADAPTERS
ERR_TOL = 1e-3  # errors within 0.1% (relative) count as equal for the goal

FULL = {"hidden": 2048, "intermediate": 8192, "heads": 32, "kv_heads": 8, "rank": 64}
QUICK = {"hidden": 64, "intermediate": 256, "heads": 4, "kv_heads": 2, "rank": 4}


def build_peft_model(shape: dict, layers: int) -> torch.nn.Module:
    """Llama model (base weights left uninitialised) holding five adapters with random factors."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=shape["hidden"],
        intermediate_size=shape["intermediate"],
        num_attention_heads=shape["heads"],
        num_key_value_heads=shape["kv_heads"],
        head_dim=shape["hidden"] // shape["heads"],
        num_hidden_layers=layers,
        vocab_size=256,  # embeddings are not adapted; a small vocabulary saves memory
        tie_word_embeddings=True,
    )
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model = model.to_empty(device="cpu")  # untouched pages: no RSS for the 1B base weights
    r = shape["rank"]
    lora = LoraConfig(r=r, lora_alpha=r, lora_dropout=0.0, target_modules=list(MODULES))
    peft_model = get_peft_model(model, lora, adapter_name="e0")
    for i in range(1, N_ADAPTERS):
        peft_model.add_adapter(f"e{i}", lora)
    gen = torch.Generator().manual_seed(SEED)
    with torch.no_grad():
        for name, mod in lora_modules(peft_model).items():
            layer = int(name.split(".")[2])
            kind = MODULES.index(name.rsplit(".", 1)[1])
            for i in range(N_ADAPTERS):
                gen.manual_seed(SEED + (layer * len(MODULES) + kind) * N_ADAPTERS + i)
                a, b = mod.lora_A[f"e{i}"].weight, mod.lora_B[f"e{i}"].weight
                a.copy_(torch.randn(a.shape, generator=gen) / math.sqrt(a.shape[1]))
                b.copy_(torch.randn(b.shape, generator=gen) * 0.01)
    return peft_model


def lora_modules(peft_model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Adapted modules by their name in the base model ("model.layers.0.self_attn.q_proj")."""
    from peft.tuners.lora import LoraLayer

    prefix = "base_model.model."
    return {
        n.removeprefix(prefix): m
        for n, m in peft_model.named_modules()
        if isinstance(m, LoraLayer) and n.rsplit(".", 1)[1] in MODULES
    }


def peak_rss_gib() -> float:
    """Peak resident memory of this process so far."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def kind_of(name: str) -> str:
    return name.rsplit(".", 1)[1]


def per_kind(times: dict[str, float], layers: int) -> dict[str, float]:
    """Mean seconds per layer for each module type."""
    out = dict.fromkeys(MODULES, 0.0)
    for name, t in times.items():
        out[kind_of(name)] += t / layers
    return out


def run_peft(peft_model: torch.nn.Module, combination: str, svd_rank: int | None) -> dict:
    """Time one add_weighted_adapter call; record per-module time of PEFT's merge + SVD step."""
    lora_model = peft_model.base_model
    names = {id(m): n for n, m in lora_modules(peft_model).items()}
    inner = lora_model._svd_generalized_task_arithmetic_weighted_adapter
    times: dict[str, float] = {}

    def timed(*args, **kwargs):
        t0 = time.perf_counter()
        out = inner(*args, **kwargs)
        times[names[id(args[4])]] = time.perf_counter() - t0
        return out

    lora_model._svd_generalized_task_arithmetic_weighted_adapter = timed
    adapter = f"{combination}_{svd_rank or 'default'}"
    try:
        t0, c0 = time.perf_counter(), time.process_time()
        lora_model.add_weighted_adapter(
            [f"e{i}" for i in range(N_ADAPTERS)],
            [1.0] * N_ADAPTERS,
            adapter,
            combination_type=combination,
            svd_rank=svd_rank,
            density=1.0,
        )
        total, cpu = time.perf_counter() - t0, time.process_time() - c0
    finally:
        del lora_model._svd_generalized_task_arithmetic_weighted_adapter
    # PEFT's lora_A is a view of the SVD's full Vh (in×in with full_matrices=True), which keeps
    # that whole storage alive; measure it, then copy so that later passes fit in memory.
    held = 0
    for mod in lora_modules(peft_model).values():
        for p in (mod.lora_A[adapter].weight, mod.lora_B[adapter].weight):
            held += p.untyped_storage().nbytes() - p.numel() * p.element_size()
            p.data = p.data.clone()
    rank = next(iter(lora_modules(peft_model).values())).lora_A[adapter].weight.shape[0]
    return {
        "adapter": adapter,
        "rank": rank,
        "seconds": total,
        "cpu_seconds": cpu,
        "module_seconds": times,
        "extra_storage_held_gib": held / 2**30,
    }


def run_langmerge(
    factors: dict[str, list[tuple[torch.Tensor, torch.Tensor]]],
    scaling: float,
    method: str,
    rank: int | None,
) -> dict:
    """Time merge_lora_factored over all modules; keep the merged factors and reported errors."""
    from langmerge.merge import merge_lora_factored

    times, results = {}, {}
    t_all, c_all = time.perf_counter(), time.process_time()
    for name, pairs in factors.items():
        t0 = time.perf_counter()
        res = merge_lora_factored(
            method,
            pairs,
            scalings=[scaling] * len(pairs),
            weights=[1.0] * len(pairs),
            density=1.0,
            lam=1.0,
            seed=0,
            name=name,
            rank=rank,
        )
        times[name] = time.perf_counter() - t0
        results[name] = res
    total, cpu = time.perf_counter() - t_all, time.process_time() - c_all
    rank_out = next(iter(results.values())).B.shape[1]
    return {
        "rank": rank_out,
        "seconds": total,
        "cpu_seconds": cpu,
        "module_seconds": times,
        "results": results,
    }


def knots_ties_dense(deltas: list[torch.Tensor], rank: int) -> torch.Tensor:
    """Reference KnOTS-TIES (density 1, equal weights) from the dense concatenation, in float64.

    U and Σ come from the eigendecomposition of C·Cᵀ (C = [ΔW₁ … ΔWₙ]), Vᵀ = Σ⁻¹·Uᵀ·C: cheaper
    than an SVD of C, and float64 keeps the ties vote on the Vᵢᵀ blocks stable (in float32 the
    singular vectors of close singular values rotate enough to move the result by ~1e-2).
    """
    from peft.utils import merge_utils

    c = torch.cat(deltas, dim=1).double()
    k = min(rank, c.shape[0])
    evals, evecs = torch.linalg.eigh(c @ c.T)
    u, s = evecs[:, -k:].flip(1), evals[-k:].flip(0).clamp_min(0).sqrt()
    vh = (u.T @ c) / s[:, None]
    blocks = vh.reshape(k, len(deltas), -1).unbind(1)
    merged = merge_utils.ties(list(blocks), torch.ones(len(deltas), dtype=c.dtype), 1.0)
    return ((u * s) @ merged).float()


def aggregate(num2: dict[str, float], den2: dict[str, float]) -> dict:
    """Overall and per-type relative error from per-module squared error and squared norm."""
    out = {"all": math.sqrt(sum(num2.values()) / sum(den2.values()))}
    for k in MODULES:
        names = [n for n in num2 if kind_of(n) == k]
        out[k] = math.sqrt(sum(num2[n] for n in names) / sum(den2[n] for n in names))
    return out


def machine_info(threads: int) -> dict:
    import peft
    import transformers

    cpu = ""
    with open("/proc/cpuinfo") as f:
        cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
    with open("/proc/meminfo") as f:
        mem_kb = int(next(ln.split()[1] for ln in f if ln.startswith("MemTotal")))
    return {
        "platform": platform.platform(),
        "cpu": cpu,
        "cpus_usable": len(os.sched_getaffinity(0)),
        "ram_gib": round(mem_kb / 2**20, 1),
        "torch_threads": threads,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "peft": peft.__version__,
        "transformers": transformers.__version__,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=2, help="decoder layers (16 = full model)")
    ap.add_argument("--quick", action="store_true", help="tiny shapes, smoke run in seconds")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--out", type=Path, default=None, help="JSON path")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message="The density .* no pruning")
    warnings.filterwarnings("ignore", category=FutureWarning)
    torch.set_grad_enabled(False)
    shape = QUICK if args.quick else FULL
    r, layers = shape["rank"], args.layers
    out_path = args.out or Path(__file__).parent / "results" / (
        "merge_lora_quick.json" if args.quick else "merge_lora.json"
    )

    load_start = os.getloadavg()
    t0 = time.perf_counter()
    peft_model = build_peft_model(shape, layers)
    mods = lora_modules(peft_model)
    factors = {
        n: [(m.lora_B[f"e{i}"].weight, m.lora_A[f"e{i}"].weight) for i in range(N_ADAPTERS)]
        for n, m in mods.items()
    }
    scaling = float(mods[next(iter(mods))].scaling["e0"])
    print(
        f"built {layers} layers x {len(MODULES)} modules x {N_ADAPTERS} adapters "
        f"(rank {r}) in {time.perf_counter() - t0:.1f} s (peak RSS {peak_rss_gib():.2f} GiB)",
        flush=True,
    )

    # Warm-up (LAPACK / allocator first-use costs) on a tiny problem, for both tools alike.
    from langmerge.merge import merge_lora_factored

    torch.linalg.svd(torch.randn(64, 64))
    small = [(torch.randn(16, 4) * 0.01, torch.randn(4, 32)) for _ in range(N_ADAPTERS)]
    for method in ("ties", "knots_ties"):
        merge_lora_factored(
            method,
            small,
            scalings=[1.0] * N_ADAPTERS,
            weights=[1.0] * N_ADAPTERS,
            density=1.0,
            lam=1.0,
            seed=0,
            name="warmup",
            rank=None,
        )

    runs: dict[str, dict] = {}
    for method in ("ties", "knots_ties"):
        for rank in (None, r):
            key = f"langmerge {method} r={rank or r * N_ADAPTERS}"
            runs[key] = run_langmerge(factors, scaling, method, rank)
            runs[key]["peak_rss_gib_after"] = peak_rss_gib()
            print(
                f"{key}: {runs[key]['seconds']:.2f} s (peak RSS {peak_rss_gib():.2f} GiB)",
                flush=True,
            )
    for combination, svd_rank in (("ties_svd", None), ("dare_ties_svd", None), ("ties_svd", r * 5)):
        key = f"peft {combination} r={svd_rank or r}"
        runs[key] = run_peft(peft_model, combination, svd_rank)
        runs[key]["peak_rss_gib_after"] = peak_rss_gib()
        print(
            f"{key}: {runs[key]['seconds']:.2f} s (peak RSS {peak_rss_gib():.2f} GiB; the merged "
            f"adapter held {runs[key]['extra_storage_held_gib']:.2f} GiB of SVD storage)",
            flush=True,
        )

    # Errors (not timed): one dense reference per module, shared by all ties-based contenders.
    from peft.utils import merge_utils

    print("computing reconstruction errors ...", flush=True)
    num2: dict[str, dict[str, float]] = {k: {} for k in runs}
    den2: dict[str, dict[str, float]] = {k: {} for k in runs}
    reported2: dict[str, dict[str, float]] = {k: {} for k in runs if k.startswith("langmerge")}
    checks = []
    knots_exact = f"langmerge knots_ties r={r * N_ADAPTERS}"
    for name, mod in mods.items():
        deltas = [mod.get_delta_weight(f"e{i}") for i in range(N_ADAPTERS)]
        ref = merge_utils.ties(deltas, torch.ones(N_ADAPTERS), 1.0)
        ref2 = ref.square().sum().item()
        exact = runs[knots_exact]["results"][name]
        knots_norm2 = (exact.B @ exact.A).square().sum().item()
        dense_knots = None
        if name.startswith("model.layers.0.") and ref.numel() * N_ADAPTERS <= CHECK_MAX_NUMEL:
            dense_knots = knots_ties_dense(deltas, r * N_ADAPTERS)
        for key, run in runs.items():
            if key.startswith("peft"):
                ba = mod.get_delta_weight(run["adapter"])
                num2[key][name] = torch.dist(ref, ba).square().item()
                den2[key][name] = ref2
                continue
            res = run["results"][name]
            rel = float(res.rel_error)
            if "knots" in key:
                num2[key][name] = rel**2 * knots_norm2
                den2[key][name] = knots_norm2
                if dense_knots is not None:
                    own = (torch.dist(dense_knots, res.B @ res.A) / dense_knots.norm()).item()
                    checks.append(
                        {
                            "module": name,
                            "run": key,
                            "rel_error_reported": rel,
                            "rel_error_vs_dense_knots": own,
                            "rank": res.B.shape[1],
                        }
                    )
            else:
                num2[key][name] = torch.dist(ref, res.B @ res.A).square().item()
                den2[key][name] = ref2
            reported2[key][name] = rel**2 * den2[key][name]

    scale = FULL_LAYERS / layers
    extrap = "measured" if layers == FULL_LAYERS else "extrapolated"
    table = {}
    for key, run in runs.items():
        table[key] = {
            "rank": run["rank"],
            "seconds": run["seconds"],
            "cpu_seconds": run["cpu_seconds"],
            f"seconds_{FULL_LAYERS}_layers": run["seconds"] * scale,
            f"seconds_{FULL_LAYERS}_layers_is": extrap,
            "seconds_per_layer_by_module": per_kind(run["module_seconds"], layers),
            "rel_error": aggregate(num2[key], den2[key]),
            "peak_rss_gib_after": run["peak_rss_gib_after"],
        }
        if "extra_storage_held_gib" in run:
            table[key]["extra_storage_held_gib"] = run["extra_storage_held_gib"]
        if key in reported2:
            table[key]["rel_error_reported_by_langmerge"] = aggregate(reported2[key], den2[key])[
                "all"
            ]

    def ratio(peft_key: str, lm_key: str) -> dict:
        p, q = table[peft_key], table[lm_key]
        return {
            "peft": peft_key,
            "langmerge": lm_key,
            "time_ratio": p["seconds"] / q["seconds"],
            "cpu_time_ratio": p["cpu_seconds"] / q["cpu_seconds"],
            "peft_rel_error": p["rel_error"]["all"],
            "langmerge_rel_error": q["rel_error"]["all"],
            "error_excess_pct": 100 * (q["rel_error"]["all"] / p["rel_error"]["all"] - 1)
            if p["rel_error"]["all"]
            else None,
            # "equal" error: within ERR_TOL (relative); the randomized SVD is near, not at, optimal
            "goal_met": p["seconds"] / q["seconds"] >= 10
            and q["rel_error"]["all"] <= p["rel_error"]["all"] * (1 + ERR_TOL),
        }

    big, small_r = r * N_ADAPTERS, r
    ratios = [
        ratio(f"peft ties_svd r={small_r}", f"langmerge ties r={big}"),
        ratio(f"peft ties_svd r={small_r}", f"langmerge ties r={small_r}"),
        ratio(f"peft ties_svd r={big}", f"langmerge ties r={big}"),
        ratio(f"peft ties_svd r={small_r}", f"langmerge knots_ties r={big}"),
        ratio(f"peft ties_svd r={small_r}", f"langmerge knots_ties r={small_r}"),
    ]

    print(f"\n{layers} layer(s); '{FULL_LAYERS} layers' column is {extrap}.")
    print(
        f"{'contender':<32}{'rank':>6}{'time s':>10}{'cpu s':>10}{'16 layers s':>13}{'rel err':>11}"
    )
    for key, row in table.items():
        print(
            f"{key:<32}{row['rank']:>6}{row['seconds']:>10.2f}{row['cpu_seconds']:>10.2f}"
            f"{row[f'seconds_{FULL_LAYERS}_layers']:>13.1f}{row['rel_error']['all']:>11.2e}"
        )
    print("\nseconds per layer by module type")
    print(f"{'contender':<32}" + "".join(f"{k.removesuffix('_proj'):>8}" for k in MODULES))
    for key, row in table.items():
        by = row["seconds_per_layer_by_module"]
        print(f"{key:<32}" + "".join(f"{by[k]:>8.3f}" for k in MODULES))
    print(
        f"\nratios PEFT / langmerge (wall time, and CPU time); goal: >= 10x at an error no more "
        f"than {ERR_TOL:.1%} above PEFT's"
    )
    for q in ratios:
        print(
            f"{q['peft']:<22} / {q['langmerge']:<28} {q['time_ratio']:>6.1f}x "
            f"(cpu {q['cpu_time_ratio']:>5.1f}x)   err "
            f"{q['peft_rel_error']:.4f} vs {q['langmerge_rel_error']:.4f}"
            f" ({q['error_excess_pct']:+.3f}%)   goal {'met' if q['goal_met'] else 'NOT met'}"
        )
    if checks:
        exact = max(c["rel_error_vs_dense_knots"] for c in checks if c["run"] == knots_exact)
        gap = max(abs(c["rel_error_vs_dense_knots"] - c["rel_error_reported"]) for c in checks)
        print(
            f"\nknots_ties vs a dense KnOTS reference on {len(checks) // 2} layer-0 modules: "
            f"worst rel error at rank {r * N_ADAPTERS} {exact:.2e}; worst |measured - reported "
            f"rel_error| {gap:.2e}"
        )
    peak_gib = peak_rss_gib()
    print(f"peak RSS {peak_gib:.2f} GiB")

    out_path.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "benchmark": "merge five LoRA adapters into one adapter: langmerge vs PEFT",
        "machine": machine_info(torch.get_num_threads()),
        "setup": {
            "shapes": shape,
            "layers": layers,
            "full_layers": FULL_LAYERS,
            "adapters": N_ADAPTERS,
            "lora_alpha": r,
            "scaling": scaling,
            "modules": list(MODULES),
            "density": 1.0,
            "weights": [1.0] * N_ADAPTERS,
            "seed": SEED,
            "init": "A ~ randn/sqrt(in), B ~ 0.01*randn",
            "note": "dare_ties_svd at density 1.0 prunes nothing (same arithmetic as ties_svd). "
            "PEFT time is the whole add_weighted_adapter call; its per-module figures cover "
            "get_delta_weight + merge + SVD only. Errors of ties contenders are against PEFT's "
            "dense ties merge; knots_ties errors are langmerge's rel_error weighted by ||B@A|| "
            "of the exact rank-320 result. PEFT's merged lora_A is a view of the SVD's full Vh, "
            "which keeps that storage alive (extra_storage_held_gib); the bench copies it after "
            "the timed call so the passes fit in memory.",
        },
        "results": table,
        "ratios": ratios,
        "knots_dense_checks": checks,
        "peak_rss_gib": peak_gib,
        "loadavg_1_5_15min": {"start": load_start, "end": os.getloadavg()},
    }
    out_path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out_path}")


if __name__ == "__main__":
    main()
