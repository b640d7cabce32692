"""Paired statistics of per-subject scores: T-IMM against each other initialisation.

The paper compares methods on the same test subjects (its Fig. 4) but gives no test; here each
comparison gets the mean paired difference with a percentile-bootstrap confidence interval and a
two-sided Wilcoxon signed-rank p-value, and a family of comparisons gets Holm-adjusted p-values.
Those treat the test subjects as the only source of noise. Across a sweep of seeds,
:func:`hierarchical_bootstrap_ci` also resamples the seeds, i.e. the training randomness and the
draw of train/val subjects.
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
    """

    n_pairs: int
    mean_diff: float | None
    ci: tuple[float, float] | None
    p: float | None
    wins: int
    losses: int
    ties: int
    note: str = ""


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
    if n < min_pairs:
        return PairedComparison(
            n, mean, None, None, wins, losses, ties, f"fewer than {min_pairs} pairs: no test"
        )
    if ties == n:
        return PairedComparison(
            n, mean, (0.0, 0.0), None, wins, losses, ties, "identical scores on every subject: no test"
        )
    ci = bootstrap_mean_ci(d, n_boot, np.random.default_rng(seed), level)
    return PairedComparison(n, mean, ci, wilcoxon_p(d), wins, losses, ties)


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
