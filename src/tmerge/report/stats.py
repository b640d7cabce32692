"""Paired statistics of per-subject scores: T-IMM against each other initialisation.

The paper compares methods on the same test subjects (its Fig. 4) but gives no test; here each
comparison gets the mean paired difference with a percentile-bootstrap confidence interval and a
two-sided Wilcoxon signed-rank p-value, and a family of comparisons gets Holm-adjusted p-values.
Those treat the test subjects as the only source of noise. Across a sweep of seeds,
:func:`hierarchical_bootstrap_ci` also resamples the seeds, i.e. the training randomness and the
draw of train/val subjects. Beside every interval, :func:`minimal_detectable_difference` says
how large a difference its pairs could have detected, and :func:`seeds_needed` how many pairs
would bring the interval's half-width or that difference down to a given size.
Everything is a pure function of the numbers it is given; randomness comes from a seeded
:class:`numpy.random.Generator`, so a report is reproducible.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class PairedComparison:
    """Reference − other on the subjects both were tested on.

    Attributes:
        n_pairs: subjects scored by both (non-finite scores left out).
        mean_diff: mean of reference − other; None when there are no pairs.
        ci: bootstrap confidence interval of ``mean_diff``; None when not computed.
        p: two-sided Wilcoxon signed-rank p-value; None when not computed (see ``note``).
        wins, losses, ties: subjects where the reference scored higher, lower, the same.
        note: why ``ci``/``p`` are missing, or "" when both were computed.
        sd: sample standard deviation (ddof = 1) of the paired differences; None below 2 pairs.
        mde: :func:`minimal_detectable_difference` of ``sd`` and ``n_pairs`` (80 % power,
            two-sided 5 %); None below 2 pairs.
    """

    n_pairs: int
    mean_diff: float | None
    ci: tuple[float, float] | None
    p: float | None
    wins: int
    losses: int
    ties: int
    note: str = ""
    sd: float | None = None
    mde: float | None = None


def match_pairs(
    reference: Mapping[str, float], other: Mapping[str, float]
) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Subjects scored (finitely) by both, sorted, and their two score vectors."""
    subjects = sorted(
        s for s in reference.keys() & other.keys() if math.isfinite(reference[s]) and math.isfinite(other[s])
    )
    ref = np.array([reference[s] for s in subjects], dtype=np.float64)
    oth = np.array([other[s] for s in subjects], dtype=np.float64)
    return subjects, ref, oth


def wilcoxon_p(diffs: Sequence[float] | np.ndarray) -> float | None:
    """Two-sided Wilcoxon signed-rank p-value of paired differences.

    Zero differences are dropped first (Wilcoxon's convention); with nothing left the test is
    undefined and None is returned. ``scipy.stats.wilcoxon`` picks the exact null distribution
    for small samples and the normal approximation for large ones.
    """
    from scipy.stats import wilcoxon

    d = np.asarray(diffs, dtype=np.float64)
    d = d[d != 0]
    if d.size == 0:
        return None
    return float(wilcoxon(d, alternative="two-sided").pvalue)


