"""Every merge method against a straightforward reference written here (the maths its docstring
pins)."""

import itertools
import math

import pytest
import torch

from langmerge.errors import ConfigError
from langmerge.merge import merge_deltas
from langmerge.merge.methods import METHODS, topk_mask

T1 = torch.tensor([1.0, -2.0, 3.0, 0.0])
T2 = torch.tensor([-1.0, -1.0, 1.0, 2.0])
T3 = torch.tensor([2.0, 1.0, -4.0, 0.0])
W = [1.0, 0.5, 2.0]


def ref_trim(t: torch.Tensor, d: float) -> torch.Tensor:
    """Keep the max(1, int(d·n)) largest |t|, ties to the lower index (a stable sort)."""
    if d >= 1:
        return t.clone()
    k = max(1, int(d * t.numel()))
    order = sorted(range(t.numel()), key=lambda i: (-abs(float(t.view(-1)[i])), i))
    out = torch.zeros_like(t).view(-1)
    for i in order[:k]:
        out[i] = t.view(-1)[i]
    return out.view(t.shape)


def ref_ties(ts, ws, lam=1.0, normalize=True):
    """Entry by entry, as written in the TIES paper with weights."""
    flat = [t.reshape(-1).tolist() for t in ts]
    out = []
    for j in range(len(flat[0])):
        d = [w * f[j] for w, f in zip(ws, flat)]
        s = 1.0 if sum(d) >= 0 else -1.0
        agree = [i for i, x in enumerate(d) if x != 0 and math.copysign(1, x) == s]
        num = sum(d[i] for i in agree)
        div = sum(ws[i] for i in agree)
        out.append(lam * (num / div if div else 0.0) if normalize else lam * num)
    return torch.tensor(out).view(ts[0].shape)


def test_ties_hand_computed():
    # δ = [1,-2,3,0], [-.5,-.5,.5,1], [4,2,-8,0]; votes +,-,-,+; disjoint weighted means:
    tau = merge_deltas("ties", [T1, T2, T3], weights=W)
    assert torch.allclose(tau, torch.tensor([5 / 3, -5 / 3, -4.0, 2.0]))


def test_ties_density_trims_exactly_k_with_ties_broken_by_index():
    # k = int(0.5·4) = 2: T2 keeps |2| and the first of its three |1|s.
    assert torch.equal(ref_trim(T2, 0.5), torch.tensor([-1.0, 0.0, 0.0, 2.0]))
    tau = merge_deltas("ties", [T1, T2, T3], weights=W, density=0.5)
    expected = ref_ties([ref_trim(t, 0.5) for t in (T1, T2, T3)], W)
    assert torch.allclose(tau, expected)


@pytest.mark.parametrize("density", [1.0, 0.3, 0.05])
@pytest.mark.parametrize("weights", [[1.0, 1.0, 1.0], [1.0, -0.5, 2.0]])
def test_ties_matches_reference(density, weights):
    g = torch.Generator().manual_seed(1)
    ts = [torch.randn(7, 9, generator=g) for _ in range(3)]  # 63 elements: a small tensor
    tau = merge_deltas("ties", ts, weights=weights, density=density, lam=1.3)
    expected = ref_ties([ref_trim(t, density) for t in ts], weights, lam=1.3)
    assert torch.allclose(tau, expected, atol=1e-6)


def test_ties_without_normalize_sums_the_agreeing_deltas():
    tau = merge_deltas("ties", [T1, T2, T3], weights=W, normalize=False)
    assert torch.allclose(tau, torch.tensor([5.0, -2.5, -8.0, 1.0]))


def test_linear_and_task_arithmetic():
    assert torch.allclose(
        merge_deltas("linear", [T1, T2, T3], weights=W), (T1 + 0.5 * T2 + 2 * T3) / 3.5
    )
    assert torch.allclose(
        merge_deltas("task_arithmetic", [T1, T2, T3], weights=W, lam=0.5),
        0.5 * (T1 + 0.5 * T2 + 2 * T3),
    )


def test_magnitude_prune():
    tau = merge_deltas("magnitude_prune", [T1, T2, T3], weights=W, density=0.5, lam=2.0)
    expected = 2.0 * sum(w * ref_trim(t, 0.5) for w, t in zip(W, (T1, T2, T3)))
    assert torch.allclose(tau, expected)


