"""Input statistics of LoRA experts (tiny Llama models) and regmean merges that use them."""

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file

from langmerge.merge.io import Statistics, load_adapter
from langmerge.merge.regmean import regmean, regmean_lora
from langmerge.train.statistics import collect

PAD = 0


def peft_model(models, lang):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(models["base"])
    return PeftModel.from_pretrained(base, models[f"lora_{lang}"])


def batch(*sequences):
    """Right-padded input ids with their attention mask."""
    width = max(len(s) for s in sequences)
    ids = torch.tensor([s + [PAD] * (width - len(s)) for s in sequences])
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in sequences])
    return {"input_ids": ids, "attention_mask": mask}


SEQUENCES = [[5, 17, 23, 42, 8, 9], [11, 3, 7], [60, 61, 2, 4]]


def collected(models, lang, out, batches):
    summary = collect(peft_model(models, lang), lambda: batches, out)
    return summary, Statistics(out, lang)


def test_statistics_leave_padding_out_and_share_one_matrix_per_input(models, tmp_path):
    together, stats = collected(models, "en", tmp_path / "one", [batch(*SEQUENCES)])
    apart, each = collected(models, "en", tmp_path / "each", [batch(s) for s in SEQUENCES])
    tokens = sum(len(s) for s in SEQUENCES)
    assert together.tokens == apart.tokens == tokens
    meta = json.loads((tmp_path / "one" / "statistics.json").read_text())
    # q_proj and v_proj read the same normed hidden states: one matrix serves both
    assert meta["aliases"]["model.layers.0.self_attn.v_proj.weight"] == (
        "model.layers.0.self_attn.q_proj.weight"
    )
    assert meta["rows"]["lm_head.weight"] == tokens  # the trained head is collected too
    assert together.matrices == 2 * 2 + 1  # per layer: q/v input, down_proj input; lm_head
    for name in ["model.layers.1.mlp.down_proj.weight", "model.layers.0.self_attn.v_proj.weight"]:
        torch.testing.assert_close(stats.gram(name), each.gram(name), rtol=1e-4, atol=1e-4)
        assert stats.gram(name).shape[0] in (32, 64)


def test_statistics_in_several_passes_equal_one_pass(models, tmp_path):
    batches = [batch(*SEQUENCES)]
    one = collect(peft_model(models, "de"), lambda: batches, tmp_path / "one")
    many = collect(peft_model(models, "de"), lambda: batches, tmp_path / "many", budget=1)
    assert (one.passes, many.passes) == (1, one.matrices)
    a, b = Statistics(tmp_path / "one"), Statistics(tmp_path / "many")
    for name in a.rows:
        torch.testing.assert_close(a.gram(name), b.gram(name))


@pytest.fixture(scope="module")
def statistics(models, tmp_path_factory):
    root = tmp_path_factory.mktemp("statistics")
    data = {"en": [batch(*SEQUENCES)], "de": [batch([1, 2, 3, 4, 5]), batch([9, 8, 7])]}
    for lang, batches in data.items():
        collect(peft_model(models, lang), lambda b=batches: b, root / lang)
    return root


def write_config(path, models, statistics, langs, **extra):
    config = {
        "method": "regmean",
        "base": str(models["base"]),
        "experts": [
            {"path": str(models[f"lora_{x}"]), "statistics": str(statistics / x)} for x in langs
        ],
        **extra,
    }
    path.write_text(yaml.safe_dump(config))
    return path


def merged_weights(path):
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def test_regmean_merge_of_lora_experts_is_the_factored_closed_form(
    models, statistics, tmp_path, cli
):
    cfg = write_config(tmp_path / "merge.yaml", models, statistics, ["en", "de"], alpha=0.8)
    code, text = cli("merge", cfg, "-o", tmp_path / "out")
    assert code == 0, text
    assert "by regmean" in text
    merged, base = merged_weights(tmp_path / "out"), merged_weights(models["base"])
    adapters = [load_adapter(models[f"lora_{x}"]) for x in ("en", "de")]
    stats = [Statistics(statistics / x) for x in ("en", "de")]
    name = "model.layers.1.self_attn.q_proj.weight"
    mods = [a.modules[name] for a in adapters]
    b, a = regmean_lora([(m.B, m.A) for m in mods], [m.scaling for m in mods],
                        [s.gram(name) for s in stats], alpha=0.8)  # fmt: skip
    torch.testing.assert_close(merged[name], base[name] + b @ a, rtol=1e-4, atol=1e-5)
    head = "lm_head.weight"  # trained in full: regmean on its own input statistics
    deltas = [x.saved[head] - base[head] for x in adapters]
    want = base[head] + regmean(deltas, [s.gram(head) for s in stats], alpha=0.8)
    torch.testing.assert_close(merged[head], want, rtol=1e-4, atol=1e-5)
    summary = json.loads((tmp_path / "out" / "langmerge_merge.json").read_text())
    assert summary["data_aware"]["tensors"] == 2 * 3 + 1  # q, v, down_proj per layer; the head
    for n in base:  # the tensors no expert changes stay the base's
        if n not in (head,) and not any(n in x.modules for x in adapters):
            assert torch.equal(merged[n], base[n]), n


def test_regmean_of_one_expert_is_that_expert(models, statistics, tmp_path, cli):
    cfg = write_config(tmp_path / "merge.yaml", models, statistics, ["en"])
    code, text = cli("merge", cfg, "-o", tmp_path / "out")
    assert code == 0, text
    want = peft_model(models, "en").merge_and_unload().state_dict()
    for name, tensor in merged_weights(tmp_path / "out").items():
        torch.testing.assert_close(tensor, want[name], rtol=1e-4, atol=1e-5)


def test_regmean_adapter_output_is_exact(models, statistics, tmp_path, cli):
    cfg = write_config(tmp_path / "merge.yaml", models, statistics, ["en", "de"], emit="both")
    code, text = cli("merge", cfg, "-o", tmp_path / "out")
    assert code == 0, text
    assert "exact" in text
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(models["base"]), tmp_path / "out" / "adapter"
    ).merge_and_unload()
    full = merged_weights(tmp_path / "out")
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(tensor, full[name], rtol=1e-4, atol=1e-5, msg=name)


def test_regmean_without_statistics_says_what_to_give(models, tmp_path, cli):
    code, text = cli("merge", "--method", "regmean", "--base", models["base"],
                     "--experts", models["lora_en"], "-o", tmp_path / "out")  # fmt: skip
    assert code != 0
    assert "needs each expert's input statistics" in text and "lora_en" in text
    assert not (tmp_path / "out").exists()
