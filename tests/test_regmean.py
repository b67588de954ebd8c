"""RegMean pinned to its closed form W* = (Σ wᵢ ΔWᵢ Ĝᵢ)(Σ wᵢ Ĝᵢ)⁻¹ on small matrices."""

import pytest
import torch

from langmerge.errors import ConfigError, InputError
from langmerge.merge.regmean import regmean, regmean_lora, shrink


def gram(seed: int, rows: int = 50, dim: int = 6) -> torch.Tensor:
    x = torch.randn(rows, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return x.T @ x


def delta(seed: int, out: int = 4, dim: int = 6) -> torch.Tensor:
    return torch.randn(out, dim, generator=torch.Generator().manual_seed(seed))


def closed_form(deltas, grams, weights, alpha):
    """The formula, written out in float64 with an explicit inverse."""
    hats = [alpha * g + (1 - alpha) * torch.diag(torch.diag(g)) for g in grams]
    num = sum(w * d.double() @ h for w, d, h in zip(weights, deltas, hats))
    den = sum(w * h for w, h in zip(weights, hats))
    return (num @ torch.linalg.inv(den)).float()


@pytest.mark.parametrize("alpha", [1.0, 0.9, 0.5])
def test_dense_regmean_is_the_closed_form(alpha):
    deltas = [delta(i) for i in range(3)]
    grams = [gram(10 + i) for i in range(3)]
    got = regmean(deltas, grams, weights=[1.0, 0.5, 2.0], alpha=alpha)
    want = closed_form(deltas, grams, [1.0, 0.5, 2.0], alpha)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_shrink_scales_only_the_off_diagonal_entries():
    g = torch.tensor([[4.0, 2.0], [2.0, 9.0]])
    assert shrink(g, 0.25).tolist() == [[4.0, 0.5], [0.5, 9.0]]


def test_factored_regmean_equals_dense_and_is_a_lora_of_summed_rank():
    torch.manual_seed(0)
    factors = [(torch.randn(5, r), torch.randn(r, 7)) for r in (2, 3)]
    scalings = [2.0, 0.5]
    grams = [gram(1, dim=7), gram(2, dim=7)]
    b, a = regmean_lora(factors, scalings, grams, weights=[1.0, 3.0], alpha=0.9)
    assert b.shape == (5, 5) and a.shape == (5, 7)
    deltas = [s * B @ A for s, (B, A) in zip(scalings, factors)]
    dense = regmean(deltas, grams, weights=[1.0, 3.0], alpha=0.9)
    torch.testing.assert_close(b @ a, dense, rtol=1e-4, atol=1e-5)


def test_one_expert_gives_that_expert_back():
    d = delta(3)
    torch.testing.assert_close(regmean([d], [gram(4)]), d, rtol=1e-5, atol=1e-6)
    B, A = torch.randn(4, 2), torch.randn(2, 6)
    b, a = regmean_lora([(B, A)], [1.5], [gram(5)])
    torch.testing.assert_close(b @ a, 1.5 * B @ A, rtol=1e-5, atol=1e-5)


def test_equal_gram_matrices_give_the_weighted_mean():
    deltas = [delta(i) for i in range(3)]
    g = gram(7)
    got = regmean(deltas, [g, g, g], weights=[1.0, 1.0, 2.0])
    want = (deltas[0] + deltas[1] + 2 * deltas[2]) / 4
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_directions_no_input_reaches_keep_the_base_weight():
    # the last input feature is always 0 for every expert: ΣG is singular there
    x = torch.randn(40, 3, dtype=torch.float64)
    x[:, 2] = 0
    g = x.T @ x
    out = regmean([delta(1, dim=3), delta(2, dim=3)], [g, g], alpha=1.0)
    assert torch.isfinite(out).all()
    assert out[:, 2].abs().max() < 1e-6
    torch.testing.assert_close(out[:, :2], (delta(1, dim=3) + delta(2, dim=3))[:, :2] / 2)


def test_wrong_gram_shapes_and_weights_are_refused():
    with pytest.raises(InputError, match="6×6"):
        regmean([delta(1)], [gram(1, dim=5)])
    with pytest.raises(ConfigError, match="one Gram matrix per expert"):
        regmean([delta(1), delta(2)], [gram(1)])
    with pytest.raises(ConfigError, match="not all 0"):
        regmean([delta(1)], [gram(1)], weights=[0.0])