def test_trim_keeps_at_least_one_entry_of_a_tiny_tensor():
    tau = merge_deltas("magnitude_prune", [torch.tensor([0.5, -3.0, 1.0])], density=0.1)
    assert torch.equal(tau, torch.tensor([0.0, -3.0, 0.0]))


def test_exact_topk_on_a_large_tensor_with_ties():
    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, 1000, (3_000_000,), generator=g).float()  # many equal values
    k = 1_234_567
    mask = topk_mask(a, k)
    assert int(mask.sum()) == k
    assert a[mask].min() >= a[~mask].max()
    thr = a[mask].min()  # among entries equal to the threshold, the lowest indices are kept
    eq = (a == thr).nonzero().flatten()
    kept = mask[eq]
    assert kept[: int(kept.sum())].all() and not kept[int(kept.sum()) :].any()


def ref_breadcrumbs(t, d, gamma):
    n = t.numel()
    skip, keep = int(gamma * n), max(1, int(d * n))
    keep = min(keep, n - skip)
    order = sorted(range(n), key=lambda i: (-abs(float(t.view(-1)[i])), i))
    out = torch.zeros(n)
    for i in order[skip : skip + keep]:
        out[i] = t.view(-1)[i]
    return out.view(t.shape)


@pytest.mark.parametrize("method", ["breadcrumbs", "breadcrumbs_ties"])
def test_breadcrumbs(method):
    g = torch.Generator().manual_seed(2)
    ts = [torch.randn(10, 20, generator=g) for _ in range(3)]
    tau = merge_deltas(method, ts, weights=W, density=0.4, gamma=0.05)
    sparse = [ref_breadcrumbs(t, 0.4, 0.05) for t in ts]
    if method == "breadcrumbs":
        expected = sum(w * s for w, s in zip(W, sparse))
    else:
        expected = ref_ties(sparse, W)
    assert torch.allclose(tau, expected, atol=1e-6)
    # 200 entries: 10 outliers skipped, the next 80 kept
    assert int((ref_breadcrumbs(ts[0], 0.4, 0.05) != 0).sum()) == 80


def test_breadcrumbs_never_zeroes_a_small_tensor():
    t = torch.tensor([0.1, -5.0, 2.0, 0.3])  # int(0.01·4) = 0 outliers, keep max(1, 0) = 1
    assert torch.equal(
        merge_deltas("breadcrumbs", [t], density=0.1), torch.tensor([0.0, -5.0, 0.0, 0.0])
    )


def test_model_stock():
    ts = [torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]), torch.tensor([1.0, 1.0])]
    c = (0.0 + 1 / math.sqrt(2) + 1 / math.sqrt(2)) / 3  # mean pairwise cosine
    t = 3 * c / (1 + 2 * c)
    assert torch.allclose(merge_deltas("model_stock", ts), t * torch.tensor([2 / 3, 2 / 3]))


def test_slerp_interpolates_on_the_sphere_and_lerps_parallel_vectors():
    base = torch.zeros(2)
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    mid = merge_deltas("slerp", [a, b], t=0.5, base=base)
    assert torch.allclose(mid, torch.tensor([math.sqrt(0.5), math.sqrt(0.5)]))
    assert torch.allclose(merge_deltas("slerp", [a, b], t=0.0, base=base), a)
    assert torch.allclose(merge_deltas("slerp", [a, 2 * a], t=0.25, base=base), 1.25 * a)
    # with a base, the delta returned is slerp(θ₀ + τ₁, θ₀ + τ₂) − θ₀
    base = torch.tensor([1.0, 1.0])
    tau = merge_deltas("slerp", [a - base, b - base], t=0.5, base=base)
    assert torch.allclose(tau + base, torch.tensor([math.sqrt(0.5), math.sqrt(0.5)]))


# ---- random methods -------------------------------------------------------------------------


def test_dare_keeps_about_density_and_scales_kept_entries_exactly():
    t = torch.randn(400, 500, generator=torch.Generator().manual_seed(3))
    out = merge_deltas("dare_linear", [t], density=0.3, seed=7, name="w")
    kept = out != 0
    assert abs(kept.float().mean().item() - 0.3) < 0.005
    assert torch.equal(out[kept], t[kept] / 0.3)


