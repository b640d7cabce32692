"""Per-subject pairs of T-IMM and each other initialisation (paper Fig. 4) and their statistics;
the page that shows them is :mod:`tmerge.report.stats_page`.

Subjects are matched by ID. Two analyses are made:

* seed-aware (sweep rows with ≥ 2 seeds): the paired differences of each seed, summarised by the
  mean over seeds with a hierarchical bootstrap CI (seeds, then subjects within a seed), so that
  the interval includes the training randomness and the draw of train/val subjects;
* per subject (every row): a single-seed row pairs the two runs directly; a sweep row first
  averages each subject's score over the seeds where *both* initialisations finished. These
  tests treat the test subjects as the only source of noise.

Beside every interval stands its minimal detectable difference
(:func:`tmerge.report.stats.minimal_detectable_difference`, 80 % power, two-sided at 1 − level):
from the seeds' mean differences in the seed-aware analysis, from the subjects' differences in
the per-subject one; the seed-aware table also says how many seeds would bring the interval's
half-width and the MDE to :data:`TARGET_DIFFERENCE` (:func:`tmerge.report.stats.seeds_needed`).
The same numbers are written as CSV (:func:`tmerge.report.stats_page.stats_csv`).
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from tmerge.report.runs import SINGLE, SWEEP, RunIndex, TargetRun
from tmerge.report.stats import (
    PairedComparison,
    hierarchical_bootstrap_ci,
    holm,
    match_pairs,
    minimal_detectable_difference,
    paired_comparison,
    seeds_needed,
)
from tmerge.report.tables import Row

#: The per-subject score that is compared: the mean Dice of ET, TC and WT (the paper's measure).
SCORE = "dice_mean"
#: Power of the minimal detectable difference printed beside every interval.
POWER = 0.8
#: The difference the seed-aware table asks "how many seeds to resolve": the size of the
#: paper's T-IMM − IMM (its Table 2 at 4 %–8 %).
TARGET_DIFFERENCE = 0.03


@dataclass(frozen=True)
class PairedScores:
    """Per-subject scores of ``reference`` and ``other`` in one table row."""

    row: Row
    reference: str
    other: str
    seeds: tuple[int, ...]  # the seeds averaged (sweeps); () for a single-seed row
    ref: dict[str, float]
    oth: dict[str, float]

    def differences(self) -> dict[str, float]:
        """``subject -> reference − other`` on the subjects both were tested on."""
        return {s: self.ref[s] - self.oth[s] for s in self.ref.keys() & self.oth.keys()}


@dataclass(frozen=True)
class Comparison:
    scores: PairedScores
    result: PairedComparison
    p_holm: float | None


def subject_means(runs: Sequence[TargetRun], column: str = SCORE) -> dict[str, float]:
    """``subject -> mean over runs`` for the subjects every run was tested on."""
    if not runs:
        return {}
    common = set.intersection(*(set(r.per_subject) for r in runs))
    return {s: statistics.fmean(r.per_subject[s][column] for r in runs) for s in sorted(common)}


def paired_scores(index: RunIndex, row: Row, reference: str, other: str) -> PairedScores | None:
    """The two initialisations' per-subject scores in ``row``; None if either has no finished run."""
    seeds: Sequence[int | None] = [None] if row.group == SINGLE else row.seeds
    pairs = [(index.find(row.portion, reference, s), index.find(row.portion, other, s)) for s in seeds]
    both = [(s, a, b) for s, (a, b) in zip(seeds, pairs, strict=True) if a and b and a.usable and b.usable]
    if not both:
        return None
    return PairedScores(
        row,
        reference,
        other,
        tuple(s for s, _, _ in both if s is not None),
        subject_means([a for _, a, _ in both]),
        subject_means([b for _, _, b in both]),
    )


def compare_row(
    index: RunIndex,
    row: Row,
    inits: Sequence[str],
    reference: str,
    *,
    n_boot: int,
    seed: int,
    min_pairs: int,
    level: float = 0.95,
) -> list[Comparison]:
    """``reference`` against every other initialisation of ``row`` that has a finished run; the
    row's tests form one family for the Holm adjustment."""
    found = [
        scores
        for other in inits
        if other != reference and (scores := paired_scores(index, row, reference, other)) is not None
    ]
    results = [
        paired_comparison(s.ref, s.oth, n_boot=n_boot, seed=seed, min_pairs=min_pairs, level=level)
        for s in found
    ]
    adjusted = holm([r.p for r in results])
    return [Comparison(s, r, p) for s, r, p in zip(found, results, adjusted, strict=True)]


# ---- seed-aware comparison -------------------------------------------------------------------

#: Initialisations that transfer from one source model: the rung of the ladder below IMM.
SINGLE_SOURCES: tuple[str, ...] = ("m1", "m2")
#: The initialisation without transfer: the bottom rung.
NO_TRANSFER = "none"
#: Below this many seeds the statistics page says how little the seed-aware interval can show.
FEW_SEEDS = 10


