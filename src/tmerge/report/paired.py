"""Per-subject pairs of T-IMM and each other initialisation (paper Fig. 4) and their statistics
(``stats.md``).

Subjects are matched by ID. A single-seed row pairs the two runs directly; a sweep row first
averages each subject's score over the seeds where *both* initialisations finished, so that the
two sides always see the same seeds.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass

from tmerge.report.runs import SINGLE, RunIndex, TargetRun
from tmerge.report.stats import PairedComparison, holm, paired_comparison
from tmerge.report.tables import MISSING, Row, md_table

#: The per-subject score that is compared: the mean Dice of ET, TC and WT (the paper's measure).
SCORE = "dice_mean"


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


def _p(p: float | None) -> str:
    if p is None:
        return MISSING
    return "< 0.0001" if p < 1e-4 else f"{p:.4f}"


def stats_markdown(
    comparisons: dict[Row, list[Comparison]],
    inits: Sequence[str],
    reference: str,
    *,
    n_boot: int,
    seed: int,
    min_pairs: int,
    level: float = 0.95,
) -> str:
    """``stats.md``: one table per row of Table 2, one line per comparison."""
    parts = [
        f"# Paired statistics — {reference} against each other initialisation\n",
        f"Per-subject mean Dice of ET, TC and WT (`{SCORE}` in `test_per_subject.csv`), "
        f"{reference} − other, pairs matched by subject ID. Sweeps: each subject's score averaged "
        "over the seeds where both initialisations finished. Mean difference with a percentile "
        f"bootstrap {level:.0%} CI ({n_boot} resamples, `numpy.random.default_rng({seed})` per "
        "comparison); p: two-sided Wilcoxon signed-rank test (`scipy.stats.wilcoxon`, zero "
        "differences dropped); p (Holm): adjusted over the comparisons of the same row. "
        f"With fewer than {min_pairs} pairs, or identical scores on every subject, no test is "
        f"made ({MISSING}) and the note says so. Wins / losses / ties: subjects where {reference} "
        "scored higher / lower / the same.\n",
    ]
    header = ["other", "seeds", "pairs", "mean diff", f"{level:.0%} CI", "p", "p (Holm)", "W / L / T", "note"]
    for row, found in comparisons.items():
        title = f"## {row.label()}\n\n"
        if not found:
            parts.append(
                title + f"No comparison: {reference} or every other initialisation lacks a finished run.\n"
            )
            continue
        body = []
        for c in found:
            r = c.result
            body.append(
                [
                    c.scores.other,
                    " ".join(map(str, c.scores.seeds)) or "—",
                    str(r.n_pairs),
                    MISSING if r.mean_diff is None else f"{r.mean_diff:+.4f}",
                    MISSING if r.ci is None else f"[{r.ci[0]:+.4f}, {r.ci[1]:+.4f}]",
                    _p(r.p),
                    _p(c.p_holm),
                    f"{r.wins} / {r.losses} / {r.ties}",
                    r.note,
                ]
            )
        compared = {c.scores.other for c in found}
        absent = [i for i in inits if i != reference and i not in compared]
        tail = f"\nNot compared (no finished run): {', '.join(absent)}.\n" if absent else ""
        parts.append(title + md_table(header, body) + tail)
    return "\n".join(parts)
