"""Task arithmetic, TIES, DARE and SLERP against small hand-computed tensors."""

from __future__ import annotations

import math

import pytest
import torch

from tmerge.merge.task_vectors import (
    dare,
    dare_vector,
    slerp,
    slerp_tensor,
    task_arithmetic,
    ties,
    ties_vector,
    trim,
)


def sd(**tensors: list) -> dict[str, torch.Tensor]:
    return {k: torch.tensor(v, dtype=torch.float32) for k, v in tensors.items()}


def test_task_arithmetic_one_model_lambda_one_returns_the_model() -> None:
    torch.manual_seed(0)
    base = {"w": torch.randn(3, 4), "b": torch.randn(4), "steps": torch.tensor(7)}
    model = {"w": torch.randn(3, 4), "b": torch.randn(4), "steps": torch.tensor(9)}
    out = task_arithmetic([model], base, lam=1.0)
    assert torch.equal(out["w"], model["w"]) and torch.equal(out["b"], model["b"])
    assert torch.equal(out["steps"], model["steps"])  # integer buffers: from the first model


def test_task_arithmetic_by_hand() -> None:
    base = sd(w=[1.0, 1.0])
    m1, m2 = sd(w=[2.0, 0.0]), sd(w=[1.5, 3.0])
    # τ1 = [1, -1], τ2 = [0.5, 2]; θ0 + 0.5 (τ1 + τ2) = [1.75, 1.5]
    assert torch.allclose(task_arithmetic([m1, m2], base, lam=0.5)["w"], torch.tensor([1.75, 1.5]))


def test_trim_keeps_the_largest_magnitudes() -> None:
    tau = torch.tensor([0.1, -3.0, 2.0, -0.5, 1.0])
    assert torch.equal(trim(tau, 40), torch.tensor([0.0, -3.0, 2.0, 0.0, 0.0]))
    assert torch.equal(trim(tau, 100), tau)
    with pytest.raises(ValueError, match="k must be a percentage"):
        trim(tau, 0)


def test_ties_sign_election_on_three_models() -> None:
    """Entry 0: τ = +1, +2, −4 → summed mass −1 elects '−', so only −4 survives (plain averaging
    would give −1/3). Entry 1: +3, −1, −1 → mass +1 elects '+': 3. Entry 2: +1, +1, 0 → mean of
    the two agreeing values, the trimmed/zero one is left out: 1 (not 2/3)."""
    taus = [torch.tensor([1.0, 3.0, 1.0]), torch.tensor([2.0, -1.0, 1.0]), torch.tensor([-4.0, -1.0, 0.0])]
    assert torch.allclose(ties_vector(taus, k=100), torch.tensor([-4.0, 3.0, 1.0]))
    base = sd(w=[10.0, 10.0, 10.0])
    models = [{"w": base["w"] + t} for t in taus]
    assert torch.allclose(ties(models, base, k=100, lam=0.5)["w"], torch.tensor([8.0, 11.5, 10.5]))


def test_ties_trim_changes_the_election() -> None:
    # With k = 50 % (2 of 4 entries kept per vector) the small entries vanish before the election.
    taus = [torch.tensor([5.0, 0.1, -0.2, 4.0]), torch.tensor([-0.3, 6.0, 0.2, -5.0])]
    # trimmed: [5, 0, 0, 4] and [0, 6, 0, -5]; γ = sgn([5, 6, 0, -1]) = [+, +, 0, −]
    assert torch.allclose(ties_vector(taus, k=50), torch.tensor([5.0, 6.0, 0.0, -5.0]))


def test_dare_with_p_zero_is_exact_task_arithmetic() -> None:
    torch.manual_seed(1)
    base = {"w": torch.randn(5, 5)}
    models = [{"w": torch.randn(5, 5)} for _ in range(2)]
    out = dare(models, base, p=0.0, lam=0.5, seed=3)
    assert torch.allclose(out["w"], task_arithmetic(models, base, lam=0.5)["w"])


def test_dare_preserves_the_expectation() -> None:
    tau = torch.linspace(-2, 2, 50)
    g = torch.Generator().manual_seed(0)
    samples = torch.stack([dare_vector(tau, 0.7, g) for _ in range(4000)])
    kept = (samples != 0).float().mean()
    assert kept == pytest.approx(0.3, abs=0.01)  # drop rate p
    # The mean over masks approaches τ: standard error per entry ≈ |τ|·sqrt(p/(1−p)/n) ≤ 0.05.
    assert torch.allclose(samples.mean(0), tau, atol=0.15)
    assert (samples.mean(0) - tau).abs().mean() < 0.05


