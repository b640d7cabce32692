"""Paired statistics on known data: exact Wilcoxon p by enumeration, bootstrap CIs, Holm."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from tmerge.report.stats import bootstrap_mean_ci, holm, match_pairs, paired_comparison, wilcoxon_p


def exact_signed_rank_p(diffs: list[float]) -> float:
    """Two-sided exact p of the signed-rank statistic by enumerating all 2^n sign patterns
    (no ties, no zeros): P(|W+ − n(n+1)/4| ≥ observed)."""
    n = len(diffs)
    ranks = {abs(d): r for r, d in enumerate(sorted(diffs, key=abs), start=1)}
    observed = sum(ranks[abs(d)] for d in diffs if d > 0)
    centre = n * (n + 1) / 4
    extreme = 0
    for signs in itertools.product((0, 1), repeat=n):
        w = sum(r for r, s in zip(range(1, n + 1), signs, strict=True) if s)
        extreme += abs(w - centre) >= abs(observed - centre) - 1e-12
    return extreme / 2**n


@pytest.mark.parametrize(
    "diffs, expected",
    [
        ([0.1, 0.2, 0.3, 0.4, 0.5], 2 / 32),  # all positive: only the two extreme patterns
        ([0.1, 0.2, 0.3, 0.4, -0.5], 20 / 32),  # W- = 5: 10 of 32 subsets sum to ≤ 5, doubled
        ([0.05, -0.15, 0.25, 0.35, 0.45, 0.55, -0.65], None),
    ],
)
def test_wilcoxon_matches_exact_enumeration(diffs, expected):
    p = wilcoxon_p(diffs)
    assert p == pytest.approx(exact_signed_rank_p(diffs))
    if expected is not None:
        assert p == pytest.approx(expected)


def test_wilcoxon_drops_zeros_and_is_undefined_without_differences():
    assert wilcoxon_p([0.0, 0.1, 0.2, 0.3, 0.4, 0.5]) == pytest.approx(2 / 32)
    assert wilcoxon_p([0.0, 0.0, 0.0]) is None


def test_bootstrap_ci_covers_or_excludes_zero_in_obvious_cases():
    rng = np.random.default_rng(0)
    clearly_positive = 0.1 + 0.01 * rng.standard_normal(30)
    lo, hi = bootstrap_mean_ci(clearly_positive, 2000, np.random.default_rng(1))
    assert 0 < lo < clearly_positive.mean() < hi
    centred = np.concatenate([clearly_positive, -clearly_positive])
    lo, hi = bootstrap_mean_ci(centred, 2000, np.random.default_rng(1))
    assert lo < 0 < hi
    # a constant sample has a zero-width interval at its value
    assert bootstrap_mean_ci([0.2] * 8, 100, np.random.default_rng(0)) == pytest.approx((0.2, 0.2))


def test_bootstrap_is_deterministic_with_a_seed():
    d = np.linspace(-0.1, 0.3, 17)
    a = bootstrap_mean_ci(d, 500, np.random.default_rng(7))
    b = bootstrap_mean_ci(d, 500, np.random.default_rng(7))
    c = bootstrap_mean_ci(d, 500, np.random.default_rng(8))
    assert a == b and a != c


def test_bootstrap_rejects_bad_arguments():
    with pytest.raises(ValueError, match="at least one"):
        bootstrap_mean_ci([], 10, np.random.default_rng(0))
    with pytest.raises(ValueError, match="n_boot"):
        bootstrap_mean_ci([1.0], 0, np.random.default_rng(0))
    with pytest.raises(ValueError, match="level"):
        bootstrap_mean_ci([1.0], 10, np.random.default_rng(0), level=1.5)


def test_pairs_are_matched_by_subject_id_not_position():
    ref = {"a": 0.9, "b": 0.5, "c": 0.7, "only_ref": 0.1}
    other = {"c": 0.6, "a": 0.8, "b": float("nan"), "only_other": 0.3}
    subjects, r, o = match_pairs(ref, other)
    assert subjects == ["a", "c"]
    assert r.tolist() == [0.9, 0.7] and o.tolist() == [0.8, 0.6]


def test_paired_comparison_on_known_data():
    gains = [0.10, 0.11, 0.12, 0.13, 0.14, 0.15, 0.16, -0.05]  # distinct |d|: no tied ranks
    ref = {f"s{i}": 0.9 - 0.01 * i for i in range(8)}
    other = {s: v - g for (s, v), g in zip(ref.items(), gains, strict=True)}
    result = paired_comparison(ref, other, n_boot=1000, seed=0)
    assert result.n_pairs == 8 and (result.wins, result.losses, result.ties) == (7, 1, 0)
    assert result.mean_diff == pytest.approx(sum(gains) / 8)
    assert result.ci is not None and result.ci[0] > 0
    # W- = 1 (the smallest |d| is the one loss): 2 · P(W ≤ 1) = 2 · 2/256
    assert result.p == pytest.approx(4 / 256)
    assert result.p == pytest.approx(exact_signed_rank_p([ref[s] - other[s] for s in ref]))
    assert result.note == ""
    # the same inputs and seed give the same interval
    assert paired_comparison(ref, other, n_boot=1000, seed=0).ci == result.ci


def test_paired_comparison_edge_cases_are_stated():
    few = paired_comparison({"a": 1.0, "b": 0.5}, {"a": 0.5, "b": 0.25}, min_pairs=6)
    assert few.n_pairs == 2 and few.p is None and few.ci is None and "fewer than 6" in few.note
    assert few.mean_diff == pytest.approx(0.375)
    same = {f"s{i}": 0.1 * i for i in range(10)}
    tied = paired_comparison(same, dict(same))
    assert tied.p is None and tied.ci == (0.0, 0.0) and tied.ties == 10 and "identical" in tied.note
    none = paired_comparison({"a": 1.0}, {"b": 1.0})
    assert none.n_pairs == 0 and none.mean_diff is None and "no subjects" in none.note


def test_holm_adjustment():
    # sorted p: 0.01 (×3), 0.03 (×2 = 0.06), 0.04 (×1 = 0.04 → kept monotone at 0.06)
    assert holm([0.04, 0.01, None, 0.03]) == pytest.approx([0.06, 0.03, None, 0.06])
    assert holm([0.9, 0.8]) == pytest.approx([1.0, 1.0])
    assert holm([]) == []
