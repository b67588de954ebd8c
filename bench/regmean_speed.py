"""Benchmark: the cost of data-aware merging at Llama shapes — collecting the input statistics and
a regmean merge of five LoRA experts — against a TIES merge of the same experts, side by side.

What it measures (one run, random weights, fixed seed), per decoder layer of Llama-3.2-1B
(hidden 2048, intermediate 8192, k/v out 512) or Llama-3.1-8B (4096, 14336, 1024), LoRA rank 16
on q, k, v, o, gate, up, down:

- statistics: accumulating XᵀX over `--tokens` input rows for each distinct module input of the
  layer (q/k/v share one, gate/up share one: 4 matrices), as the forward hooks of
  `langmerge.train.statistics.collect` do, and the bytes the layer's matrices take on disk (float32
  and bfloat16). The forward pass itself is not included: it is the same work as evaluating
  the expert on its training data once;
- merge: per module, the dense merged ΔW of regmean (`regmean_lora`, then B·A) and of TIES
  (`merge_lora(..., "ties")`), wall time and the process's peak resident memory.

The model's layers all have the same shapes, so whole-model figures are the per-layer ones
times the layer count (16 or 32); `--layers` measures more layers to check that.

Run:  .venv/bin/python bench/regmean_speed.py --model 1b      (about 2 min on 2 cores)
      .venv/bin/python bench/regmean_speed.py --model 8b      (about 10 min, ~8 GB)
      .venv/bin/python bench/regmean_speed.py --quick         (tiny shapes, seconds)
Writes bench/results/regmean_speed-<model>.json. On a GPU (when one is there) it runs there too.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))

from _common import machine_info  # noqa: E402

from langmerge.merge.lora import merge_lora  # noqa: E402
from langmerge.merge.regmean import regmean_lora  # noqa: E402

SHAPES = {
    "1b": {"hidden": 2048, "intermediate": 8192, "kv": 512, "layers": 16},
    "8b": {"hidden": 4096, "intermediate": 14336, "kv": 1024, "layers": 32},
    "quick": {"hidden": 256, "intermediate": 1024, "kv": 64, "layers": 2},
}


def modules(s: dict) -> dict[str, tuple[int, int, str]]:
    """name → (out, in, the input it reads)."""
    h, i, kv = s["hidden"], s["intermediate"], s["kv"]
    return {
        "q_proj": (h, h, "attn_in"), "k_proj": (kv, h, "attn_in"), "v_proj": (kv, h, "attn_in"),
        "o_proj": (h, h, "o_in"), "gate_proj": (i, h, "mlp_in"), "up_proj": (i, h, "mlp_in"),
        "down_proj": (h, i, "down_in"),
    }  # fmt: skip


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def statistics_cost(s: dict, experts: int, tokens: int, device: str) -> tuple[dict, dict]:
    """Seconds to accumulate each distinct input's Gram matrix (one expert, `tokens` rows, in
    batches of 512 rows), and the experts' Gram matrices for the merge (on the CPU)."""
    inputs = {}
    for _, (_, fan_in, key) in modules(s).items():
        inputs[key] = fan_in
    seconds, grams = {}, {}
    gen = torch.Generator().manual_seed(0)
    for key, fan_in in inputs.items():
        acc = torch.zeros(fan_in, fan_in, device=device)
        sync(device)
        start = time.perf_counter()
        for _ in range(tokens // 512):
            x = torch.randn(512, fan_in, device=device)
            acc.addmm_(x.T, x)
        sync(device)
        seconds[key] = time.perf_counter() - start
        del acc
        # the experts' matrices for the merge: random, positive definite, of this size
        grams[key] = []
        for _ in range(experts):
            x = torch.randn(2 * fan_in, fan_in, generator=gen)
            grams[key].append(x.T @ x / (2 * fan_in))
    return seconds, grams


def merge_cost(s: dict, experts: int, rank: int, grams: dict, device: str) -> dict:
    gen = torch.Generator().manual_seed(1)
    out = {}
    for name, (fan_out, fan_in, key) in modules(s).items():
        factors = [(0.01 * torch.randn(fan_out, rank, generator=gen),
                    torch.randn(rank, fan_in, generator=gen) / fan_in**0.5)
                   for _ in range(experts)]  # fmt: skip
        factors = [(b.to(device), a.to(device)) for b, a in factors]
        g = [x.to(device) for x in grams[key]]
        sync(device)
        start = time.perf_counter()
        b, a = regmean_lora(factors, [1.0] * experts, g)
        delta = b @ a
        sync(device)
        t_regmean = time.perf_counter() - start
        start = time.perf_counter()
        delta = merge_lora("ties", factors, scalings=[1.0] * experts, density=1.0)
        sync(device)
        t_ties = time.perf_counter() - start
        del delta, g
        out[name] = {"regmean_s": t_regmean, "ties_s": t_ties}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=["1b", "8b"], default="1b")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--experts", type=int, default=5)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=8192, help="statistics rows per expert")
    parser.add_argument("--layers", type=int, default=1, help="layers measured")
    args = parser.parse_args()
    name = "quick" if args.quick else args.model
    s = SHAPES[name]
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    results = {}
    for device in devices:
        per_layer = []
        for _ in range(args.layers):
            stats_s, grams = statistics_cost(s, args.experts, args.tokens, device)
            merge = merge_cost(s, args.experts, args.rank, grams, device)
            per_layer.append({"statistics_s": stats_s, "merge": merge})
        layer = per_layer[-1]
        fan_ins = {key: fi for _, (_, fi, key) in modules(s).items()}
        stats_bytes = sum(fi * fi * 4 for fi in fan_ins.values())
        regmean = sum(m["regmean_s"] for m in layer["merge"].values())
        ties = sum(m["ties_s"] for m in layer["merge"].values())
        results[device] = {
            "per_layer": per_layer,
            "layer": {
                "statistics_s_per_expert": sum(layer["statistics_s"].values()),
                "statistics_bytes_float32": stats_bytes,
                "statistics_bytes_bfloat16": stats_bytes // 2,
                "regmean_merge_s": regmean,
                "ties_merge_s": ties,
                "regmean_vs_ties": regmean / ties,
            },
            "model": {
                "layers": s["layers"],
                "statistics_s_per_expert": sum(layer["statistics_s"].values()) * s["layers"],
                "statistics_gb_float32_per_expert": stats_bytes * s["layers"] / 1e9,
                "regmean_merge_s": regmean * s["layers"],
                "ties_merge_s": ties * s["layers"],
            },
            "peak_rss_gb": peak_rss_gb(),
        }
        if device == "cuda":
            results[device]["peak_gpu_gb"] = torch.cuda.max_memory_allocated() / 1e9
        r, lay, mod = results[device], results[device]["layer"], results[device]["model"]
        print(f"{name} on {device}: per layer, statistics {lay['statistics_s_per_expert']:.2f} s "
              f"per expert ({args.tokens} rows), {stats_bytes / 1e6:.0f} MB float32; merge "
              f"regmean {regmean:.2f} s, ties {ties:.2f} s ({regmean / ties:.2f}×); model "
              f"({s['layers']} layers): statistics {mod['statistics_gb_float32_per_expert']:.1f} "
              f"GB per expert, regmean {mod['regmean_merge_s']:.0f} s, ties "
              f"{mod['ties_merge_s']:.0f} s; peak RSS {r['peak_rss_gb']:.1f} GB")  # fmt: skip
    out = HERE / "results" / f"regmean_speed-{name}.json"
    out.write_text(json.dumps({"shape": s, "args": vars(args), "results": results,
                               "machine": machine_info(("torch",))}, indent=1) + "\n")  # fmt: skip
    print(f"written: {out}")


if __name__ == "__main__":
    main()