def test_dare_is_seeded_and_ties_variant_differs() -> None:
    torch.manual_seed(2)
    base = {"w": torch.zeros(100)}
    models = [{"w": torch.randn(100)} for _ in range(3)]
    a, b = dare(models, base, p=0.5, seed=4), dare(models, base, p=0.5, seed=4)
    assert torch.equal(a["w"], b["w"])
    assert not torch.equal(a["w"], dare(models, base, p=0.5, seed=5)["w"])
    assert not torch.equal(a["w"], dare(models, base, p=0.5, seed=4, ties_k=100)["w"])


def test_slerp_endpoints_and_orthogonal_midpoint() -> None:
    a, b = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    assert torch.allclose(slerp_tensor(a, b, 0.0), a) and torch.allclose(slerp_tensor(a, b, 1.0), b)
    h = 1 / math.sqrt(2)  # the geodesic midpoint of two orthogonal unit vectors
    assert torch.allclose(slerp_tensor(a, b, 0.5), torch.tensor([[h, h]]))
    # On a quarter circle, t = 1/3 lies at 30°.
    assert torch.allclose(slerp_tensor(a, b, 1 / 3), torch.tensor([[math.cos(math.pi / 6), 0.5]]))
    # Parallel vectors: linear interpolation.
    assert torch.allclose(slerp_tensor(a, 3 * a, 0.5), 2 * a)
    out = slerp([{"w": a, "n": torch.tensor(1)}, {"w": b, "n": torch.tensor(2)}], 0.5)
    assert torch.allclose(out["w"], torch.tensor([[h, h]])) and int(out["n"]) == 1


def test_mismatches_are_one_clear_error() -> None:
    base = sd(w=[0.0, 0.0])
    with pytest.raises(ValueError, match=r"'w' has shape \(3,\) in model 1, \(2,\) in model 0"):
        task_arithmetic([sd(w=[1.0, 2.0]), sd(w=[1.0, 2.0, 3.0])], base)
    with pytest.raises(ValueError, match="base lacks"):
        ties([sd(w=[1.0, 2.0], v=[1.0])], base)
    with pytest.raises(ValueError, match="exactly 2 models"):
        slerp([base])
    with pytest.raises(ValueError, match="dtype"):
        task_arithmetic([{"w": torch.zeros(2, dtype=torch.float64)}], base)


def test_regmean_is_the_least_squares_solution_on_a_linear_layer() -> None:
    """min_W Σ_t ‖X_t Wᵀ − X_t W_tᵀ‖² by lstsq on the stacked problem equals RegMean's closed form."""
    from tmerge.merge.task_vectors import regmean

    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(40, 5, generator=g, dtype=torch.float64) for _ in range(3)]
    ws = [torch.randn(2, 5, generator=g, dtype=torch.float64) for _ in range(3)]
    X = torch.cat(xs)  # (120, 5)
    Y = torch.cat([x @ w.T for x, w in zip(xs, ws, strict=True)])  # each model's outputs on its own inputs
    expected = torch.linalg.lstsq(X, Y).solution.T  # (2, 5)
    got = regmean(ws, [x.T @ x for x in xs])
    torch.testing.assert_close(got, expected)
    # Equal Gram matrices: the plain average.
    same = xs[0].T @ xs[0]
    torch.testing.assert_close(regmean(ws, [same] * 3), sum(ws) / 3)
    with pytest.raises(ValueError, match="Gram matrix"):
        regmean([ws[0]], [torch.eye(4, dtype=torch.float64)])


def test_dare_masks_do_not_depend_on_the_grouping_of_tensors() -> None:
    """Merging {a, b} at once or a and b separately (as per-layer overrides do) gives the same
    masks; and two tensors, or two models, never share a mask."""
    torch.manual_seed(3)
    base = {"a": torch.zeros(200), "b": torch.zeros(200)}
    models = [{k: torch.ones(200) for k in base} for _ in range(2)]
    together = dare(models, base, p=0.5, lam=1.0, seed=1)
    for k in base:
        alone = dare([{k: m[k]} for m in models], {k: base[k]}, p=0.5, lam=1.0, seed=1)
        assert torch.equal(together[k], alone[k])
    assert not torch.equal(together["a"], together["b"])
    one = dare(models[:1], base, p=0.5, seed=1)["a"]
    # Each model's kept entries are 2 (= 1/(1-p)); with independent masks the sum over the two
    # models also takes the value 2 somewhere (kept in one model only).
    assert set(together["a"].unique().tolist()) == {0.0, 2.0, 4.0} and set(one.unique().tolist()) == {0.0, 2.0}
