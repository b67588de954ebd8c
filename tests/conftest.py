"""Tiny models built from a config (no network): a base, full fine-tunes and LoRA experts."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# the embedded backbone's cache: per test session, not the user's ~/.cache
os.environ.setdefault("LANGMERGE_CACHE", __import__("tempfile").mkdtemp(prefix="langmerge-cache-"))

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

LANGS = ["en", "de", "fr"]


def tiny_config():
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=100,
    )


def make_lora_expert(base_dir: Path, out: Path, seed: int, r: int = 4, alpha: int = 8, **kw):
    """A PEFT adapter with random A and B (as after training) and a trained lm_head."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        init_lora_weights=False,
        target_modules=kw.pop("target_modules", ["q_proj", "v_proj", "down_proj"]),
        modules_to_save=kw.pop("modules_to_save", ["lm_head"]),
        **kw,
    )
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "modules_to_save" in name:
                p.add_(0.05 * torch.randn_like(p))
    peft_model.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def models(tmp_path_factory) -> dict[str, Path]:
    """base/, full_{en,de,fr}/ (base + noise), lora_{en,de,fr}/ (PEFT adapters training
    lm_head too) and plain_{en,de,fr}/ (LoRA only)."""
    from transformers import LlamaForCausalLM

    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    base = LlamaForCausalLM(tiny_config())
    base.save_pretrained(root / "base")
    paths = {"base": root / "base"}
    for i, lang in enumerate(LANGS):
        torch.manual_seed(100 + i)
        expert = LlamaForCausalLM(tiny_config())
        expert.load_state_dict(base.state_dict())
        with torch.no_grad():
            for p in expert.parameters():
                p.add_(0.02 * torch.randn_like(p))
        expert.save_pretrained(root / f"full_{lang}")
        paths[f"full_{lang}"] = root / f"full_{lang}"
        paths[f"lora_{lang}"] = make_lora_expert(root / "base", root / f"lora_{lang}", 200 + i)
        # PEFT's add_weighted_adapter refuses adapters with modules_to_save: these have none
        paths[f"plain_{lang}"] = make_lora_expert(
            root / "base", root / f"plain_{lang}", 300 + i, modules_to_save=None
        )
    return paths


@pytest.fixture
def cli(capsys):
    """Run `langmerge ARGS` in-process; returns (exit code, everything it printed)."""
    from langmerge.cli import main

    def run(*args: object) -> tuple[int, str]:
        argv = [str(a) for a in args]
        if argv and argv[0] == "merge":
            argv.append("--quiet")
        try:
            main(argv)
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        captured = capsys.readouterr()
        return code, captured.out + captured.err

    return run


def peft_weighted_merge(base_dir, adapter_dirs, weights, combination, density=None):
    """PEFT's own add_weighted_adapter over `adapter_dirs` (named en, de, …): the reference."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    names = LANGS[: len(adapter_dirs)]
    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base_dir), adapter_dirs[0], adapter_name=names[0]
    )
    for name, path in zip(names[1:], adapter_dirs[1:]):
        model.load_adapter(path, adapter_name=name)
    model.add_weighted_adapter(
        names, list(weights), "merged", combination_type=combination, density=density
    )
    return model


def merge_args(method, base, experts, out, *extra):
    """The arguments of `langmerge merge --method M --base B --experts E… -o OUT …`."""
    return ("merge", "--method", method, "--base", base, "--experts", *experts, "-o", out, *extra)
