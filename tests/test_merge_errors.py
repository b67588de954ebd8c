"""Bad input gets a clear message, exit code 1, and leaves nothing behind."""

import json
import shutil

import pytest
import torch
import yaml
from conftest import merge_args
from safetensors.torch import load_file, save_file

import langmerge.merge.methods as methods_module

EXPERTS = ["en", "de", "fr"]


def full_args(models, out, *extra):
    """A ties merge of the three full experts into `out`."""
    return merge_args("ties", models["base"], [models[f"full_{x}"] for x in EXPERTS], out, *extra)


def assert_nothing_left(out):
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


def edited_copy(src, dst, edit):
    """A copy of model directory `src` whose tensors pass through `edit(dict)`."""
    shutil.copytree(src, dst)
    state = load_file(dst / "model.safetensors")
    edit(state)
    save_file(state, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def test_expert_with_another_shape_names_tensor_and_expert(models, tmp_path, cli):
    def widen(state):
        state["model.norm.weight"] = torch.ones(33)

    bad = edited_copy(models["full_de"], tmp_path / "wide_de", widen)
    out = tmp_path / "out"
    code, text = cli(*merge_args("ties", models["base"], [models["full_en"], bad], out))
    assert code == 1
    assert "wide_de" in text and "model.norm.weight" in text and "(33,)" in text
    assert "Traceback" not in text
    assert_nothing_left(out)


def test_expert_missing_a_tensor_is_refused(models, tmp_path, cli):
    bad = edited_copy(models["full_de"], tmp_path / "short", lambda s: s.pop("model.norm.weight"))
    code, text = cli(
        *merge_args("ties", models["base"], [models["full_en"], bad], tmp_path / "out")
    )
    assert code == 1 and "lacks 1 base tensor" in text and "model.norm.weight" in text


def test_nan_in_an_expert_names_tensor_and_expert_and_writes_nothing(models, tmp_path, cli):
    def poison(state):
        state["model.layers.1.mlp.up_proj.weight"][3, 4] = float("nan")

    bad = edited_copy(models["full_fr"], tmp_path / "nan_fr", poison)
    out = tmp_path / "out"
    code, text = cli(*merge_args("ties", models["base"], [models["full_en"], bad], out))
    assert code == 1
    assert "model.layers.1.mlp.up_proj.weight" in text and "nan_fr" in text and "NaN" in text
    assert_nothing_left(out)


def test_inf_in_a_lora_adapter_is_refused(models, tmp_path, cli):
    bad = tmp_path / "inf_de"
    shutil.copytree(models["lora_de"], bad)
    state = load_file(bad / "adapter_model.safetensors")
    key = next(k for k in state if "lora_A" in k)
    state[key][0, 0] = float("inf")
    save_file(state, bad / "adapter_model.safetensors")
    code, text = cli(
        *merge_args("ties", models["base"], [models["lora_en"], bad], tmp_path / "out")
    )
    assert code == 1 and "inf_de" in text and "NaN/Inf" in text


def test_adapters_of_different_base_models_are_refused(models, tmp_path, cli):
    other = tmp_path / "other_base"
    shutil.copytree(models["lora_de"], other)
    config = json.loads((other / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "meta-llama/Llama-3.1-8B"
    (other / "adapter_config.json").write_text(json.dumps(config))
    code, text = cli(
        *merge_args("ties", models["base"], [models["lora_en"], other], tmp_path / "out")
    )
    assert code == 1 and "different base models" in text


def test_missing_shard_is_reported(models, tmp_path, cli):
    base = tmp_path / "sharded_base"
    shutil.copytree(models["base"], base)
    (base / "model.safetensors").rename(base / "model-00001-of-00002.safetensors")
    (base / "model.safetensors.index.json").write_text(
        json.dumps(
            {
                "weight_map": {
                    "a": "model-00001-of-00002.safetensors",
                    "b": "model-00002-of-00002.safetensors",
                }
            }
        )
    )
    out = tmp_path / "out"
    code, text = cli(
        "merge", "--method", "ties", "--base", base, "--experts", models["full_en"], "-o", out
    )
    assert code == 1 and "model-00002-of-00002.safetensors" in text and "missing" in text
    assert_nothing_left(out)


def test_truncated_shard_is_reported(models, tmp_path, cli):
    bad = tmp_path / "truncated_de"
    shutil.copytree(models["full_de"], bad)
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 2])
    code, text = cli(
        *merge_args("ties", models["base"], [models["full_en"], bad], tmp_path / "out")
    )
    assert code == 1 and "truncated" in text and "truncated_de" in text


def test_garbage_shard_is_reported(models, tmp_path, cli):
    bad = tmp_path / "garbage_de"
    shutil.copytree(models["full_de"], bad)
    (bad / "model.safetensors").write_bytes(b"\x00" * 3 + b"not a safetensors file")
    code, text = cli(
        *merge_args("ties", models["base"], [models["full_en"], bad], tmp_path / "out")
    )
    assert code == 1 and "corrupt safetensors file" in text


@pytest.mark.parametrize("density", ["0", "1.5", "-0.2"])
def test_density_outside_unit_interval(models, tmp_path, cli, density):
    out = tmp_path / "out"
    code, text = cli(*full_args(models, out, "--density", density))
    assert code == 1 and "density must be in (0, 1]" in text
    assert_nothing_left(out)


def test_a_flag_the_method_does_not_take_is_refused(models, tmp_path, cli):
    out = tmp_path / "out"
    experts = [models[f"full_{x}"] for x in EXPERTS]
    code, text = cli(*merge_args("linear", models["base"], experts, out, "--gamma", "0.1"))
    assert code == 1 and "linear does not use gamma (it takes lambda, normalize)" in text
    assert_nothing_left(out)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"lora_alpha": "sixteen"}, 'lora_alpha must be a number, e.g. 16, not "sixteen"'),
        ({"lora_alpha": [16]}, "lora_alpha must be a number, e.g. 16, not [16]"),
        ({"r": 8}, "gives model.layers.0.mlp.down_proj rank 8, but its tensors have rank 4 "
                   "(PEFT would not load it)"),
        ({"use_rslora": "yes"}, 'use_rslora must be true or false, not "yes"'),
    ],
)  # fmt: skip
def test_a_malformed_adapter_config_names_the_field(models, tmp_path, cli, change, message):
    adapter = tmp_path / "adapter"
    shutil.copytree(models["plain_de"], adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, **change}))
    out = tmp_path / "out"
    code, text = cli(*merge_args("ties", models["base"], [models["plain_en"], adapter], out))
    assert code == 1 and message in text and "Traceback" not in text
    assert_nothing_left(out)