def test_dare_l1_rescale_preserves_the_l1_norm():
    t = torch.randn(100, 100, generator=torch.Generator().manual_seed(4))
    out = merge_deltas("dare_linear", [t], density=0.5, rescale="l1")
    assert math.isclose(out.abs().sum().item(), t.abs().sum().item(), rel_tol=1e-5)


@pytest.mark.parametrize(
    "method", [m for m, spec in METHODS.items() if spec.random and not spec.knots]
)
def test_random_methods_depend_on_seed_and_name_only(method):
    g = torch.Generator().manual_seed(5)
    ts = [torch.randn(30, 40, generator=g) for _ in range(3)]
    other = [torch.randn(20, generator=g) for _ in range(3)]
    first = merge_deltas(method, ts, weights=W, density=0.5, seed=11, name="layer.0.w")
    merge_deltas(method, other, density=0.5, seed=11, name="layer.1.w")  # another tensor between
    again = merge_deltas(method, ts, weights=W, density=0.5, seed=11, name="layer.0.w")
    assert torch.equal(first, again)
    assert not torch.equal(
        first, merge_deltas(method, ts, weights=W, density=0.5, seed=12, name="layer.0.w")
    )
    assert not torch.equal(
        first, merge_deltas(method, ts, weights=W, density=0.5, seed=11, name="layer.1.w")
    )


def test_dare_ties_is_ties_vote_over_dare_masks():
    from langmerge.merge.methods import dare, generator

    g = torch.Generator().manual_seed(6)
    ts = [torch.randn(8, 8, generator=g) for _ in range(3)]
    masked = [dare(t.clone(), 0.5, generator(3, "x", i)) for i, t in enumerate(ts)]
    tau = merge_deltas("dare_ties", ts, weights=W, density=0.5, seed=3, name="x")
    assert torch.allclose(tau, ref_ties(masked, W), atol=1e-6)


def test_della_keep_probability_follows_magnitude_rank():
    t = torch.arange(1.0, 101.0).repeat(2000, 1)  # every row: ranks 0..99
    out = merge_deltas("della", [t], density=0.5, epsilon=0.2, seed=0, name="d")
    kept = (out != 0).float().mean(0)
    p = 0.3 + 0.4 * torch.arange(100) / 99
    assert torch.allclose(kept, p, atol=0.04)
    rows, cols = (out != 0).nonzero(as_tuple=True)
    assert torch.allclose(out[rows, cols], t[rows, cols] / p[cols], rtol=1e-5)


# ---- errors ---------------------------------------------------------------------------------


def test_unknown_method_lists_valid_names():
    with pytest.raises(ConfigError, match="valid methods: .*ties"):
        merge_deltas("tis", [T1])


@pytest.mark.parametrize("density", [0.0, -0.1, 1.5, float("nan")])
def test_density_outside_unit_interval_is_refused(density):
    with pytest.raises(ConfigError, match="density"):
        merge_deltas("ties", [T1, T2], density=density)


def test_linear_weights_summing_to_zero_are_refused():
    with pytest.raises(ConfigError, match="sum to zero"):
        merge_deltas("linear", [T1, T2], weights=[1.0, -1.0])


def test_shape_mismatch_and_model_counts():
    with pytest.raises(ConfigError, match="different shapes"):
        merge_deltas("ties", [T1, torch.zeros(3)])
    with pytest.raises(ConfigError, match="at least 2"):
        merge_deltas("model_stock", [T1])
    with pytest.raises(ConfigError, match="exactly 2"):
        merge_deltas("slerp", [T1, T2, T3], base=T1)


def test_every_method_runs_on_every_small_shape():
    for name, shape in itertools.product(METHODS, [(1,), (3,), (2, 5)]):
        spec = METHODS[name]
        if spec.knots or spec.data_aware:  # those take LoRA factors or Gram matrices
            continue
        ts = [torch.randn(shape) for _ in range(2)]
        out = merge_deltas(name, ts, density=0.5, base=torch.zeros(shape))
        assert out.shape == shape and torch.isfinite(out).all()


