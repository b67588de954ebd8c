"""LoRA-space merging: exact ΔW, KnOTS in factored form, re-factorisation, PEFT parity."""

import pytest
import torch

from langmerge.merge import merge_deltas, merge_lora, merge_lora_factored, merge_lora_peft
from langmerge.merge.lora import truncated_svd


def factors(ranks=(3, 4, 5), m=40, n=30, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(m, r, generator=g), torch.randn(r, n, generator=g)) for r in ranks]


SCALINGS = [2.0, 0.5, 1.0]
WEIGHTS = [1.0, 0.5, 2.0]


def knots_dense(fs, scalings, weights, density, method="ties", seed=0, name=""):
    """KnOTS by its definition: SVD of the dense concatenation, merge the Vᵢᵀ blocks."""
    n = fs[0][1].shape[1]
    cat = torch.cat([s * B @ A for s, (B, A) in zip(scalings, fs)], dim=1).double()
    u, sigma, vh = torch.linalg.svd(cat, full_matrices=False)
    rank = sum(B.shape[1] for B, _ in fs)
    u, sigma, vh = u[:, :rank], sigma[:rank], vh[:rank]
    blocks = [vh[:, i * n : (i + 1) * n].float() for i in range(len(fs))]
    merged = merge_deltas(
        method, blocks, weights=weights, density=density, seed=seed, name=f"{name}#knots"
    )
    return (u * sigma).float() @ merged


@pytest.mark.parametrize("density", [1.0, 0.4])
def test_knots_factored_equals_dense_definition(density):
    fs = factors()
    fast = merge_lora("knots_ties", fs, scalings=SCALINGS, weights=WEIGHTS, density=density)
    dense = knots_dense(fs, SCALINGS, WEIGHTS, density)
    assert torch.allclose(fast, dense, atol=1e-4 * dense.abs().max())


def test_knots_dare_ties_equals_dense_definition_for_the_same_seed():
    fs = factors(seed=1)
    fast = merge_lora("knots_dare_ties", fs, scalings=SCALINGS, density=0.5, seed=4, name="q")
    dense = knots_dense(fs, SCALINGS, [1.0] * 3, 0.5, "dare_ties", seed=4, name="q")
    assert torch.allclose(fast, dense, atol=1e-4 * dense.abs().max())


def test_knots_at_density_one_with_one_expert_reproduces_it():
    ((B, A),) = factors(ranks=(4,))
    assert torch.allclose(
        merge_lora("knots_ties", [(B, A)], scalings=[2.0]), 2.0 * B @ A, atol=1e-4
    )


def test_delta_space_merges_the_exact_products():
    fs = factors()
    tau = merge_lora("ties", fs, scalings=SCALINGS, weights=WEIGHTS, density=0.3)
    exact = [s * B @ A for s, (B, A) in zip(SCALINGS, fs)]
    assert torch.allclose(tau, merge_deltas("ties", exact, weights=WEIGHTS, density=0.3))


@pytest.mark.parametrize("method", ["linear", "task_arithmetic", "knots_ties"])
def test_exact_methods_give_an_exact_adapter_of_rank_sum_r(method):
    fs = factors()
    up = merge_lora_factored(method, fs, scalings=SCALINGS, weights=WEIGHTS, density=1.0, lam=0.7)
    dense = merge_lora(method, fs, scalings=SCALINGS, weights=WEIGHTS, density=1.0, lam=0.7)
    assert up.rank == 12 and up.rel_error == 0.0
    assert torch.allclose(up.B @ up.A, dense, atol=1e-4)
    assert up.norm == pytest.approx(float(dense.norm()), rel=1e-5)


def test_other_methods_give_the_best_truncation_with_its_error():
    fs = factors()
    dense = merge_lora("ties", fs, scalings=SCALINGS, weights=WEIGHTS, density=0.5)
    up = merge_lora_factored("ties", fs, scalings=SCALINGS, weights=WEIGHTS, density=0.5, rank=6)
    sigma = torch.linalg.svdvals(dense.double())
    optimal = float((sigma[6:].square().sum() / sigma.square().sum()).sqrt())
    assert up.rank == 6
    assert up.rel_error == pytest.approx(optimal, rel=1e-4)
    assert up.rel_error == pytest.approx(
        float((dense - up.B @ up.A).norm() / dense.norm()), rel=1e-4
    )


def test_truncated_svd_of_a_wide_and_a_tall_matrix():
    g = torch.Generator().manual_seed(2)
    low = torch.randn(50, 3, generator=g) @ torch.randn(3, 20, generator=g)
    for d in (low, low.T):
        up = truncated_svd(d, 3)
        assert up.rel_error < 1e-5 and torch.allclose(up.B @ up.A, d, atol=1e-4)
    assert truncated_svd(low, 8).rank == 8  # zero-padded to the requested rank


# ---- space: factors = PEFT's add_weighted_adapter ------------------------------------------


@pytest.fixture(scope="module")
def peft_model(models):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(models["base"])
    model = PeftModel.from_pretrained(base, models["plain_en"], adapter_name="en")
    model.load_adapter(models["plain_de"], adapter_name="de")
    model.load_adapter(models["plain_fr"], adapter_name="fr")
    return model


@pytest.mark.parametrize(
    ("combination", "density"),
    [("linear", 1.0), ("ties", 1.0), ("ties", 0.5), ("magnitude_prune", 0.3)],
)
def test_factor_space_equals_peft_add_weighted_adapter(peft_model, combination, density):
    weights = [1.0, -0.5, 2.0]
    name = f"m_{combination}_{int(density * 10)}"
    peft_model.add_weighted_adapter(
        ["en", "de", "fr"], weights, name, combination_type=combination, density=density
    )
    checked = 0
    for module_name, module in peft_model.named_modules():
        if not hasattr(module, "lora_A") or name not in module.lora_A:
            continue
        fs = [
            (module.lora_B[a].weight.data, module.lora_A[a].weight.data) for a in ("en", "de", "fr")
        ]
        up = merge_lora_peft(
            combination,
            fs,
            scalings=[module.scaling[a] for a in ("en", "de", "fr")],
            weights=weights,
            density=density,
        )
        assert torch.allclose(up.A, module.lora_A[name].weight.data, atol=1e-6), module_name
        assert torch.allclose(up.B, module.lora_B[name].weight.data, atol=1e-6), module_name
        checked += 1
    assert checked == 6  # q, v, down in 2 layers


def test_alpha_pattern_with_alternatives_scales_the_matching_modules(models, tmp_path):
    import json
    import shutil

    from langmerge.merge.io import load_adapter

    path = tmp_path / "patterned"
    shutil.copytree(models["plain_en"], path)
    config = json.loads((path / "adapter_config.json").read_text())
    config["alpha_pattern"] = {"q_proj|v_proj": 16}  # r = 4, lora_alpha = 8 elsewhere
    (path / "adapter_config.json").write_text(json.dumps(config))
    adapter = load_adapter(path)
    assert adapter.modules["model.layers.0.self_attn.v_proj.weight"].scaling == 4.0
    assert adapter.modules["model.layers.0.mlp.down_proj.weight"].scaling == 2.0