def bootstrap_mean_ci(
    diffs: Sequence[float] | np.ndarray, n_boot: int, rng: np.random.Generator, level: float = 0.95
) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of the mean of ``diffs``.

    Args:
        diffs: paired differences (at least one).
        n_boot: number of resamples (with replacement, each as large as ``diffs``).
        rng: the source of randomness (seed it for a reproducible interval).
        level: coverage, e.g. 0.95 for the 2.5 % and 97.5 % percentiles.

    Raises:
        ValueError: empty ``diffs``, ``n_boot < 1`` or ``level`` outside (0, 1).
    """
    d = np.asarray(diffs, dtype=np.float64)
    if d.size == 0:
        raise ValueError("bootstrap_mean_ci needs at least one difference, got none")
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must lie in (0, 1), got {level}")
    means = d[rng.integers(0, d.size, size=(n_boot, d.size))].mean(axis=1)
    tail = (1.0 - level) / 2.0
    lo, hi = np.quantile(means, [tail, 1.0 - tail])
    return float(lo), float(hi)


def paired_comparison(
    reference: Mapping[str, float],
    other: Mapping[str, float],
    *,
    n_boot: int = 10_000,
    seed: int = 0,
    min_pairs: int = 6,
    level: float = 0.95,
) -> PairedComparison:
    """Compare per-subject scores ``reference`` and ``other`` (``subject -> score``), paired by ID.

    Below ``min_pairs`` matched subjects only the mean difference is given: a two-sided Wilcoxon
    test on 5 pairs cannot go below p = 2/2⁵ = 0.0625, and a bootstrap of a handful of values is
    not an interval worth printing. When every difference is zero there is nothing to test:
    p is None and the interval is [0, 0].

    Each comparison draws from its own ``numpy.random.default_rng(seed)``, so its interval does
    not depend on which other comparisons were made before it.
    """
    subjects, ref, oth = match_pairs(reference, other)
    n = len(subjects)
    if n == 0:
        return PairedComparison(0, None, None, None, 0, 0, 0, "no subjects in common")
    d = ref - oth
    wins, losses = int((d > 0).sum()), int((d < 0).sum())
    ties = n - wins - losses
    mean = float(d.mean())
    sd = float(d.std(ddof=1)) if n >= 2 else None
    mde = None if sd is None else minimal_detectable_difference(sd, n)
    spread = {"sd": sd, "mde": mde}
    if n < min_pairs:
        return PairedComparison(
            n, mean, None, None, wins, losses, ties, f"fewer than {min_pairs} pairs: no test", **spread
        )
    if ties == n:
        note = "identical scores on every subject: no test"
        return PairedComparison(n, mean, (0.0, 0.0), None, wins, losses, ties, note, **spread)
    ci = bootstrap_mean_ci(d, n_boot, np.random.default_rng(seed), level)
    return PairedComparison(n, mean, ci, wilcoxon_p(d), wins, losses, ties, **spread)


# ---- power --------------------------------------------------------------------------------------


def _check_power_args(sd: float, alpha: float, power: float) -> None:
    if not (math.isfinite(sd) and sd >= 0):
        raise ValueError(f"sd must be a finite number >= 0, got {sd}")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must lie in (0, 1), got {alpha}")
    if not 0.0 < power < 1.0:
        raise ValueError(f"power must lie in (0, 1), got {power}")


def minimal_detectable_difference(sd: float, n: int, alpha: float = 0.05, power: float = 0.8) -> float:
    """The smallest true mean paired difference that a two-sided paired t-test at level ``alpha``
    detects with probability ``power``, from ``n`` pairs whose differences have standard
    deviation ``sd``:

        MDE = (t_{1−α/2, n−1} + t_{power, n−1}) · sd / √n

    with ``t_{q, n−1}`` the ``q`` quantile of Student's t with n − 1 degrees of freedom
    (``scipy.stats.t.ppf``). This is the standard closed form for a paired comparison (the
    noncentral t replaced by a central one shifted by the effect), used here for every n rather
    than the normal approximation (z_{0.975} + z_{0.8}) · sd / √n = 2.80 · sd / √n, because the
    comparisons it annotates have few pairs — 3 to 10 seeds — where the normal version promises
    far too much: the exact power (noncentral t) at 2.80 · sd / √n is 0.35 for 3 pairs and 0.70
    for 10. The t version is exact up to the shift approximation: at its MDE the exact power is
    0.766 for n = 3, 0.784 for 4, 0.791 for 5, 0.798 for 8, 0.799 for 10 and 0.800 from 20 on
    (it slightly understates the MDE below 5 pairs); as n grows it tends to the normal one.
    A test checks it against simulated paired t-tests.

    Which ``sd`` and ``n``: for the seed-aware comparison, the seeds' mean differences
    (n = seeds); for a per-subject comparison, the subjects' paired differences (n = subjects).

    Args:
        sd: sample standard deviation (ddof = 1) of the paired differences, ≥ 0.
        n: number of pairs, ≥ 2 (the t-test has n − 1 degrees of freedom).
        alpha: two-sided significance level, in (0, 1).
        power: probability of detecting a true difference of the MDE, in (0, 1).

    Returns:
        The MDE, in the units of ``sd`` (0 when ``sd`` is 0).

    Raises:
        ValueError: ``n < 2``, a negative or non-finite ``sd``, ``alpha`` or ``power`` outside (0, 1).
    """
    from scipy.stats import t

    _check_power_args(sd, alpha, power)
    if n < 2:
        raise ValueError(f"minimal_detectable_difference needs n >= 2 pairs, got {n}")
    df = n - 1
    return float((t.ppf(1.0 - alpha / 2.0, df) + t.ppf(power, df)) * sd / math.sqrt(n))


def ci_halfwidth(sd: float, n: int, level: float = 0.95) -> float:
    """Half-width ``t_{(1+level)/2, n−1} · sd / √n`` of the t confidence interval of a mean of ``n``
    paired differences with standard deviation ``sd`` (the t analogue of the report's bootstrap
    intervals, which it approaches as n grows).

    Raises:
        ValueError: ``n < 2``, a negative or non-finite ``sd``, ``level`` outside (0, 1).
    """
    from scipy.stats import t

    _check_power_args(sd, 1.0 - level, 0.5)
    if n < 2:
        raise ValueError(f"ci_halfwidth needs n >= 2 pairs, got {n}")
    return float(t.ppf((1.0 + level) / 2.0, n - 1) * sd / math.sqrt(n))


#: What :func:`seeds_needed` brings down to the target: the MDE or the interval's half-width.
MDE, HALFWIDTH = "mde", "halfwidth"


def seeds_needed(
    sd: float,
    target: float,
    of: str = MDE,
    *,
    alpha: float = 0.05,
    power: float = 0.8,
    max_n: int = 1_000_000,
) -> int:
    """The fewest pairs (seeds, or subjects) ``n ≥ 2`` whose :func:`minimal_detectable_difference`
    (``of="mde"``) or :func:`ci_halfwidth` at level 1 − ``alpha`` (``of="halfwidth"``) is at most
    ``target``, for paired differences of standard deviation ``sd``.

    Both quantities fall strictly as n grows, so the answer is found by doubling and bisection.
    ``sd`` is an estimate from the pairs at hand; the answer is as rough as it is.

    Args:
        sd: standard deviation (ddof = 1) of the paired differences, ≥ 0.
        target: the MDE or half-width wanted, > 0 (same units as ``sd``).
        of: ``"mde"`` or ``"halfwidth"``.
        alpha, power: as in :func:`minimal_detectable_difference`.
        max_n: give up above this many.

    Raises:
        ValueError: bad arguments, or more than ``max_n`` pairs would be needed.
    """
    _check_power_args(sd, alpha, power)
    if not (math.isfinite(target) and target > 0):
        raise ValueError(f"target must be a finite number > 0, got {target}")
    if of == MDE:

        def size(n: int) -> float:
            return minimal_detectable_difference(sd, n, alpha, power)
    elif of == HALFWIDTH:

        def size(n: int) -> float:
            return ci_halfwidth(sd, n, 1.0 - alpha)
    else:
        raise ValueError(f"of: expected {MDE!r} or {HALFWIDTH!r}, got {of!r}")
    low, high = 1, 2  # size(low) > target is the invariant (n = 1 has no test at all)
    while size(high) > target:
        if high >= max_n:
            raise ValueError(f"seeds_needed: more than max_n={max_n} pairs for {of} {target} at sd {sd}")
        low, high = high, min(2 * high, max_n)
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if size(mid) > target else (low, mid)
    return high


def holm(pvalues: Sequence[float | None]) -> list[float | None]:
    """Holm–Bonferroni adjusted p-values of one family of tests (None entries are not tests).

    The k-th smallest of m p-values becomes ``max_{j≤k} min(1, (m − j + 1) p_(j))``.
    """
    tested = sorted((p, i) for i, p in enumerate(pvalues) if p is not None)
    m = len(tested)
    out: list[float | None] = [None] * len(pvalues)
    running = 0.0
    for rank, (p, i) in enumerate(tested):
        running = max(running, min(1.0, (m - rank) * p))
        out[i] = running
    return out


# Upper bound on the values drawn at once by the hierarchical bootstrap (8 bytes each): 4 M values
# keep a chunk at 32 MB however many resamples, seeds and subjects there are.
_MAX_DRAWS = 4_000_000


def hierarchical_bootstrap_ci(
    diffs_per_seed: Sequence[Sequence[float] | np.ndarray],
    n_boot: int,
    seed: int,
    level: float = 0.95,
) -> tuple[float, float, float]:
    """Mean paired difference over seeds, with a two-level percentile bootstrap interval.

    The quantity estimated is the mean over training runs (seeds) of each run's mean paired
    difference, every seed weighing the same whatever its number of subjects. A resample draws
    as many seeds as there are, with replacement, then within each drawn seed as many subjects as
    it has, with replacement, and takes the mean over the drawn seeds of the mean of their drawn
    differences. The interval is the ``(1 − level)/2`` and ``(1 + level)/2`` quantiles of the
    ``n_boot`` resampled means.

    Draws, in this order, from ``numpy.random.default_rng(seed)``: the seeds as
    ``integers(0, S, size=(n_boot, S))``, then the subjects (uniform ``random`` numbers scaled to
    each drawn seed's size, in chunks of resamples). Where every subject of a seed has the same
    difference, the subject draws change nothing and the interval is that of a plain bootstrap
    of the seed means with the same seed draws.

    Args:
        diffs_per_seed: per seed, the paired differences (reference − other) of its subjects;
            each at least one finite value.
        n_boot: number of resamples.
        seed: of the generator; the same inputs and seed give the same interval.
        level: coverage, e.g. 0.95.

    Returns:
        ``(mean over seeds of the per-seed means, low, high)``.

    Raises:
        ValueError: no seeds, a seed without differences or with a non-finite one,
            ``n_boot < 1`` or ``level`` outside (0, 1).
    """
    arrays = [np.asarray(d, dtype=np.float64).ravel() for d in diffs_per_seed]
    if not arrays:
        raise ValueError("hierarchical_bootstrap_ci needs at least one seed, got none")
    for k, a in enumerate(arrays):
        if a.size == 0:
            raise ValueError(f"hierarchical_bootstrap_ci: seed #{k} has no differences")
        if not np.isfinite(a).all():
            raise ValueError(f"hierarchical_bootstrap_ci: seed #{k} has a non-finite difference")
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must lie in (0, 1), got {level}")
    n_seeds = len(arrays)
    sizes = np.array([a.size for a in arrays], dtype=np.int64)
    width = int(sizes.max())
    # Seeds may have different numbers of subjects (a non-finite score is left out): pad to one
    # matrix and mask, so that one fancy-indexing step resamples every seed of every resample.
    padded = np.zeros((n_seeds, width), dtype=np.float64)
    for k, a in enumerate(arrays):
        padded[k, : a.size] = a
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, n_seeds, size=(n_boot, n_seeds))
    means = np.empty(n_boot, dtype=np.float64)
    chunk = max(1, _MAX_DRAWS // (n_seeds * width))
    columns = np.arange(width)
    for start in range(0, n_boot, chunk):
        drawn = picks[start : start + chunk]  # (b, S) seed indices
        n = sizes[drawn][..., None]  # (b, S, 1) subjects of each drawn seed
        u = rng.random((drawn.shape[0], n_seeds, width))
        # floor(u·n) is uniform on 0..n−1; the minimum guards against u·n rounding up to n.
        subjects = np.minimum((u * n).astype(np.int64), n - 1)
        values = padded[drawn[..., None], subjects]
        seed_means = np.where(columns < n, values, 0.0).sum(axis=-1) / n[..., 0]
        means[start : start + chunk] = seed_means.mean(axis=-1)
    tail = (1.0 - level) / 2.0
    lo, hi = np.quantile(means, [tail, 1.0 - tail])
    return float(np.mean([a.mean() for a in arrays])), float(lo), float(hi)