def test_all_weights_zero_is_refused(models, tmp_path, cli):
    out = tmp_path / "out"
    code, text = cli(*full_args(models, out, "--weights", "0,0,0"))
    assert code == 1 and "every weight is 0, so the merge would be the base model" in text
    assert_nothing_left(out)


def test_weights_summing_to_zero_for_a_normalized_merge(models, tmp_path, cli):
    code, text = cli(
        *merge_args(
            "linear",
            models["base"],
            [models["full_en"], models["full_de"]],
            tmp_path / "out",
            "--weights",
            "1,-1",
        )
    )
    assert code == 1 and "sum to zero" in text


def test_existing_output_is_refused_unless_forced(models, tmp_path, cli):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    code, text = cli(*full_args(models, out))
    assert code == 1 and "already exists" in text and "--force" in text
    assert (out / "keep.txt").read_text() == "precious"
    code, text = cli(*full_args(models, out, "--force"))
    assert code == 0 and not (out / "keep.txt").exists() and (out / "model.safetensors").exists()


def test_pickle_checkpoints_are_refused_unless_allowed(models, tmp_path, cli):
    pickled = tmp_path / "pickled_de"
    shutil.copytree(models["full_de"], pickled)
    torch.save(load_file(pickled / "model.safetensors"), pickled / "pytorch_model.bin")
    (pickled / "model.safetensors").unlink()
    args = (
        "merge",
        "--method",
        "ties",
        "--base",
        models["base"],
        "--experts",
        models["full_en"],
        pickled,
        "-o",
        tmp_path / "out",
    )
    code, text = cli(*args)
    assert code == 1 and "pickle" in text and "--allow-pickle" in text
    code, text = cli(*args, "--allow-pickle")
    assert code == 0, text


def test_unknown_method_lists_the_valid_ones(models, tmp_path, cli):
    code, text = cli(*merge_args("tie", models["base"], [models["full_en"]], tmp_path / "out"))
    assert code == 1 and "unknown merge method 'tie'" in text and "dare_ties" in text


