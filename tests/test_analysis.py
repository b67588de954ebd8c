"""Task-vector analysis: factored inner products, cosines (overall, per layer, per type), signs."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from langmerge.errors import InputError
from langmerge.merge.io import Adapter, LoraModule, ModelFiles
from langmerge.merge.vectors import VectorStats, compare_experts, lora_inner
from langmerge.reporting.analysis import cache_key

Q0, V0 = "model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.v_proj.weight"
Q1, V1 = "model.layers.1.self_attn.q_proj.weight", "model.layers.1.self_attn.v_proj.weight"
HEAD = "score.weight"
SHAPES = {Q0: (6, 8), V0: (4, 8), Q1: (6, 8), V1: (4, 8)}


def adapter(label, modules=None, saved=None):
    return Adapter(path=Path("x"), label=label, config={}, modules=modules or {}, saved=saved or {})


def lora(m, n, r, scaling, g):
    return LoraModule(torch.randn(m, r, generator=g), torch.randn(r, n, generator=g), scaling)


def dense(module):
    return module.scaling * module.B.double() @ module.A.double()


def base_dir(tmp_path, tensors):
    save_file(tensors, str(tmp_path / "model.safetensors"))
    return ModelFiles(tmp_path)


def cosine(x, y):
    return float(x @ y / (x.norm() * y.norm()))


def test_factored_inner_product_equals_the_dense_one():
    g = torch.Generator().manual_seed(0)
    a = LoraModule(torch.randn(37, 5, generator=g), torch.randn(5, 23, generator=g), 1.7)
    b = LoraModule(torch.randn(37, 3, generator=g), torch.randn(3, 23, generator=g), -0.3)
    expected = float((dense(a) * dense(b)).sum())
    assert lora_inner(a, b) == pytest.approx(expected, rel=1e-10)
    assert lora_inner(a, a) == pytest.approx(float(dense(a).square().sum()), rel=1e-10)


@pytest.fixture
def experts(tmp_path):
    """en and de adapt all four modules, fr lacks V1; en and fr have a trained head."""
    g = torch.Generator().manual_seed(1)
    mods = {lang: {k: lora(*SHAPES[k], r, s, g) for k in SHAPES} for lang, r, s in
            [("en", 2, 2.0), ("de", 3, 0.5), ("fr", 4, 1.0)]}  # fmt: skip
    del mods["fr"][V1]
    theta = torch.randn(3, 8, generator=g)
    heads = {
        "en": theta + torch.randn(3, 8, generator=g),
        "fr": theta - torch.rand(3, 8, generator=g),
    }
    adapters = {lang: adapter(lang, mods[lang], {HEAD: heads[lang]} if lang in heads else {})
                for lang in mods}  # fmt: skip
    base = base_dir(tmp_path, {HEAD: theta, Q0: torch.zeros(SHAPES[Q0])})
    yield adapters, base
    base.close()


def flat(adapters, base, names):
    """Each expert's task vector restricted to `names`, dense, flattened and concatenated."""
    theta = base.read(HEAD).double() if base is not None else None
    out = {}
    for lang, a in adapters.items():
        parts = []
        for k in names:
            if k == HEAD:
                parts.append(a.saved[HEAD].double() - theta if HEAD in a.saved else theta * 0)
            else:
                parts.append(dense(a.modules[k]) if k in a.modules else torch.zeros(SHAPES[k]))
        out[lang] = torch.cat([p.reshape(-1).double() for p in parts])
    return out


def test_cosines_equal_those_of_the_dense_concatenated_task_vectors(experts):
    adapters, base = experts
    stats = compare_experts(adapters, base)
    assert stats.languages == ["en", "de", "fr"] and stats.skipped == []

    whole = flat(adapters, base, [Q0, V0, Q1, V1, HEAD])
    layer = {0: [Q0, V0], 1: [Q1, V1], None: [HEAD]}
    kind = {"q_proj": [Q0, Q1], "v_proj": [V0, V1], "head": [HEAD]}
    for a in whole:
        assert stats.norms[a] == pytest.approx(float(whole[a].norm()), rel=1e-10)
        for b in whole:
            assert stats.cosine[(a, b)] == pytest.approx(cosine(whole[a], whole[b]), abs=1e-10)
            assert stats.cosine[(a, b)] == stats.cosine[(b, a)]
            for key, names in layer.items():
                x, y = flat(adapters, base, names)[a], flat(adapters, base, names)[b]
                expected = cosine(x, y) if x.norm() and y.norm() else 0.0  # de has no head
                assert stats.by_layer[(a, b)][key] == pytest.approx(expected, abs=1e-10)
            for key, names in kind.items():
                x, y = flat(adapters, base, names)[a], flat(adapters, base, names)[b]
                expected = cosine(x, y) if x.norm() and y.norm() else 0.0
                assert stats.by_type[(a, b)][key] == pytest.approx(expected, abs=1e-10)

    langs, rows = stats.matrix()
    assert langs == ["en", "de", "fr"]
    assert [rows[i][i] for i in range(3)] == [1.0, 1.0, 1.0]
    assert rows[0][2] == stats.cosine[("en", "fr")] == rows[2][0]


def test_without_a_base_the_heads_are_skipped_and_said_so(experts):
    adapters, _ = experts
    stats = compare_experts(adapters)
    assert stats.skipped == [f"{HEAD}: no base model given"]
    whole = flat(adapters, None, [Q0, V0, Q1, V1])
    expected = cosine(whole["en"], whole["fr"])
    assert stats.cosine[("en", "fr")] == pytest.approx(expected, abs=1e-10)
    assert "head" not in stats.by_type[("en", "fr")]