@dataclass(frozen=True)
class SeedComparison:
    """``reference − other`` in one sweep row: per seed, and the mean over seeds with its
    hierarchical bootstrap interval (:func:`tmerge.report.stats.hierarchical_bootstrap_ci`).

    Attributes:
        seeds: the seeds where both finished (and share a subject): the ones used.
        n_pairs: subjects paired in each of ``seeds``.
        seed_means: the mean paired difference of each of ``seeds``.
        mean: the mean of ``seed_means`` (every seed weighs the same).
        ci: the interval of ``mean``.
        left_out: seeds of the row where either initialisation has no finished run.
        sd: sample standard deviation (ddof = 1) of ``seed_means``; None with one seed.
        mde: the minimal detectable difference of ``sd`` over ``len(seeds)`` paired seeds
            (:data:`POWER`, two-sided at 1 − level); None with one seed.
    """

    row: Row
    reference: str
    other: str
    seeds: tuple[int, ...]
    n_pairs: tuple[int, ...]
    seed_means: tuple[float, ...]
    mean: float
    ci: tuple[float, float]
    left_out: tuple[int, ...] = ()
    sd: float | None = None
    mde: float | None = None
    level: float = 0.95

    def seeds_for(self, target: float, of: str) -> int | None:
        """Seeds that would bring the t interval's half-width (``of="halfwidth"``) or the MDE
        (``of="mde"``) to ``target`` at this ``sd``; None with one seed."""
        if self.sd is None:
            return None
        return seeds_needed(self.sd, target, of, alpha=1.0 - self.level, power=POWER)

    @property
    def separable(self) -> bool:
        """Whether the interval excludes 0."""
        return self.ci[0] > 0 or self.ci[1] < 0

    def verdict(self) -> str:
        if not self.separable:
            return "not separable from noise"
        return f"{self.reference if self.mean > 0 else self.other} better"


def seed_aware_rows(rows: Sequence[Row]) -> list[Row]:
    """The rows with a seed-aware comparison: sweeps over at least two seeds."""
    return [r for r in rows if r.group == SWEEP and len(r.seeds) >= 2]


def seed_differences(index: RunIndex, row: Row, reference: str, other: str) -> dict[int, np.ndarray]:
    """``seed -> reference − other`` per subject (matched by ID, finite scores only, sorted by
    ID) for each seed of ``row`` where both initialisations finished and share a subject."""
    out = {}
    for s in row.seeds:
        a, b = index.find(row.portion, reference, s), index.find(row.portion, other, s)
        if a is None or b is None or not (a.usable and b.usable):
            continue
        _, ref, oth = match_pairs(a.subject_values(SCORE), b.subject_values(SCORE))
        if ref.size:
            out[s] = ref - oth
    return out


def seed_comparison(
    index: RunIndex,
    row: Row,
    reference: str,
    other: str,
    *,
    n_boot: int,
    seed: int,
    level: float = 0.95,
) -> SeedComparison | None:
    """``reference − other`` over the seeds of ``row`` where both finished; None without any.

    Each comparison uses its own generator seeded with ``seed``, so its interval does not depend
    on the comparisons made before it.
    """
    diffs = seed_differences(index, row, reference, other)
    if not diffs:
        return None
    seeds = tuple(diffs)
    mean, lo, hi = hierarchical_bootstrap_ci([diffs[s] for s in seeds], n_boot, seed, level)
    seed_means = np.array([diffs[s].mean() for s in seeds])
    sd = float(seed_means.std(ddof=1)) if len(seeds) >= 2 else None
    return SeedComparison(
        row=row,
        reference=reference,
        other=other,
        seeds=seeds,
        n_pairs=tuple(diffs[s].size for s in seeds),
        seed_means=tuple(float(m) for m in seed_means),
        mean=mean,
        ci=(lo, hi),
        left_out=tuple(s for s in row.seeds if s not in diffs),
        sd=sd,
        mde=None if sd is None else minimal_detectable_difference(sd, len(seeds), 1.0 - level, POWER),
        level=level,
    )


def seed_pairs(inits: Sequence[str], reference: str) -> list[tuple[str, str]]:
    """The ``(reference, other)`` pairs of the seed-aware comparison among ``inits``.

    ``reference`` against every other initialisation; then IMM against the single sources and no
    transfer; then each single source against no transfer — so that the ladder
    T-IMM > IMM > single source > none can be read off rung by rung.
    """
    present = set(inits)
    pairs = [(reference, other) for other in inits if other != reference]
    ladder = [("imm", o) for o in (*SINGLE_SOURCES, NO_TRANSFER)]
    ladder += [(m, NO_TRANSFER) for m in SINGLE_SOURCES]
    for ref, other in ladder:
        if ref in present and other in present and (ref, other) not in pairs and (other, ref) not in pairs:
            pairs.append((ref, other))
    return pairs


def compare_seeds(
    index: RunIndex,
    row: Row,
    inits: Sequence[str],
    reference: str,
    *,
    n_boot: int,
    seed: int,
    level: float = 0.95,
) -> list[SeedComparison]:
    """Every pair of :func:`seed_pairs` that has finished runs at some seed of ``row``."""
    found = (
        seed_comparison(index, row, ref, other, n_boot=n_boot, seed=seed, level=level)
        for ref, other in seed_pairs(inits, reference)
    )
    return [c for c in found if c is not None]
