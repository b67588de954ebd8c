"""Merge parameters: each method declares those it takes, a config that sets another one is
refused, and the density rule reads the same from every entry point."""

import re
from pathlib import Path

import pytest
import torch
import yaml

from langmerge.errors import ConfigError
from langmerge.merge import MergeParams, merge_deltas, merge_lora, merge_lora_peft
from langmerge.merge.config import MergeConfig, build_config, from_mergekit, load_config
from langmerge.merge.methods import METHODS, get_method
from langmerge.merge.params import PARAMETERS, spelled

MERGING = Path(__file__).parents[1] / "docs" / "merging.md"
DENSITY_MESSAGE = "density must be in (0, 1], got 1.5"


def config(**settings):
    return {"base": "base", "experts": ["en", "de"], **settings}


def write(path, data):
    path.write_text(yaml.safe_dump(data))
    return path


# ---------------------------------------------------------------------------------------------
# A method refuses a parameter it does not take.


def test_linear_refuses_gamma_naming_what_it_takes(tmp_path):
    path = write(tmp_path / "merge.yaml", config(method="linear", gamma=0.1))
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert "linear does not use gamma (it takes lambda, normalize)" in str(e.value)


def test_ties_refuses_a_seed_and_slerp_refuses_lambda():
    with pytest.raises(ConfigError, match=r"ties does not use seed \(it takes density, lambda"):
        build_config(config(method="ties", seed=3))
    with pytest.raises(ConfigError, match=r"slerp does not use lambda \(it takes t\)"):
        build_config(config(method="slerp", **{"lambda": 0.5}))


def test_several_unused_parameters_are_named_together():
    with pytest.raises(ConfigError) as e:
        build_config(config(method="linear", density=0.5, seed=3))
    assert "linear does not use density, seed" in str(e.value) and "remove them" in str(e.value)


def test_a_per_expert_density_counts_as_setting_density():
    experts = [{"path": "en", "density": 0.5}, "de"]
    with pytest.raises(ConfigError, match="task_arithmetic does not use density"):
        build_config(config(method="task_arithmetic", experts=experts))


def test_regmean_takes_what_its_fallback_takes():
    with pytest.raises(ConfigError, match="regmean with fallback linear does not use density"):
        build_config(config(method="regmean", density=0.5))
    cfg = build_config(config(method="regmean", fallback="ties", density=0.5))
    assert cfg.params().density == 0.5


def test_a_python_config_is_checked_too():
    with pytest.raises(ValueError, match="linear does not use gamma"):
        MergeConfig(method="linear", base="base", experts=["en"], gamma=0.1)


def test_defaults_written_out_set_nothing(tmp_path):
    # every field at its default, as langmerge_merge.json records a linear merge's config
    recorded = MergeConfig(method="linear", base="base", experts=["en"]).model_dump(mode="json")
    cfg = load_config(write(tmp_path / "recorded.yaml", recorded))
    assert cfg.set_params() == set()
    cfg = build_config(config(method="linear", density=1.0, seed=0))
    assert cfg.set_params() == set()


def test_every_setting_the_method_does_not_take_is_named():
    shared = config(method="linear", density=0.5, seed=1, alpha=0.5, fallback="ties")
    with pytest.raises(ConfigError, match="linear does not use density, seed, alpha, fallback"):
        build_config(shared, "merge settings of the recipe")


def test_mergekit_defaults_made_explicit_are_taken_by_the_method(tmp_path):
    for mk in ("linear", "ties", "dare_ties", "model_stock", "slerp"):
        data = {"merge_method": mk, "base_model": "base", "models": ["base", "en"]}
        load_config(write(tmp_path / f"{mk}.yaml", data))  # no error
    assert "rescale" not in from_mergekit({"merge_method": "ties", "base_model": "b",
                                           "models": ["en"]})  # fmt: skip
    data = {"merge_method": "linear", "models": ["en", "de"], "parameters": {"density": 0.5}}
    with pytest.raises(ConfigError, match="linear does not use density"):
        load_config(write(tmp_path / "mk.yaml", data))


def test_every_declared_parameter_is_a_known_one():
    for m in METHODS.values():
        assert m.params and m.params <= PARAMETERS.keys(), m.name
    with pytest.raises(ValueError, match="unknown parameters"):
        type(METHODS["ties"])("x", "y", params=frozenset({"densty"}))


# ---------------------------------------------------------------------------------------------
# What a method declares is exactly what changes its result.

CHANGED = {"density": 0.7, "lam": 1.5, "gamma": 0.1, "epsilon": 0.05, "t": 0.2,
           "rescale": "l1", "seed": 1}  # fmt: skip
TENSOR_PARAMS = ["density", "lam", "normalize", "gamma", "epsilon", "t", "rescale", "seed"]