def test_an_expert_scaled_is_parallel_and_negated_is_opposite(experts):
    adapters, _ = experts
    en = adapters["en"].modules
    stats = compare_experts(
        {
            "en": adapter("en", en),
            "en*3": adapter(
                "en*3", {k: LoraModule(m.B, m.A, 3 * m.scaling) for k, m in en.items()}
            ),
            "-en": adapter("-en", {k: LoraModule(-m.B, m.A, m.scaling) for k, m in en.items()}),
        }
    )
    assert stats.cosine[("en", "en*3")] == pytest.approx(1.0, abs=1e-12)
    assert stats.cosine[("en", "-en")] == pytest.approx(-1.0, abs=1e-12)
    assert stats.norms["en*3"] == pytest.approx(3 * stats.norms["en"], rel=1e-12)
    assert stats.by_layer[("en*3", "-en")][1] == pytest.approx(-1.0, abs=1e-12)
    assert stats.sign_conflict[("en", "en*3")] == 0.0
    assert stats.sign_conflict[("en", "-en")] == 1.0


def row(*values, scaling=0.5):
    """A 1×n LoRA module whose ΔW is exactly `values`: B = [[2]], A = the values, s = 0.5."""
    return LoraModule(torch.tensor([[2.0]]), torch.tensor([list(values)]), scaling)


def test_sign_conflicts_are_counted_over_entries_where_both_are_nonzero(tmp_path):
    base = base_dir(tmp_path, {HEAD: torch.tensor([[0.5, 0.5]])})
    stats = compare_experts(
        {   # ΔW of Q0                                   head delta
            "en": adapter("en", {Q0: row(1, 2, -1, 0, 1)}, {HEAD: torch.tensor([[1.5, 0.5]])}),
            "de": adapter("de", {Q0: row(1, -3, 0, 2, 1)}, {HEAD: torch.tensor([[-0.5, 1.0]])}),
            "fr": adapter("fr", {Q0: row(-1, -1, -4, 0, 1)}),
        },
        base,
    )  # fmt: skip
    base.close()
    # en-de: both nonzero at Q0[0, 1, 4] and head[0]; opposite at Q0[1] and head[0]
    assert stats.sign_conflict[("en", "de")] == 2 / 4
    assert stats.sign_conflict[("en", "fr")] == 2 / 4  # Q0[0, 1, 2, 4]; opposite at Q0[0, 1]
    assert stats.sign_conflict[("de", "fr")] == 1 / 3  # Q0[0, 1, 4]; opposite at Q0[0]
    assert stats.sign_conflict[("fr", "de")] == 1 / 3
    assert stats.sign_conflict[("en", "en")] == 0.0
    # ≥ 2 nonzero at Q0[0, 1, 2, 4] and head[0]; mixed signs at Q0[0], Q0[1], head[0]
    assert stats.sign_conflict_all == 3 / 5


def test_a_zero_expert_has_cosine_zero_not_nan(experts):
    adapters, base = experts
    untrained = {k: LoraModule(torch.zeros_like(m.B), m.A, m.scaling)  # PEFT's B starts at 0
                 for k, m in adapters["de"].modules.items()}  # fmt: skip
    stats = compare_experts({"en": adapters["en"], "zero": adapter("zero", untrained)}, base)
    assert stats.norms["zero"] == 0.0
    assert stats.cosine[("en", "zero")] == 0.0 and stats.cosine[("zero", "zero")] == 0.0
    assert stats.by_layer[("zero", "en")] == {0: 0.0, 1: 0.0, None: 0.0}
    assert stats.by_type[("en", "zero")]["q_proj"] == 0.0
    assert stats.sign_conflict[("en", "zero")] == 0.0
    assert stats.matrix()[1] == [[1.0, 0.0], [0.0, 0.0]]


def test_experts_adapting_one_module_with_different_shapes_are_refused():
    g = torch.Generator().manual_seed(2)
    with pytest.raises(InputError, match="different shapes"):
        compare_experts(
            {"en": adapter("en", {Q0: lora(6, 8, 2, 1.0, g)}),
             "de": adapter("de", {Q0: lora(6, 9, 2, 1.0, g)})}
        )  # fmt: skip


def test_sign_counts_do_not_depend_on_the_chunking(experts, monkeypatch):
    adapters, base = experts
    whole = compare_experts(adapters, base)
    monkeypatch.setattr("langmerge.merge.vectors.SIGN_CHUNK", 5)  # chunks split rows and modules
    chunked = compare_experts(adapters, base)
    assert chunked.sign_conflict == whole.sign_conflict
    assert chunked.sign_conflict_all == whole.sign_conflict_all
    assert 0 < whole.sign_conflict_all < 1


def test_the_statistics_are_kept_exactly_and_keyed_by_the_experts(experts):
    adapters, base = experts
    stats = compare_experts(adapters, base)
    assert None in stats.by_layer[("en", "de")]  # the head sits outside any numbered layer
    assert VectorStats.from_json(json.loads(json.dumps(stats.to_json()))) == stats
    row = {"id": 1, "path": "experts/en/v1", "base": "b", "recipe_hash": "r", "data_hash": "d",
           "ended": 10.0}  # fmt: skip
    key = cache_key({"en": row})
    assert cache_key({"en": dict(row)}) == key
    for change in ({"id": 2}, {"data_hash": "e"}, {"ended": 11.0}):  # another expert
        assert cache_key({"en": {**row, **change}}) != key