def test_knots_on_full_models_and_mixed_experts_are_refused(models, tmp_path, cli):
    code, text = cli(*merge_args("knots_ties", models["base"], [models["full_en"]], tmp_path / "a"))
    assert code == 1 and "LoRA" in text
    code, text = cli(
        *merge_args("ties", models["base"], [models["full_en"], models["lora_de"]], tmp_path / "b")
    )
    assert code == 1 and "mix" in text


def test_config_errors_name_the_field(tmp_path, models, cli):
    config = tmp_path / "merge.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "method": "ties",
                "base": str(models["base"]),
                "experts": [str(models["full_en"])],
                "densty": 0.5,
            }
        )
    )
    code, text = cli("merge", config, "-o", tmp_path / "out")
    assert code == 1 and "densty" in text and "Extra inputs" in text
    code, text = cli("merge", tmp_path / "nope.yaml", "-o", tmp_path / "out")
    assert code == 1 and "does not exist" in text


def test_unsupported_mergekit_options_are_named(tmp_path, models, cli):
    config = tmp_path / "mk.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "merge_method": "ties",
                "base_model": str(models["base"]),
                "slices": [],
                "models": [str(models["full_en"])],
            }
        )
    )
    code, text = cli("merge", config, "-o", tmp_path / "out")
    assert code == 1 and "slices" in text


def test_interrupt_mid_merge_leaves_nothing(models, tmp_path, cli, monkeypatch):
    calls = {"n": 0}
    real = methods_module.ties_vote

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(methods_module, "ties_vote", interrupted)
    out = tmp_path / "out"
    code, text = cli(*full_args(models, out))
    assert code == 130 and "interrupted" in text
    assert_nothing_left(out)


def test_force_never_replaces_an_input(models, tmp_path, cli):
    expert = tmp_path / "expert_copy"
    shutil.copytree(models["full_de"], expert)
    code, text = cli(
        *merge_args("ties", models["base"], [models["full_en"], expert], expert, "--force")
    )
    assert code == 1 and "would replace the input" in text
    assert (expert / "model.safetensors").exists()


def test_factor_space_refuses_what_peft_cannot_express(models, tmp_path, cli):
    code, text = cli(
        *merge_args(
            "ties",
            models["base"],
            [models["plain_en"], models["plain_de"]],
            tmp_path / "out",
            "--space",
            "factors",
            "--lambda",
            "0.5",
        )
    )
    assert code == 1 and "add_weighted_adapter" in text and "lambda" in text
    code, text = cli(
        *merge_args(
            "knots_ties",
            models["base"],
            [models["plain_en"]],
            tmp_path / "out",
            "--space",
            "factors",
        )
    )
    assert code == 1 and "space 'factors' supports" in text


def test_slerp_adapter_output_and_bad_shard_size_are_refused_up_front(models, tmp_path, cli):
    out = tmp_path / "out"
    code, text = cli(
        *merge_args(
            "slerp",
            models["base"],
            [models["lora_en"], models["lora_de"]],
            out,
            "--emit",
            "adapter",
        )
    )
    assert code == 1 and "cannot be written as an adapter" in text
    assert_nothing_left(out)
    code, text = cli(*full_args(models, out, "--shard-size", "2 gigs"))
    assert code == 1 and "shard_size" in text


def test_a_killed_merge_leaves_no_partial_output_behind_the_next_one(models, tmp_path, cli):
    out = tmp_path / "out"
    stale = tmp_path / ".out.partial-999999999"  # a pid that cannot be alive
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    code, _ = cli(*full_args(models, out))
    assert code == 0 and not stale.exists() and (out / "model.safetensors").exists()


def test_a_head_trained_on_a_tied_base_gets_a_specific_message(models, tmp_path, cli):
    from conftest import tiny_config
    from transformers import LlamaForCausalLM

    config = tiny_config()
    config.tie_word_embeddings = True
    LlamaForCausalLM(config).save_pretrained(tmp_path / "tied")
    code, text = cli(
        *merge_args(
            "ties", tmp_path / "tied", [models["lora_en"], models["lora_de"]], tmp_path / "out"
        )
    )
    assert code == 1 and "tie_word_embeddings" in text
