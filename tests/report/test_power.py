"""The minimal detectable difference against simulated paired t-tests, and the seed counts.

Each simulation draws N experiments of n normal paired differences and runs the two-sided paired
t-test at 5 % on each (``scipy.stats.ttest_1samp``, vectorised over experiments). The rejection
rate is a binomial proportion with standard error √(p(1 − p)/N): 0.0063 at p = 0.8 and 0.0034 at
p = 0.05 for N = 4000. The tolerance is 4 standard errors (a correct formula misses it with
probability 6e-5; the generator is seeded, so a run is repeatable). It is tight enough to fail the
normal approximation 2.80 · sd / √n, whose power is 0.70 at n = 10 and 0.56 at n = 5.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from tmerge.report.stats import (
    HALFWIDTH,
    MDE,
    ci_halfwidth,
    minimal_detectable_difference,
    paired_comparison,
    seeds_needed,
)

N_EXPERIMENTS = 4000
ALPHA = 0.05


def rejection_rate(mean: float, sd: float, n: int, seed: int) -> float:
    """Share of N_EXPERIMENTS paired t-tests (two-sided, ALPHA) that reject a zero mean, the
    differences drawn as N(mean, sd²)."""
    diffs = np.random.default_rng(seed).normal(mean, sd, size=(N_EXPERIMENTS, n))
    p = stats.ttest_1samp(diffs, 0.0, axis=1).pvalue
    return float((p < ALPHA).mean())


def tolerance(p: float) -> float:
    """Four binomial standard errors of a rejection rate p over N_EXPERIMENTS experiments."""
    return 4 * math.sqrt(p * (1 - p) / N_EXPERIMENTS)


@pytest.mark.parametrize("n, sd", [(8, 0.03), (10, 0.03), (40, 0.2)])
def test_a_true_difference_of_the_mde_is_detected_80_percent_of_the_time(n, sd):
    mde = minimal_detectable_difference(sd, n)
    assert abs(rejection_rate(mde, sd, n, seed=n) - 0.80) <= tolerance(0.80)


def test_below_five_pairs_the_formula_promises_a_little_more_than_it_gives():
    """The shortfall the docstring states for n = 3 (exact power 0.766, from the noncentral t) is
    what a simulation sees."""
    mde = minimal_detectable_difference(1.0, 3)
    critical = stats.t.ppf(1 - ALPHA / 2, 2)
    exact = stats.nct.sf(critical, 2, mde * math.sqrt(3)) + stats.nct.cdf(-critical, 2, mde * math.sqrt(3))
    assert exact == pytest.approx(0.766, abs=5e-4)
    assert abs(rejection_rate(mde, 1.0, 3, seed=3) - exact) <= tolerance(exact)


@pytest.mark.parametrize("n", [3, 10, 40])
def test_without_a_difference_the_test_rejects_at_its_level(n):
    assert abs(rejection_rate(0.0, 0.03, n, seed=100 + n) - ALPHA) <= tolerance(ALPHA)


def test_the_normal_approximation_would_fail_the_simulation():
    """The simulation can tell the t formula from 2.80 · sd / √n at 10 pairs."""
    z = (stats.norm.ppf(0.975) + stats.norm.ppf(0.8)) * 0.03 / math.sqrt(10)
    assert abs(rejection_rate(z, 0.03, 10, seed=10) - 0.80) > tolerance(0.80)


def test_the_issues_numbers():
    """Seed-level sd 0.03 (issue 20): 3 seeds resolve ±0.075, 10 paired seeds have MDE 0.03."""
    assert ci_halfwidth(0.03, 3) == pytest.approx(0.0745, abs=5e-4)
    assert minimal_detectable_difference(0.03, 10) == pytest.approx(0.0298, abs=5e-4)
    # large n: the normal approximation (1.960 + 0.842) · sd / √n
    assert minimal_detectable_difference(1.0, 10_000) == pytest.approx(2.8016 / 100, rel=1e-3)
    assert minimal_detectable_difference(0.0, 5) == 0.0


def first_n(size, target: float) -> int:
    """The smallest n ≥ 2 with size(n) ≤ target, by counting up."""
    n = 2
    while size(n) > target:
        n += 1
    return n


@pytest.mark.parametrize("sd, target", [(0.03, 0.03), (0.03, 0.021), (0.05, 0.01), (0.01, 0.5)])
def test_seeds_needed_is_the_first_n_that_gets_there(sd, target):
    def mde(n):
        return (stats.t.ppf(0.975, n - 1) + stats.t.ppf(0.8, n - 1)) * sd / math.sqrt(n)

    def halfwidth(n):
        return stats.t.ppf(0.975, n - 1) * sd / math.sqrt(n)

    assert seeds_needed(sd, target, MDE) == first_n(mde, target)
    assert seeds_needed(sd, target, HALFWIDTH) == first_n(halfwidth, target)


def test_seeds_needed_known_values():
    assert seeds_needed(0.03, 0.03, MDE) == 10  # MDE 0.0298 at 10, 0.0320 at 9
    assert seeds_needed(0.03, 0.03, HALFWIDTH) == 7  # 2.571 · 0.03/√6 = 0.0315, 2.447 · 0.03/√7 = 0.0277
    assert seeds_needed(0.0, 0.01) == 2


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="n >= 2"):
        minimal_detectable_difference(0.1, 1)
    with pytest.raises(ValueError, match="sd"):
        minimal_detectable_difference(-0.1, 5)
    with pytest.raises(ValueError, match="power"):
        minimal_detectable_difference(0.1, 5, power=1.0)
    with pytest.raises(ValueError, match="alpha"):
        minimal_detectable_difference(0.1, 5, alpha=0.0)
    with pytest.raises(ValueError, match="target"):
        seeds_needed(0.1, 0.0)
    with pytest.raises(ValueError, match="of:"):
        seeds_needed(0.1, 0.1, "width")
    with pytest.raises(ValueError, match="max_n=100"):
        seeds_needed(1.0, 1e-3, max_n=100)


def test_paired_comparison_carries_sd_and_mde_of_the_subjects():
    ref = {f"s{i}": 0.5 + 0.01 * i for i in range(8)}
    oth = {f"s{i}": 0.5 - 0.01 * i * (i % 2) for i in range(8)}
    diffs = np.array([ref[s] - oth[s] for s in sorted(ref)])
    r = paired_comparison(ref, oth, n_boot=100)
    assert r.sd == pytest.approx(diffs.std(ddof=1))
    assert r.mde == pytest.approx((stats.t.ppf(0.975, 7) + stats.t.ppf(0.8, 7)) * r.sd / math.sqrt(8))
    few = paired_comparison({"a": 0.1, "b": 0.2}, {"a": 0.0, "b": 0.0}, n_boot=10)
    assert few.ci is None and few.mde is not None  # no test, but the MDE says how far off one is
    assert paired_comparison({"a": 0.1}, {"a": 0.0}, n_boot=10).mde is None
