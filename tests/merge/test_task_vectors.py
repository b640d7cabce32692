"""Task arithmetic, TIES, DARE and SLERP against small hand-computed tensors."""

from __future__ import annotations

import math

import pytest
import torch

from tmerge.merge.task_vectors import (
    dare,
    dare_vector,
    kept_count,
    slerp,
    slerp_tensor,
    task_arithmetic,
    ties,
    ties_vector,
    trim,
    trim_model,
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


# ---- the semantics stated in tmerge.merge.task_vectors, on fixed cases computed by hand -------

# Two models of two tensors, 10 entries in all; τ_t = θ_t − θ₀ with θ₀ = 0.
TAU1 = {"a": [10.0, -1.0, 0.5, 2.0], "b": [0.1, 0.2, -9.0, 0.3, 8.0, 0.4]}
TAU2 = {"a": [-3.0, 4.0, 0.2, 0.1], "b": [0.5, -1.0, 0.3, 1.5, 0.2, -0.1]}
ZERO = {"a": [0.0] * 4, "b": [0.0] * 6}


def test_kept_count_rounds_up_and_trim_keeps_that_many() -> None:
    """⌈n·k/100⌉, at least one: 10 entries at 25 % → 3 (mergekit 2, Yadav et al. 3); at 20 % → 2
    (mergekit 2, Yadav et al. 3); 4 at 1 % → 1. Entries tied with the smallest kept are kept."""
    tau = torch.tensor([0.1, -9.0, 3.0, -0.2, 5.0, 0.3, 0.4, -0.5, 0.6, 0.7])
    assert (kept_count(10, 25), kept_count(10, 20), kept_count(4, 1), kept_count(0, 50)) == (3, 2, 1, 0)
    assert torch.equal(trim(tau, 25), torch.tensor([0.0, -9.0, 3.0, 0, 5.0, 0, 0, 0, 0, 0]))
    assert torch.equal(trim(tau, 20), torch.tensor([0.0, -9.0, 0, 0, 5.0, 0, 0, 0, 0, 0]))
    assert torch.equal(trim(torch.tensor([1.0, -2.0, 2.0, 0.5]), 1), torch.tensor([0.0, -2.0, 2.0, 0.0]))
    with pytest.raises(ValueError, match=r"k must be a percentage in \(0, 100\], got 120"):
        kept_count(10, 120)


def test_ties_trim_per_tensor_and_over_the_model_by_hand() -> None:
    """k = 25 %.

    trim="tensor" (mergekit): a keeps ⌈4/4⌉ = 1 entry, b ⌈6/4⌉ = 2 per model:
      τ̂1 = a [10, 0, 0, 0], b [0, 0, −9, 0, 8, 0];  τ̂2 = a [0, 4, 0, 0], b [0, −1, 0, 1.5, 0, 0].
    trim="model" (Yadav et al.): the 3 largest of each model's 10 entries:
      τ̂1 = 10, −9, 8 (as above);  τ̂2 = −3 and 4 in a, 1.5 in b: a [−3, 4, 0, 0], b [0, 0, 0, 1.5, 0, 0].
    Sign election and disjoint mean: a[0] has 10 and −3 under "model", summed mass +7 elects +,
    so 10 survives; b[1] is −1 under "tensor" (the small b of model 2 keeps two entries) and 0
    under "model" (its entries lose to a's).
    """
    models = [sd(**TAU1), sd(**TAU2)]
    base = sd(**ZERO)
    per_tensor = ties(models, base, k=25, lam=1.0, trim="tensor")
    per_model = ties(models, base, k=25, lam=1.0, trim="model")
    torch.testing.assert_close(per_tensor["a"], torch.tensor([10.0, 4.0, 0.0, 0.0]))
    torch.testing.assert_close(per_tensor["b"], torch.tensor([0.0, -1.0, -9.0, 1.5, 8.0, 0.0]))
    torch.testing.assert_close(per_model["a"], torch.tensor([10.0, 4.0, 0.0, 0.0]))
    torch.testing.assert_close(per_model["b"], torch.tensor([0.0, 0.0, -9.0, 1.5, 8.0, 0.0]))
    # λ scales the merged vector, θ₀ is added back
    shifted_models = [{n: v + 1 for n, v in m.items()} for m in models]
    shifted = ties(shifted_models, sd(a=[1.0] * 4, b=[1.0] * 6), k=25, lam=0.5, trim="model")
    torch.testing.assert_close(shifted["b"], torch.tensor([1.0, 1.0, -3.5, 1.75, 5.0, 1.0]))
    trimmed = trim_model({n: torch.tensor(v) for n, v in TAU2.items()}, 25)
    assert torch.equal(trimmed["a"], torch.tensor([-3.0, 4.0, 0.0, 0.0]))
    assert torch.equal(trimmed["b"], torch.tensor([0.0, 0.0, 0.0, 1.5, 0.0, 0.0]))


def _ties_as_in_the_paper(taus: list[dict[str, list[float]]], k: float) -> torch.Tensor:
    """Yadav et al.'s TIES on the flattened task vectors (keys sorted, concatenated), written from
    the paper's description: per model, zero all but the top-⌊d·k/100⌋ + 1 magnitudes (threshold:
    the (d − ⌊d·k/100⌋)-th smallest, kept with ≥); γ = sgn(Σ_t), zeros resolved to the sign of
    Σ γ; mean of the entries with sign γ."""
    flat = torch.stack([torch.cat([torch.tensor(t[n]) for n in sorted(t)]) for t in taus]).double()
    d = flat.shape[1]
    kth = flat.abs().sort(dim=1).values[:, d - int(d * k / 100) - 1 : d - int(d * k / 100)]
    trimmed = torch.where(flat.abs() >= kth, flat, 0.0)
    gamma = torch.sign(trimmed.sum(0))
    gamma[gamma == 0] = torch.sign(gamma.sum())
    keep = torch.where(gamma > 0, trimmed > 0, trimmed < 0)
    chosen = torch.where(keep, trimmed, 0.0)
    return chosen.sum(0) / keep.sum(0).clamp(min=1)


def test_ties_trim_model_reproduces_the_papers_whole_model_trim() -> None:
    """Where n·k/100 is not a whole number (10 · 25/100 = 2.5) the paper's code keeps ⌊2.5⌋ + 1 = 3
    as tmerge does; trim="model" then equals it entry for entry, trim="tensor" does not."""
    models = [sd(**TAU1), sd(**TAU2)]
    expected = _ties_as_in_the_paper([TAU1, TAU2], 25)
    got = ties(models, sd(**ZERO), k=25, trim="model")
    torch.testing.assert_close(torch.cat([got["a"], got["b"]]).double(), expected)
    other = ties(models, sd(**ZERO), k=25, trim="tensor")
    assert not torch.equal(torch.cat([other["a"], other["b"]]).double(), expected)
    with pytest.raises(ValueError, match=r"trim must be one of \('tensor', 'model'\), got 'layer'"):
        ties(models, sd(**ZERO), trim="layer")


def test_dare_at_p_zero_is_task_arithmetic_and_ties_exactly() -> None:
    models, base = [sd(**TAU1), sd(**TAU2)], sd(**ZERO)
    # task arithmetic by hand: θ₀ + 0.5 (τ1 + τ2)
    out = dare(models, base, p=0.0, lam=0.5)
    torch.testing.assert_close(out["a"], torch.tensor([3.5, 1.5, 0.35, 1.05]))
    for scope, b1 in (("tensor", -1.0), ("model", 0.0)):  # the by-hand TIES values above
        out = dare(models, base, p=0.0, lam=1.0, ties_k=25, trim=scope)
        torch.testing.assert_close(out["b"], torch.tensor([0.0, b1, -9.0, 1.5, 8.0, 0.0]))


def test_slerp_of_an_all_zero_tensor_follows_the_references() -> None:
    """A zero tensor has no direction: ω = π/2, so slerp(0, b, t) = sin(tπ/2)·b (mergekit,
    fusion-bench), not t·b; two zero tensors stay zero."""
    zero, b = torch.zeros(2), torch.tensor([3.0, 4.0])
    torch.testing.assert_close(slerp_tensor(zero, b, 0.5), torch.tensor([3.0, 4.0]) * math.sqrt(0.5))
    torch.testing.assert_close(slerp_tensor(zero, b, 1 / 3), torch.tensor([1.5, 2.0]))  # sin(π/6) = 1/2
    torch.testing.assert_close(slerp_tensor(b, zero, 1 / 3), b * math.cos(math.pi / 6))  # cos(tπ/2)·a
    assert torch.equal(slerp_tensor(zero, zero, 0.3), zero)


def test_slerp_of_nearly_parallel_tensors_is_linear_above_cos_0_9995() -> None:
    """Unit vectors at angle ω: slerp lies on the unit circle at angle tω; above |cos ω| = 0.9995
    both references interpolate linearly instead (the chord, shorter than 1), also antiparallel."""
    a = torch.tensor([1.0, 0.0], dtype=torch.float64)
    for cos, linear in ((0.999, False), (0.9996, True)):
        sin = math.sqrt(1 - cos**2)
        b = torch.tensor([cos, sin], dtype=torch.float64)
        omega = math.acos(cos)
        arc = torch.tensor([math.cos(0.5 * omega), math.sin(0.5 * omega)], dtype=torch.float64)
        chord = torch.tensor([(1 + cos) / 2, sin / 2], dtype=torch.float64)
        torch.testing.assert_close(slerp_tensor(a, b, 0.5), chord if linear else arc)
    torch.testing.assert_close(slerp_tensor(a, -2 * a, 0.5), -0.5 * a)  # antiparallel: linear
