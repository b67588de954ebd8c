"""`langmerge merge` end to end on tiny models: outputs load with transformers and PEFT and
hold exactly the merge that the methods define."""

import json

import pytest
import torch
import yaml
from conftest import merge_args
from safetensors.torch import load_file

from langmerge.merge import merge_deltas, merge_lora
from langmerge.merge.io import load_adapter

EXPERTS = ["en", "de", "fr"]


def weights_of(path):
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def test_full_model_ties_equals_the_method_tensor_by_tensor(models, tmp_path, cli):
    out = tmp_path / "merged"
    code, text = cli(
        *merge_args(
            "ties",
            models["base"],
            [models[f"full_{x}"] for x in EXPERTS],
            out,
            "--density",
            "0.5",
            "--weights",
            "1,0.5,2",
        )
    )
    assert code == 0, text
    merged, base = weights_of(out), weights_of(models["base"])
    experts = [weights_of(models[f"full_{x}"]) for x in EXPERTS]
    assert merged.keys() == base.keys()
    for name, theta0 in base.items():
        tau = merge_deltas(
            "ties", [e[name] - theta0 for e in experts], weights=[1, 0.5, 2], density=0.5
        )
        assert torch.allclose(merged[name], theta0 + tau, atol=1e-7), name
    # a loadable HF directory with the base's config, a model card and the merge record
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out)
    assert (out / "config.json").exists() and "ties" in (out / "README.md").read_text()
    record = json.loads((out / "langmerge_merge.json").read_text())
    assert record["config"]["method"] == "ties" and record["experts_kind"] == "full"


def test_sharded_output_with_index_loads(models, tmp_path, cli):
    config = tmp_path / "merge.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "method": "linear",
                "base": str(models["base"]),
                "shard_size": "20KB",
                "dtype": "bfloat16",
                "experts": [
                    {"path": str(models[f"full_{x}"]), "weight": w}
                    for x, w in zip(EXPERTS, [1, 2, 3])
                ],
            }
        )
    )
    out = tmp_path / "sharded"
    code, text = cli("merge", config, "-o", out)
    assert code == 0, text
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and all((out / s).exists() for s in shards)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    experts = [weights_of(models[f"full_{x}"]) for x in EXPERTS]
    name = "model.layers.1.mlp.up_proj.weight"
    expected = (experts[0][name] + 2 * experts[1][name] + 3 * experts[2][name]) / 6
    got = model.state_dict()[name]
    assert got.dtype == torch.float32  # stored as bfloat16: equal within its rounding
    assert torch.allclose(got, expected, rtol=2**-8, atol=0)