def test_ties_on_large_tensors_matches_a_sort_based_reference():
    """Tensors above 2^20 entries go through the sliced, selection-based path."""
    g = torch.Generator().manual_seed(8)
    ts = [torch.randn(1200, 1100, generator=g) for _ in range(3)]
    ts.append(torch.randint(-50, 50, (1200, 1100), generator=g).float())  # many equal |τ|
    weights, density = [1.0, 0.5, 2.0, 1.5], 0.3
    k = int(density * ts[0].numel())
    trimmed = []
    for t in ts:  # keep the k largest |τ|, ties to the lower index: a stable descending sort
        order = torch.sort(t.abs().reshape(-1), descending=True, stable=True).indices
        mask = torch.zeros(t.numel(), dtype=torch.bool)
        mask[order[:k]] = True
        trimmed.append(t * mask.view(t.shape))
    d = torch.stack([w * t for w, t in zip(weights, trimmed)])
    elected = torch.where(d.sum(0) >= 0, 1.0, -1.0)
    agree = (d != 0) & (torch.sign(d) == elected)
    num = (d * agree).sum(0)
    div = (torch.tensor(weights).view(-1, 1, 1) * agree).sum(0)
    expected = torch.where(div != 0, num / div, 0.0)
    tau = merge_deltas("ties", ts, weights=weights, density=density)
    assert torch.allclose(tau, expected, atol=1e-6)


def test_breadcrumbs_and_della_keep_everything_at_density_one():
    t = torch.randn(10, 20, generator=torch.Generator().manual_seed(9))
    assert torch.equal(merge_deltas("breadcrumbs", [t], density=1.0, gamma=0.1), t)
    assert torch.equal(merge_deltas("della", [t], density=1.0), t)


def test_della_l1_rescale_preserves_the_l1_norm():
    t = torch.randn(50, 80, generator=torch.Generator().manual_seed(10))
    out = merge_deltas("della", [t], density=0.5, rescale="l1")
    assert (out != 0).float().mean() < 0.7
    assert math.isclose(out.abs().sum().item(), t.abs().sum().item(), rel_tol=1e-5)


def test_model_stock_on_a_tensor_larger_than_a_slice():
    g = torch.Generator().manual_seed(11)
    common = torch.randn(1_200_000, generator=g)
    ts = [common + torch.randn(1_200_000, generator=g) for _ in range(3)]
    flat = [t.double() for t in ts]
    cos = [
        float(a @ b / (a.norm() * b.norm()))
        for a, b in [(flat[0], flat[1]), (flat[0], flat[2]), (flat[1], flat[2])]
    ]
    c = sum(cos) / 3
    expected = (3 * c / (1 + 2 * c)) * torch.stack(ts).mean(0)
    assert torch.allclose(merge_deltas("model_stock", ts), expected, atol=1e-5)


@pytest.mark.parametrize("rescale", ["density", "l1"])
def test_dare_ties_on_a_tensor_larger_than_a_slice_equals_whole_tensor_dare(rescale):
    from langmerge.merge.methods import dare, generator, ties_vote

    g = torch.Generator().manual_seed(12)
    ts = [torch.randn(1200, 1000, generator=g) for _ in range(2)]
    masked = [dare(t.clone(), 0.3, generator(4, "big", i), rescale) for i, t in enumerate(ts)]
    expected = ties_vote(masked, [1.0, 2.0], True)
    tau = merge_deltas(
        "dare_ties", ts, weights=[1.0, 2.0], density=0.3, seed=4, name="big", rescale=rescale
    )
    assert torch.equal(tau, expected)
    kept = masked[0] != 0
    assert abs(kept.float().mean().item() - 0.3) < 0.005


@pytest.mark.parametrize("name", ["ties", "dare_ties", "magnitude_prune", "dare_linear"])
def test_sliced_merge_equals_sparsify_then_combine_on_whole_tensors(name):
    from langmerge.merge.methods import MergeParams, get_method, sparsify, ties_vote, weighted_sum

    g = torch.Generator().manual_seed(13)
    ts = [torch.randn(1100, 1000, generator=g) for _ in range(3)]
    method, params = get_method(name), MergeParams(density=0.4, seed=2)
    sparse = [sparsify(method, t.clone(), i, params, "w") for i, t in enumerate(ts)]
    combine = ties_vote if method.combine == "ties" else weighted_sum
    expected = combine(sparse, W, method.normalize)
    assert torch.equal(merge_deltas(name, ts, weights=W, density=0.4, seed=2, name="w"), expected)
