"""Merge three small LoRA language experts end to end, and check the result.

Generates a small Llama-shaped base model and three PEFT LoRA "language experts" (random
factors standing in for training, which a later release adds), then merges them with several
methods through the `langmerge merge` command. Each merged model is loaded with transformers and
its logits are compared with the base model plus the merged ΔW applied by hand; each merged
adapter is loaded with PEFT and compared with the merged model.

    python examples/merge_tiny.py [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

LANGS = ["en", "de", "fr"]
METHODS = [("linear", 1.0), ("ties", 1.0), ("ties", 0.5), ("dare_ties", 0.5), ("knots_ties", 1.0)]


def build(workdir: Path) -> None:
    """A small Llama base and three LoRA experts (r=8 on every attention and MLP projection)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        vocab_size=2000,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(workdir / "base")
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    for i, lang in enumerate(LANGS):
        torch.manual_seed(1 + i)
        model = AutoModelForCausalLM.from_pretrained(workdir / "base")
        lora = LoraConfig(r=8, lora_alpha=16, target_modules=targets, init_lora_weights=False)
        get_peft_model(model, lora).save_pretrained(workdir / f"expert_{lang}")


def by_hand(workdir: Path, method: str, density: float):
    """The base model with the merged ΔW of every module added by hand."""
    from transformers import AutoModelForCausalLM

    from langmerge.merge import merge_lora
    from langmerge.merge.io import load_adapter

    model = AutoModelForCausalLM.from_pretrained(workdir / "base")
    adapters = [load_adapter(workdir / f"expert_{lang}") for lang in LANGS]
    state = model.state_dict()
    with torch.no_grad():
        for name in adapters[0].modules:
            mods = [a.modules[name] for a in adapters]
            state[name].add_(
                merge_lora(
                    method,
                    [(m.B, m.A) for m in mods],
                    density=density,
                    scalings=[m.scaling for m in mods],
                    name=name,
                )
            )
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, help="where to write models (default: a temp dir)")
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="langmerge-example-"))
    workdir.mkdir(parents=True, exist_ok=True)
    console = Console()
    console.print(f"building a small base model and {len(LANGS)} LoRA experts in {workdir}")
    build(workdir)

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ids = torch.randint(0, 2000, (2, 16), generator=torch.Generator().manual_seed(0))
    table = Table(
        "method",
        "density",
        "seconds",
        "adapter",
        "merged model vs by hand",
        "adapter vs merged model",
        title="langmerge merge, 3 LoRA experts",
    )
    for method, density in METHODS:
        out = workdir / f"merged_{method}_{density}"
        cmd = [
            sys.executable,
            "-m",
            "langmerge.cli",
            "merge",
            "--method",
            method,
            "--density",
            str(density),
            "--base",
            str(workdir / "base"),
            "--experts",
            *[str(workdir / f"expert_{lang}") for lang in LANGS],
            "-o",
            str(out),
            "--emit",
            "both",
            "--force",
            "--quiet",
        ]
        start = time.perf_counter()
        subprocess.run(cmd, check=True)
        seconds = time.perf_counter() - start
        record = json.loads((out / "langmerge_merge.json").read_text())["adapter"]
        merged = AutoModelForCausalLM.from_pretrained(out)
        adapter = PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(workdir / "base"), out / "adapter"
        )
        with torch.no_grad():
            logits = merged(ids).logits
            hand = (by_hand(workdir, method, density)(ids).logits - logits).abs().max().item()
            via_adapter = (adapter(ids).logits - logits).abs().max().item()
        kind = "exact" if record["exact"] else f"rel. error {record['rel_error']:.3f}"
        table.add_row(
            method,
            f"{density}",
            f"{seconds:.1f}",
            f"r={record['rank']}, {kind}",
            f"max |Δlogit| {hand:.1e}",
            f"max |Δlogit| {via_adapter:.1e}",
        )
    console.print(table)
    console.print(
        "Exact adapters reproduce the merged model to float rounding; truncated ones "
        "differ by their reconstruction error. Outputs are in " + str(workdir)
    )


if __name__ == "__main__":
    main()