def apply_by_hand(models, method, density=1.0, weights=(1.0, 1.0, 1.0)):
    """The base model with each module's merged ΔW added by hand (and lm_head merged)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(models["base"])
    adapters = [load_adapter(models[f"lora_{x}"]) for x in EXPERTS]
    state = model.state_dict()
    with torch.no_grad():
        for name in adapters[0].modules:
            mods = [a.modules[name] for a in adapters]
            delta = merge_lora(
                method,
                [(m.B, m.A) for m in mods],
                scalings=[m.scaling for m in mods],
                weights=list(weights),
                density=density,
                name=name,
            )
            state[name].add_(delta)
        name = "lm_head.weight"
        base = state[name].clone()
        lm_method = "ties" if method.startswith("knots") else method
        state[name].add_(
            merge_deltas(
                lm_method,
                [a.saved[name] - base for a in adapters],
                weights=list(weights),
                density=density,
                name=name,
            )
        )
    return model


@pytest.mark.parametrize(
    ("method", "density"), [("ties", 1.0), ("knots_ties", 0.5), ("dare_ties", 0.5)]
)
def test_merged_lora_model_gives_base_plus_merged_delta_logits(
    models, tmp_path, cli, method, density
):
    from transformers import AutoModelForCausalLM

    out = tmp_path / method
    code, text = cli(
        *merge_args(
            method,
            models["base"],
            [models[f"lora_{x}"] for x in EXPERTS],
            out,
            "--density",
            density,
        )
    )
    assert code == 0, text
    if method == "knots_ties":  # lm_head is a modules_to_save tensor: no LoRA, so plain ties
        return check_knots_head(models, out, density)
    merged = AutoModelForCausalLM.from_pretrained(out)
    by_hand = apply_by_hand(models, method, density)
    ids = torch.tensor([[1, 5, 17, 42, 99, 3]])
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, by_hand(ids).logits, atol=1e-5)


def check_knots_head(models, out, density):
    adapters = [load_adapter(models[f"lora_{x}"]) for x in EXPERTS]
    base, merged = weights_of(models["base"]), weights_of(out)
    name = "model.layers.0.self_attn.q_proj.weight"
    mods = [a.modules[name] for a in adapters]
    delta = merge_lora(
        "knots_ties",
        [(m.B, m.A) for m in mods],
        scalings=[m.scaling for m in mods],
        density=density,
        name=name,
    )
    assert torch.allclose(merged[name], base[name] + delta, atol=1e-6)


def test_knots_adapter_output_is_exact_and_loads_with_peft(models, tmp_path, cli):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "knots"
    code, text = cli(
        *merge_args(
            "knots_ties",
            models["base"],
            [models[f"lora_{x}"] for x in EXPERTS],
            out,
            "--emit",
            "both",
        )
    )
    assert code == 0, text
    assert "adapter rank 12, exact" in " ".join(text.split())
    full = AutoModelForCausalLM.from_pretrained(out)
    peft = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(models["base"]), out / "adapter"
    )
    ids = torch.tensor([[4, 8, 15, 16, 23, 42]])
    with torch.no_grad():
        assert torch.allclose(full(ids).logits, peft(ids).logits, atol=1e-5)


def test_ties_adapter_output_reports_its_reconstruction_error(models, tmp_path, cli):
    out = tmp_path / "ties_adapter"
    code, text = cli(
        *merge_args(
            "ties",
            models["base"],
            [models[f"lora_{x}"] for x in EXPERTS],
            out,
            "--emit",
            "adapter",
            "--adapter-rank",
            "4",
        )
    )
    assert code == 0, text
    assert "relative reconstruction error" in text
    record = json.loads((out / "langmerge_merge.json").read_text())["adapter"]
    assert record["rank"] == 4 and 0 < record["rel_error"] < 1
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 4


def test_factor_space_adapter_matches_peft(models, tmp_path, cli):
    from conftest import peft_weighted_merge

    out = tmp_path / "factors"
    plain = [models[f"plain_{x}"] for x in EXPERTS]
    code, text = cli(
        *merge_args(
            "ties",
            models["base"],
            plain,
            out,
            "--density",
            "0.5",
            "--space",
            "factors",
            "--emit",
            "adapter",
        )
    )
    assert code == 0, text
    model = peft_weighted_merge(models["base"], plain, [1.0, 1.0, 1.0], "ties", 0.5)
    ours = load_file(out / "adapter_model.safetensors")
    peft_state = {k: v for k, v in model.state_dict().items() if ".merged." in k}
    assert len(peft_state) == len(ours) == 12
    for key, value in peft_state.items():
        ours_key = key.replace(".merged.", ".")
        assert torch.allclose(ours[ours_key], value, atol=1e-6), key


def test_mergekit_yaml_gives_mergekit_semantics(models, tmp_path, cli):
    config = tmp_path / "mergekit.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "merge_method": "dare_ties",
                "base_model": str(models["base"]),
                "dtype": "float32",
                "parameters": {"density": 0.5},
                "models": [{"model": str(models["base"])}]
                + [
                    {"model": str(models[f"full_{x}"]), "parameters": {"weight": 0.5}}
                    for x in EXPERTS
                ],
            }
        )
    )
    out = tmp_path / "mk"
    code, text = cli("merge", config, "-o", out)
    assert code == 0, text
    cfg = json.loads((out / "langmerge_merge.json").read_text())["config"]
    # mergekit drops the base from the task vectors; dare_ties sums (normalize: false) and
    # rescales kept entries by L1 norm
    assert [e["weight"] for e in cfg["experts"]] == [0.5, 0.5, 0.5]
    assert cfg["normalize"] is False and cfg["rescale"] == "l1" and cfg["source"] == "mergekit"


def test_mergekit_ties_yaml_equals_our_ties(models, tmp_path, cli):
    config = tmp_path / "mk_ties.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "merge_method": "ties",
                "base_model": str(models["base"]),
                "parameters": {"density": 0.3, "weight": 1.0},
                "models": [{"model": str(models[f"full_{x}"])} for x in EXPERTS],
            }
        )
    )
    code, _ = cli("merge", config, "-o", tmp_path / "a")
    code2, _ = cli(
        "merge",
        "--method",
        "ties",
        "--density",
        "0.3",
        "--base",
        models["base"],
        "--experts",
        *[models[f"full_{x}"] for x in EXPERTS],
        "-o",
        tmp_path / "b",
    )
    assert code == code2 == 0
    a, b = weights_of(tmp_path / "a"), weights_of(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_random_merges_are_reproducible(models, tmp_path, cli):
    outs = []
    for run in ("one", "two"):
        code, _ = cli(
            "merge",
            "--method",
            "dare_ties",
            "--density",
            "0.3",
            "--seed",
            "5",
            "--base",
            models["base"],
            "--experts",
            *[models[f"full_{x}"] for x in EXPERTS],
            "-o",
            tmp_path / run,
        )
        assert code == 0
        outs.append(weights_of(tmp_path / run))
    assert all(torch.equal(outs[0][k], outs[1][k]) for k in outs[0])


def test_factor_space_matches_peft_on_embedding_loras_with_negative_weights(models, tmp_path, cli):
    from conftest import make_lora_expert, peft_weighted_merge

    experts = [
        make_lora_expert(models["base"], tmp_path / f"emb_{x}", 400 + i,
                         target_modules=["embed_tokens", "q_proj"], modules_to_save=None)
        for i, x in enumerate(EXPERTS)
    ]  # fmt: skip
    weights = [1.0, -0.5, 2.0]
    out = tmp_path / "factors_emb"
    code, text = cli(
        *merge_args(
            "linear",
            models["base"],
            experts,
            out,
            "--space",
            "factors",
            "--weights",
            "1,-0.5,2",
            "--emit",
            "adapter",
        )
    )
    assert code == 0, text
    model = peft_weighted_merge(models["base"], experts, weights, "linear")
    ours = load_file(out / "adapter_model.safetensors")
    peft_state = {
        k.replace(".merged", ""): v
        for k, v in model.state_dict().items()
        if ".merged" in k and "lora_" in k
    }
    assert any("lora_embedding_A" in k for k in peft_state)
    assert peft_state.keys() == ours.keys()
    for key, value in peft_state.items():
        assert torch.allclose(ours[key], value, atol=1e-6), key


def test_fan_in_fan_out_on_linear_layers_merges_as_peft_loads_it(models, tmp_path, cli):
    import shutil

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapter = tmp_path / "adapter"
    shutil.copytree(models["plain_en"], adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "fan_in_fan_out": True}))
    out = tmp_path / "merged"
    code, text = cli(*merge_args("linear", models["base"], [adapter], out))
    assert code == 0, text
    # PEFT resets the flag on nn.Linear (q_proj is square: a transposed update would fit too)
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(models["base"]), adapter)
    expected = peft.merge_and_unload().state_dict()
    merged = weights_of(out)
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight"):
        assert torch.allclose(merged[name], expected[name], atol=1e-6), name


def test_written_files_honour_the_umask(models, tmp_path, cli):
    import os
    import stat

    from langmerge.files import atomic_write

    old = os.umask(0o027)
    try:
        out = tmp_path / "merged"
        code, text = cli(*merge_args("ties", models["base"], [models["lora_en"]], out))
        atomic_write(tmp_path / "report.md", "# report\n")
    finally:
        os.umask(old)
    assert code == 0, text
    written = [*out.rglob("*"), tmp_path / "report.md"]
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in written}
    assert modes == {p.name: 0o750 if p.is_dir() else 0o640 for p in written}


def test_the_model_card_names_a_hub_base_or_none(models, tmp_path, cli):
    import shutil

    out = tmp_path / "local"
    assert cli(*merge_args("ties", models["base"], [models["lora_en"]], out))[0] == 0
    card = (out / "README.md").read_text()
    assert "base_model" not in card.split("---")[1]  # a local folder is no hub id: omitted
    prepared = tmp_path / "prepared"  # as langmerge prepares a hub base for classification
    shutil.copytree(models["base"], prepared)
    (prepared / "prepared.json").write_text(json.dumps({"base": "meta-llama/Llama-3.2-1B"}))
    out = tmp_path / "hub"
    assert cli(*merge_args("ties", prepared, [models["plain_en"]], out))[0] == 0
    assert "base_model: meta-llama/Llama-3.2-1B\n" in (out / "README.md").read_text()


def test_an_approximate_adapter_says_so_in_its_card(models, tmp_path, cli):
    out = tmp_path / "adapter"
    experts = [models[f"plain_{x}"] for x in EXPERTS]
    code, text = cli(*merge_args("ties", models["base"], experts, out, "--density", "0.5",
                                 "--emit", "adapter", "--adapter-rank", "4"))  # fmt: skip
    assert code == 0, text
    summary = json.loads((out / "langmerge_merge.json").read_text())["adapter"]
    card = (out / "README.md").read_text()
    assert f"relative reconstruction error of {summary['rel_error']:.3g}" in card
    assert "library_name: peft" in card


def test_merging_needs_no_optional_package(models, tmp_path):
    """What a plain `pip install langmerge` has: merges of full models and of adapters run."""
    import subprocess
    import sys

    blocked = ["transformers", "peft", "datasets", "accelerate", "tokenizers", "matplotlib"]
    script = (
        "import sys\n"
        f"for name in {blocked!r}: sys.modules[name] = None  # as if not installed\n"
        "from langmerge.cli import main\n"
        "main(sys.argv[1:])\n"
    )
    for kind in ("full", "lora"):
        out = tmp_path / kind
        experts = [str(models[f"{kind}_{x}"]) for x in EXPERTS]
        args = merge_args("ties", models["base"], experts, out, "--density", "0.5", "--quiet")
        done = subprocess.run([sys.executable, "-c", script, *map(str, args)],
                              capture_output=True, text=True)  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert (out / "model.safetensors").is_file()
