"""The statistics page of a report (:data:`tmerge.report.files.STATS_MD`) and its CSV: the
comparisons of :mod:`tmerge.report.paired` as tables, with what their columns mean.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Mapping, Sequence

from tmerge.report.paired import (
    FEW_SEEDS,
    POWER,
    SCORE,
    TARGET_DIFFERENCE,
    Comparison,
    SeedComparison,
)
from tmerge.report.stats import HALFWIDTH, MDE
from tmerge.report.tables import MISSING, Row, md_table
from tmerge.runs import PER_SUBJECT_FILE


def _p(p: float | None) -> str:
    if p is None:
        return MISSING
    return "< 0.0001" if p < 1e-4 else f"{p:.4f}"


def few_seeds_note(n_seeds: int) -> str:
    """The warning printed above a seed-aware table with fewer than :data:`FEW_SEEDS` seeds."""
    word = "seed" if n_seeds == 1 else "seeds"
    text = (
        f"{n_seeds} {word}: the CI reflects only {n_seeds} draw{'s' if n_seeds != 1 else ''} of "
        "training randomness and of train/val subjects; a difference whose CI contains 0 is not "
        "an effect."
    )
    if n_seeds >= 2:
        # The percentile bootstrap of a mean sees the seeds' variance times (k − 1)/k, and there
        # are only C(2k − 1, k) distinct multisets of k seeds: say both, they make it too narrow.
        text += (
            f" Over {n_seeds} seeds the bootstrap also understates the spread between seeds (it sees "
            f"{n_seeds - 1}/{n_seeds} of their variance, in {math.comb(2 * n_seeds - 1, n_seeds)} "
            "distinct sets of seeds), so an interval that excludes 0 is a hint, not a finding."
        )
    return text


def _signed(values: Sequence[float]) -> str:
    return ", ".join(f"{v:+.4f}" for v in values)


def _mde(value: float | None) -> str:
    return MISSING if value is None else f"{value:.4f}"


def _seeds_for(c: SeedComparison, target: float) -> str:
    if c.sd is None:
        return MISSING
    return f"{c.seeds_for(target, HALFWIDTH)} / {c.seeds_for(target, MDE)}"


def mde_text(level: float, target: float | None = None) -> str:
    """What the MDE column (and, with ``target``, the seeds column) of the statistics page means."""
    text = (
        f"MDE: the minimal detectable difference — the smallest true difference that these pairs "
        f"would detect with {POWER:.0%} power in a two-sided paired t-test at {1 - level:.0%}: "
        f"(t_{{1−α/2, n−1}} + t_{{{POWER:g}, n−1}}) · sd / √n, with sd the standard deviation of the "
        "n paired differences (`tmerge.report.stats.minimal_detectable_difference`). A comparison whose "
        "interval contains 0 says nothing about differences smaller than its MDE: they may exist, "
        "these runs could not see them."
    )
    if target is not None:
        text += (
            f" Seeds for ±{target:g} / MDE {target:g}: at the sd of the per-seed mean differences, "
            f"how many seeds would bring the t interval's half-width (t_{{1−α/2, n−1}} · sd / √n) "
            f"to {target:g}, and how many the MDE (`tmerge.report.stats.seeds_needed`); "
            f"{target:g} is about the paper's T-IMM − IMM. The sd is itself estimated from the "
            "seeds at hand: with few seeds, read these counts as rough."
        )
    return text


def seed_aware_markdown(
    comparisons: Mapping[Row, Sequence[SeedComparison]],
    *,
    n_boot: int,
    seed: int,
    level: float = 0.95,
    other_rows: Sequence[Row] = (),
    target: float = TARGET_DIFFERENCE,
) -> str:
    """The seed-aware section of the statistics page: one table per sweep row with ≥ 2 seeds.

    Args:
        comparisons: per sweep row, its comparisons (:func:`compare_seeds`).
        n_boot, seed, level: as passed to the bootstrap (stated in the text).
        other_rows: rows without a seed-aware comparison, named so that their absence is seen.
        target: the half-width and MDE the "seeds for" column asks about.
    """
    parts = [
        "## Seed-aware comparison (training variance included)\n",
        f"Per seed, the paired differences of `{SCORE}` (reference − other, matched by subject ID) "
        "on the test subjects, which are the same for every seed and initialisation; each seed "
        "has its own training randomness and its own draw of train/val subjects. Per-seed mean: "
        "the mean difference of each seed; mean: their mean, every seed weighing the same. "
        f"{level:.0%} CI: hierarchical percentile bootstrap — resample the seeds with replacement, "
        "then the subjects with replacement within each drawn seed, and take the mean of the "
        f"paired differences ({n_boot} resamples, `numpy.random.default_rng({seed})` per "
        'comparison). A comparison whose CI contains 0 is marked "not separable from noise". '
        "Seeds > 0: seeds whose mean difference is positive. Comparisons: the reference against "
        "every other initialisation, then IMM against the single sources and no transfer, then "
        "the single sources against no transfer, so that T-IMM > IMM > single source > none "
        "can be read off rung by rung. Seeds where either side has no finished run are left "
        "out and named. "
        + mde_text(level, target)
        + " Here n is the number of seeds and sd that of their mean differences.\n",
    ]
    if not comparisons:
        parts.append(
            "No portion has a sweep over ≥ 2 seeds (`tmerge sweep portion=… seeds=[0,1,2]`): "
            "no seed-aware comparison. The per-subject tests below cannot tell an effect of the "
            "initialisation from one of the training run.\n"
        )
    header = [
        "comparison",
        "seeds",
        "pairs",
        "per-seed mean diff",
        "seeds > 0",
        "mean diff",
        f"{level:.0%} CI",
        f"MDE ({POWER:.0%})",
        f"seeds for ±{target:g} / MDE {target:g}",
        "verdict",
    ]
    for row, found in comparisons.items():
        title = f"### {row.label()}\n\n"
        if not found:
            parts.append(title + "No comparison: no two initialisations finished at a common seed.\n")
            continue
        n_seeds = max(len(c.seeds) for c in found)
        note = few_seeds_note(n_seeds) + "\n\n" if n_seeds < FEW_SEEDS else ""
        body = []
        for c in found:
            pairs = sorted(set(c.n_pairs))
            body.append(
                [
                    f"{c.reference} − {c.other}",
                    " ".join(map(str, c.seeds))
                    + (f" (not {' '.join(map(str, c.left_out))})" if c.left_out else ""),
                    str(pairs[0]) if len(pairs) == 1 else ", ".join(map(str, c.n_pairs)),
                    _signed(c.seed_means),
                    f"{sum(m > 0 for m in c.seed_means)} / {len(c.seed_means)}",
                    f"{c.mean:+.4f}",
                    f"[{c.ci[0]:+.4f}, {c.ci[1]:+.4f}]",
                    _mde(c.mde),
                    _seeds_for(c, target),
                    c.verdict() + (" (1 seed: subjects only)" if len(c.seeds) == 1 else ""),
                ]
            )
        parts.append(title + note + md_table(header, body))
    if other_rows:
        parts.append(
            "No seed-aware comparison for "
            + ", ".join(f"{r.label()}" for r in other_rows)
            + ": at most one training run per initialisation, which says nothing about training "
            "variance.\n"
        )
    return "\n".join(parts)


def stats_markdown(
    comparisons: dict[Row, list[Comparison]],
    inits: Sequence[str],
    reference: str,
    *,
    n_boot: int,
    seed: int,
    min_pairs: int,
    level: float = 0.95,
    seed_aware: Mapping[Row, Sequence[SeedComparison]] | None = None,
    target: float = TARGET_DIFFERENCE,
    scoring: str | None = None,
) -> str:
    """The statistics page: the seed-aware comparison of each sweep row (when ``seed_aware`` is given),
    then the per-subject tests, one table per row of Table 2, one line per comparison. ``scoring``:
    how the compared Dice were scored (e.g. "empty regions: brats2018"), said under the title."""
    parts = [f"# Paired statistics — {reference} against each other initialisation\n"]
    if scoring:
        parts.append(f"Dice scored with {scoring} (Table 2 says what the rules mean).\n")
    if seed_aware is not None:
        others = [r for r in comparisons if r not in seed_aware]
        parts.append(
            seed_aware_markdown(
                seed_aware, n_boot=n_boot, seed=seed, level=level, other_rows=others, target=target
            )
        )
    parts.append(
        "## Per-subject tests (ignore training variance)\n\n"
        "These tests treat the test subjects as the only source of noise: each initialisation is "
        "one training run (or, for a sweep, a per-subject average over seeds), so a small p says "
        "the two runs differ on these subjects, not that the initialisation would win again with "
        "another seed or another draw of train/val subjects. Read the seed-aware comparison above "
        "for that.\n\n"
        f"Per-subject mean Dice of ET, TC and WT (`{SCORE}` in `{PER_SUBJECT_FILE}`), "
        f"{reference} − other, pairs matched by subject ID. Sweeps: each subject's score averaged "
        "over the seeds where both initialisations finished. Mean difference with a percentile "
        f"bootstrap {level:.0%} CI over subjects ({n_boot} resamples, `numpy.random.default_rng({seed})` per "
        "comparison); p: two-sided Wilcoxon signed-rank test (`scipy.stats.wilcoxon`, zero "
        "differences dropped); p (Holm): adjusted over the comparisons of the same row. "
        f"With fewer than {min_pairs} pairs, or identical scores on every subject, no test is "
        f"made ({MISSING}) and the note says so (the MDE is given from 2 pairs on). Wins / losses / "
        f"ties: subjects where {reference} scored higher / lower / the same. "
        + mde_text(level)
        + " Here n is the number of subjects paired and sd that of their differences.\n"
    )
    header = [
        "other",
        "seeds",
        "pairs",
        "mean diff",
        f"{level:.0%} CI",
        f"MDE ({POWER:.0%})",
        "p",
        "p (Holm)",
        "W / L / T",
        "note",
    ]
    for row, found in comparisons.items():
        title = f"### {row.label()}\n\n"
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
                    _mde(r.mde),
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


#: Columns of :func:`stats_csv`.
STATS_CSV_COLUMNS: tuple[str, ...] = (
    "analysis",
    "portion",
    "runs",
    "seeds",
    "reference",
    "other",
    "n",
    "mean_diff",
    "ci_low",
    "ci_high",
    "sd",
    "mde",
    "seeds_for_halfwidth",
    "seeds_for_mde",
    "target",
    "p",
    "p_holm",
    "verdict",
)


def stats_csv(
    comparisons: Mapping[Row, Sequence[Comparison]],
    seed_aware: Mapping[Row, Sequence[SeedComparison]] | None = None,
    target: float = TARGET_DIFFERENCE,
) -> str:
    """The statistics page's numbers as CSV (:data:`STATS_CSV_COLUMNS`), one line per comparison;
    an empty cell is a value not computed.

    ``analysis`` is ``seed-aware`` (n: seeds; sd, mde: of the per-seed mean differences;
    ``seeds_for_*``: seeds that would bring the t half-width / the MDE to ``target``) or
    ``per-subject`` (n: subjects paired; sd, mde: of their differences; ``p``, ``p_holm``:
    Wilcoxon). ``seeds`` lists the seeds used, space-separated.
    """
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(STATS_CSV_COLUMNS)

    def num(value: float | None) -> str:
        return "" if value is None else repr(float(value))

    for row, found in (seed_aware or {}).items():
        for c in found:
            writer.writerow(
                [
                    "seed-aware",
                    row.portion,
                    row.group,
                    " ".join(map(str, c.seeds)),
                    c.reference,
                    c.other,
                    len(c.seeds),
                    num(c.mean),
                    num(c.ci[0]),
                    num(c.ci[1]),
                    num(c.sd),
                    num(c.mde),
                    c.seeds_for(target, HALFWIDTH) or "",
                    c.seeds_for(target, MDE) or "",
                    repr(target),
                    "",
                    "",
                    c.verdict(),
                ]
            )
    for row, results in comparisons.items():
        for c in results:
            r = c.result
            writer.writerow(
                [
                    "per-subject",
                    row.portion,
                    row.group,
                    " ".join(map(str, c.scores.seeds)),
                    c.scores.reference,
                    c.scores.other,
                    r.n_pairs,
                    num(r.mean_diff),
                    num(None if r.ci is None else r.ci[0]),
                    num(None if r.ci is None else r.ci[1]),
                    num(r.sd),
                    num(r.mde),
                    "",
                    "",
                    "",
                    num(r.p),
                    num(c.p_holm),
                    r.note,
                ]
            )
    return buf.getvalue()