def _merged(m, deltas, base, **change):
    settings = {"density": 0.5, "weights": [1.0, 0.5] if m.uses_weights else None, **change}
    if m.knots:  # LoRA factors: the same ΔW, written as B·A
        return merge_lora(m.name, deltas, **settings)
    return merge_deltas(m.name, deltas, base=base, name="w", **settings)


TENSOR_METHODS = [m for m in METHODS.values() if not m.data_aware]


@pytest.mark.parametrize("m", TENSOR_METHODS, ids=[m.name for m in TENSOR_METHODS])
def test_the_declared_parameters_are_those_that_change_the_result(m):
    g = torch.Generator().manual_seed(0)
    if m.knots:
        deltas = [(torch.randn(24, 4, generator=g), torch.randn(4, 16, generator=g))
                  for _ in range(2)]  # fmt: skip
    else:
        deltas = [torch.randn(24, 16, generator=g) for _ in range(2)]
    base = torch.randn(24, 16, generator=g)
    reference = _merged(m, deltas, base)
    for name in TENSOR_PARAMS:
        value = (not m.normalize) if name == "normalize" else CHANGED[name]
        changes = not torch.equal(_merged(m, deltas, base, **{name: value}), reference)
        assert changes == (name in m.params), f"{m.name}: {name}"


def test_regmean_declares_alpha_fallback_and_lambda():
    assert get_method("regmean").params == {"alpha", "fallback", "lam"}


# ---------------------------------------------------------------------------------------------
# The density rule, the same from every entry point.


def test_density_out_of_range_gives_the_same_message_everywhere(tmp_path):
    with pytest.raises(ConfigError, match=re.escape(f"  density: {DENSITY_MESSAGE}")):
        load_config(write(tmp_path / "merge.yaml", config(method="ties", density=1.5)))
    experts = ["en", {"path": "de", "density": 1.5}]
    with pytest.raises(ConfigError, match=re.escape(f"experts.1.density: {DENSITY_MESSAGE}")):
        build_config(config(method="ties", experts=experts))
    t = [torch.ones(4), torch.ones(4)]
    with pytest.raises(ConfigError, match=re.escape(DENSITY_MESSAGE)):
        merge_deltas("ties", t, density=1.5)
    with pytest.raises(ConfigError, match=re.escape(DENSITY_MESSAGE)):
        merge_deltas("ties", t, density=[1.0, 1.5])
    factors = [(torch.ones(4, 1), torch.ones(1, 3))]
    with pytest.raises(ConfigError, match=re.escape(DENSITY_MESSAGE)):
        merge_lora("ties", factors, density=1.5)
    with pytest.raises(ConfigError, match=re.escape(DENSITY_MESSAGE)):
        merge_lora_peft("ties", factors, density=1.5)
    with pytest.raises(ConfigError, match=re.escape(DENSITY_MESSAGE)):
        MergeParams(density=1.5)


@pytest.mark.parametrize("density", [0.0, -0.2, float("nan")])
def test_zero_negative_and_nan_densities_are_refused(density):
    with pytest.raises(ConfigError, match=r"density must be in \(0, 1\]"):
        MergeParams(density=density)
    with pytest.raises(ConfigError, match=r"density must be in \(0, 1\]"):
        build_config(config(method="ties", density=density))


# ---------------------------------------------------------------------------------------------
# The carrier.


def test_merge_params_come_from_keyword_settings_with_one_density_per_expert():
    p = MergeParams.from_settings(3, density=[0.5, 0.5, 0.5], lam=2.0, seed=4)
    assert p == MergeParams(density=0.5, lam=2.0, seed=4)
    assert MergeParams.from_settings(2, density=[0.5, 0.8]).density == (0.5, 0.8)
    with pytest.raises(ConfigError, match="got 2 densities for 3 experts"):
        MergeParams.from_settings(3, density=[0.5, 0.8])
    with pytest.raises(TypeError):
        MergeParams.from_settings(1, densty=0.5)


def test_a_config_gives_the_maths_its_parameters():
    experts = [{"path": "en", "density": 0.4}, "de"]
    cfg = build_config(config(method="dare_ties", experts=experts, density=0.8, seed=3,
                              rescale="l1", **{"lambda": 1.2}))  # fmt: skip
    assert cfg.params() == MergeParams(density=(0.4, 0.8), lam=1.2, rescale="l1", seed=3)


# ---------------------------------------------------------------------------------------------
# docs/merging.md


def test_the_docs_table_lists_what_each_method_takes():
    section = MERGING.read_text().split("### Parameters each method takes", 1)[1]
    table = section.split("\n\n|", 1)[1].split("\n\n", 1)[0]
    rows = re.findall(r"^\| `(\w+)` \| (.*) \|$", table, re.M)
    documented = {name: set(re.findall(r"`(\w+)`", takes)) for name, takes in rows}
    assert list(documented) == list(METHODS)
    for name, m in METHODS.items():
        assert documented[name] == {spelled(p) for p in m.params}, name
