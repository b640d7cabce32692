"""The paper's tables from run folders: Table 2 (test Dice and HD95), Table 3 (stage lengths and
validation scores), Table 4 (forgetting).

Rows are portions; a portion swept over several seeds gets a second row with the mean ± sample
standard deviation (ddof = 1) across seeds of the per-seed test means next to its single-seed
row, and the number of seeds. A cell without a finished run is "—": nothing is filled in or
carried over from elsewhere. Values are computed from each run's per-subject CSV (the summary
file is only cross-checked), so every number in a table can be traced to that CSV
(:data:`tmerge.runs.PER_SUBJECT_FILE`).

A little over 400 lines: the three tables share their rows, cells and formatting (and the
helpers that pair runs by seed, used by the premise checks, the curves and the endpoints); the
other report pages import them from here.
"""

from __future__ import annotations

import csv
import io
import math
import statistics
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from tmerge.data.labels import REGIONS
from tmerge.report.runs import SINGLE, SWEEP, ForgettingRun, RunIndex, TargetRun, ordered_inits
from tmerge.report.stats import ci_halfwidth, minimal_detectable_difference
from tmerge.runs import (
    FORGETTING_DIR,
    FORGETTING_TABLE,
    OTHER_TARGETS_DIR,
    PER_SUBJECT_FILE,
    STAGES_FILE,
    TARGETS_DIR,
)

MISSING = "—"


#: The portion whose held-out subjects double as the validation set (paper §4.4).
FULL_PORTION = 100


@dataclass(frozen=True)
class Row:
    """One table row: a portion's single-seed runs, or its sweep over ``seeds``."""

    portion: int
    group: str  # SINGLE or SWEEP
    seeds: tuple[int, ...] = ()

    def label(self) -> str:
        # At 100 % the 40 "test" subjects also validate (paper §4.4: every other labelled subject
        # trains), so their scores choose the checkpoint: they are validation scores, not a test.
        portion = f"{self.portion} % (validation)" if self.portion == FULL_PORTION else f"{self.portion} %"
        if self.group == SINGLE:
            return portion
        return f"{portion}, seeds {','.join(map(str, self.seeds))}"


@dataclass(frozen=True)
class Cell:
    """A table entry: the value of one run, or the mean ± std of a sweep's runs.

    ``n_runs`` is how many runs contributed (0: missing); ``left_out`` counts per-subject values
    that were not finite (an HD95 with an empty mask) and so not averaged.
    """

    value: float | None
    std: float | None = None
    n_runs: int = 0
    left_out: int = 0

    @classmethod
    def of(cls, values: Iterable[float | None], left_out: int = 0) -> Cell:
        vals = [v for v in values if v is not None and math.isfinite(v)]
        if not vals:
            return cls(None, left_out=left_out)
        std = statistics.stdev(vals) if len(vals) > 1 else None
        return cls(statistics.fmean(vals), std, len(vals), left_out)

    def format(self, digits: int, group: str = SINGLE, n_seeds: int = 1) -> str:
        if self.value is None:
            return MISSING
        text = f"{self.value:.{digits}f}"
        if self.std is not None:
            text += f" ± {self.std:.{digits}f}"
        if group == SWEEP and self.n_runs < n_seeds:
            text += f" ({self.n_runs}/{n_seeds} seeds)"
        if self.left_out:
            text += f" ({self.left_out} n/a)"
        return text


def table_rows(index: RunIndex, portions: Iterable[int]) -> list[Row]:
    """A single-seed row for every expected portion and every portion with a single-seed run
    folder, a sweep row where seeds were run."""
    rows, expected = [], set(portions)
    single = {r.portion for r in index.targets if r.seed is None}
    for portion in sorted(expected | set(index.portions())):
        if portion in expected or portion in single:
            rows.append(Row(portion, SINGLE))
        seeds = index.seeds(portion)
        if seeds:
            rows.append(Row(portion, SWEEP, tuple(seeds)))
    return rows


def row_runs(index: RunIndex, row: Row, init: str) -> list[TargetRun]:
    """The finished, readable runs of ``init`` in ``row`` (one per seed for a sweep)."""
    seeds: Sequence[int | None] = [None] if row.group == SINGLE else row.seeds
    runs = [index.find(row.portion, init, s) for s in seeds]
    return [r for r in runs if r is not None and r.usable]


def table_inits(index: RunIndex, expected: Iterable[str]) -> list[str]:
    """Columns: the expected initialisations and every one found on disk, in the paper's order."""
    return ordered_inits([*expected, *(r.init for r in index.targets)])


def run_mean(run: TargetRun, column: str) -> tuple[float | None, int]:
    """Mean of a per-subject column over its finite values, and how many were not finite."""
    values = list(run.subject_values(column).values())
    finite = [v for v in values if math.isfinite(v)]
    return (statistics.fmean(finite) if finite else None), len(values) - len(finite)


def metric_cell(runs: Sequence[TargetRun], column: str) -> Cell:
    means = [run_mean(r, column) for r in runs]
    return Cell.of((m for m, _ in means), left_out=sum(k for _, k in means))


def stage_cell(runs: Sequence[TargetRun], get: Callable[[dict], float | None]) -> Cell:
    return Cell.of(get(r.stages) if r.stages else None for r in runs)


def n_subjects(runs: Iterable[TargetRun]) -> str:
    """Distinct test-set sizes of ``runs``: "40", "38–40" or "—"."""
    sizes = sorted({len(r.per_subject) for r in runs})
    if not sizes:
        return MISSING
    return str(sizes[0]) if len(sizes) == 1 else f"{sizes[0]}–{sizes[-1]}"


def seed_count(row: Row) -> str:
    """How many seeds a row holds: "1" for the single-seed layout, the sweep's count otherwise."""
    return "1" if row.group == SINGLE else str(len(row.seeds))


def md_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """A GitHub-flavoured Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


# ---- Table 2 -------------------------------------------------------------------------------

def table2_metrics(classes: Sequence[str] = REGIONS) -> tuple[tuple[str, str, int], ...]:
    """(section title, per-subject column, digits) of Table 2's sub-tables for a target's
    scored ``classes`` (BraTS: the regions ET, TC, WT)."""
    mean = (
        "Dice, mean of ET, TC and WT (the paper's Table 2)"
        if tuple(classes) == REGIONS
        else f"Dice, mean of {', '.join(classes)}"
    )
    return (
        (mean, "dice_mean", 3),
        *((f"Dice {r}", f"dice_{r}", 3) for r in classes),
        *((f"HD95 {r} (mm)", f"hd95_{r}", 1) for r in classes),
    )


#: Table 2's sub-tables for BraTS.
TABLE2_METRICS: tuple[tuple[str, str, int], ...] = table2_metrics(REGIONS)

#: How each HD95 definition is named in the tables' headers (:mod:`tmerge.metrics`).
HD95_NAMES = {"pooled": "pooled (BraTS, medpy)", "directed": "directed max (MONAI)"}


def scoring_name(runs: Iterable[TargetRun], part: int) -> str:
    """The HD95 definition (``part=0``) or the empty-region convention (``part=1``) of ``runs``'
    test scores (:meth:`~tmerge.report.runs.TargetRun.scoring`): one name, or ``mixed (…)`` with
    the number of runs of each when they differ."""
    counts = Counter(r.scoring()[part] for r in runs)
    names = {k: HD95_NAMES.get(k, k) if part == 0 else k for k in counts}
    if not counts:
        return MISSING
    if len(counts) == 1:
        return names[next(iter(counts))]
    runs_of = {k: f"{n} run" + ("s" if n != 1 else "") for k, n in counts.items()}
    return "mixed (" + ", ".join(f"{names[k]}: {runs_of[k]}" for k in sorted(counts)) + ")"


def scoring_header(column: str, runs: Iterable[TargetRun]) -> str:
    """What a Table 2 column's numbers depend on besides the runs: the empty-region convention
    for Dice, and the HD95 definition too for HD95."""
    runs = list(runs)
    convention = f"empty regions: {scoring_name(runs, 1)}"
    return f"HD95 {scoring_name(runs, 0)}; {convention}" if column.startswith("hd95") else convention


SCORING_NOTE = (
    "HD95 *pooled* is the 95th percentile of the border-to-border distances of both directions "
    "together, as the BraTS organisers (medpy) compute it; *directed max* is the larger of the two "
    "directions' 95th percentiles (MONAI), tmerge's HD95 for runs made before `metrics.hd95` "
    "existed. Empty regions *brats2018*: empty in both maps → Dice 1, HD95 0; in one → Dice 0, HD95 "
    "the image's diagonal. *brats2023*: empty in both → left out (counted in \"(k n/a)\"); no "
    "overlap → Dice 0, HD95 373.13 mm. Each run's `metrics.*` config says which it used."
)


def table2_markdown(index: RunIndex, rows: Sequence[Row], inits: Sequence[str]) -> str:
    """Table 2 in Markdown: one sub-table per metric, rows = portions, columns = initialisations."""
    folder = TARGETS_DIR if index.target == TARGETS_DIR else f"{OTHER_TARGETS_DIR}/{index.target}"
    title = "" if index.target == TARGETS_DIR else f" — target {index.target}"
    parts = [
        f"# Table 2 — test scores per initialisation and portion{title}\n",
        f'Mean over the test subjects of each run\'s `{PER_SUBJECT_FILE}`. Rows "p %" are the '
        f'single-seed runs (`{folder}/p<portion>/<init>/`); rows "p %, seeds …" are sweeps '
        f"(`{folder}/p<portion>/seed<k>/<init>/`): each cell is the mean ± sample standard deviation "
        "(ddof = 1) over seeds of the per-seed test means, with "
        '"(k/n seeds)" where only k of the n seeds finished. The sd is the spread between '
        "training runs (training randomness and the draw of train/val subjects), not a standard "
        "error, and with a handful of seeds it is itself rough. n: test subjects per run; "
        "seeds: how many seeds the row holds. "
        f"{MISSING}: no finished run. Scores are averaged over the subjects where they are "
        'finite; "(k n/a)" counts the values left out (a region empty in both maps under the '
        "brats2023 rules). "
        "At 100 % the 40 held-out subjects are also the validation set that selects the "
        'checkpoint (as in the paper, which reported the online leaderboard instead): its rows are '
        'labelled "(validation)" and are not test scores; grade the exported unlabelled set with '
        "`tmerge score` where its labels exist.\n",
        SCORING_NOTE + "\n",
    ]
    used = index.usable()
    for title, column, digits in table2_metrics(index.classes):
        body = []
        for row in rows:
            cells = {init: row_runs(index, row, init) for init in inits}
            all_runs = [r for runs in cells.values() for r in runs]
            body.append(
                [
                    row.label(),
                    n_subjects(all_runs),
                    seed_count(row),
                    *(metric_cell(cells[i], column).format(digits, row.group, len(row.seeds)) for i in inits),
                ]
            )
        header = f"## {title} — {scoring_header(column, used)}\n\n"
        parts.append(header + md_table(["portion", "n", "seeds", *inits], body))
    return "\n".join(parts)


def table2_csv(index: RunIndex, rows: Sequence[Row], inits: Sequence[str]) -> str:
    """Table 2 as CSV, one line per (portion, runs, initialisation, metric); empty value = missing."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(
        ["portion", "runs", "seeds", "init", "metric", "value", "std", "n_runs", "n_subjects", "n_left_out"]
    )
    for row in rows:
        for init in inits:
            runs = row_runs(index, row, init)
            for _, column, _ in table2_metrics(index.classes):
                cell = metric_cell(runs, column)
                writer.writerow(
                    [
                        row.portion,
                        row.group,
                        " ".join(map(str, row.seeds)),
                        init,
                        column,
                        "" if cell.value is None else repr(cell.value),
                        "" if cell.std is None else repr(cell.std),
                        cell.n_runs,
                        n_subjects(runs).replace(MISSING, ""),
                        cell.left_out,
                    ]
                )
    return buf.getvalue()


# ---- Table 3 -------------------------------------------------------------------------------


def _get(stage: str, *keys: str) -> Callable[[dict], float | None]:
    """Getter of ``stages[stage][key]`` (first key present, ``a/b`` looks into best_metrics)."""

    def get(stages: dict) -> float | None:
        block = stages.get(stage) or {}
        for key in keys:
            node = block.get("best_metrics", {}).get(key) if "/" in key else block.get(key)
            if node is not None:
                return float(node)
        return None

    return get


#: Table 3's columns: (header, getter, digits).
TABLE3_COLUMNS: tuple[tuple[str, Callable[[dict], float | None], int], ...] = (
    ("adaption epochs", _get("adaption", "epochs"), 0),
    ("adaption best epoch", _get("adaption", "best_epoch"), 0),
    ("adaption val Dice", _get("adaption", "val_dice", "val/dice"), 3),
    ("adaption val loss", _get("adaption", "val_loss", "val/loss"), 3),
    ("fine-tune epochs", _get("finetune", "epochs"), 0),
    ("fine-tune best epoch", _get("finetune", "best_epoch"), 0),
    ("fine-tune val Dice", _get("finetune", "val/dice", "best_score"), 3),
)


def _digits(cell: Cell, digits: int) -> int:
    # Epoch counts are whole numbers for one run; a mean over seeds needs a decimal.
    return max(digits, 1) if cell.std is not None or cell.n_runs > 1 else digits


def table3_markdown(index: RunIndex, rows: Sequence[Row], inits: Sequence[str], reference: str) -> str:
    """Table 3 in Markdown: T-IMM's adaption and fine-tune stages (paper Table 3), then the fine-tune
    stage of every initialisation."""
    body = []
    for row in rows:
        runs = row_runs(index, row, reference)
        cells = [(stage_cell(runs, get), d) for _, get, d in TABLE3_COLUMNS]
        body.append([row.label(), *(c.format(_digits(c, d), row.group, len(row.seeds)) for c, d in cells)])
    parts = [
        "# Table 3 — stage lengths and validation scores\n",
        f"From each `{reference}` run's `{STAGES_FILE}`. Epochs: epochs run (early stopping included); "
        f"best epoch: the epoch of the checkpoint kept, as `{STAGES_FILE}` records it. "
        "Adaption val Dice/loss: at the adaption checkpoint kept (lowest validation loss); "
        "fine-tune val Dice: the best validation Dice. Sweeps: mean ± std across seeds. "
        f"{MISSING}: no finished run.\n",
        f"## {reference} (paper Table 3)\n\n"
        + md_table(["portion", *(h for h, _, _ in TABLE3_COLUMNS)], body),
    ]
    epochs, best = _get("finetune", "epochs"), _get("finetune", "val/dice", "best_score")
    body = []
    for row in rows:
        line = [row.label()]
        for init in inits:
            runs = row_runs(index, row, init)
            e, v = stage_cell(runs, epochs), stage_cell(runs, best)
            if e.value is None and v.value is None:
                line.append(MISSING)
            else:
                line.append(f"{e.format(_digits(e, 0))} / {v.format(3, row.group, len(row.seeds))}")
        body.append(line)
    parts.append(
        "## Fine-tune stage of every initialisation (epochs / best val Dice)\n\n"
        + md_table(["portion", *inits], body)
    )
    return "\n".join(parts)


# ---- Table 4 -------------------------------------------------------------------------------

#: Table 4's rows as ``tmerge.stages.forgetting`` names them.
TABLE4_ROWS: tuple[str, ...] = ("M1", "M2", "IMM", "T-IMM")


def table4_markdown(forgetting: Sequence[ForgettingRun]) -> str:
    """Table 4 in Markdown: per portion, the mean test Dice of each P with the source tasks' S."""
    parts = [
        "# Table 4 — forgetting of the source tasks\n",
        "Mean HCP test Dice of the fused parameters P of each initialisation combined with each "
        "source task's own S (instance norms and head), from "
        f"`{FORGETTING_DIR}/p<portion>/{FORGETTING_TABLE}` "
        "(`make forgetting PORTION=…`). T-IMM uses the α learned at that portion. "
        f"{MISSING}: not computed (no T-IMM run at that portion when the table was made).\n",
    ]
    found = [f for f in sorted(forgetting, key=lambda f: f.portion) if f.table is not None]
    if not found:
        parts.append(f"No `{FORGETTING_DIR}/p<portion>/{FORGETTING_TABLE}` found.\n")
    for run in found:
        table = run.table or {}
        columns = list(dict.fromkeys(c for values in table.values() for c in values))
        names = [*TABLE4_ROWS, *(r for r in table if r not in TABLE4_ROWS)]
        body = [[name, *(_fmt(table.get(name, {}).get(c)) for c in columns)] for name in names]
        parts.append(f"## {run.portion} %\n\n" + md_table(["P from", *columns], body))
    return "\n".join(parts)


def _fmt(value: float | None, digits: int = 3) -> str:
    return MISSING if value is None else f"{value:.{digits}f}"


def spread_cell(values: Sequence[float], digits: int = 3, count: bool = False) -> str:
    """One value as it is, several as mean ± sample sd (and, with ``count``, how many); none:
    :data:`MISSING`."""
    if not values:
        return MISSING
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    n = f" ({len(values)})" if count else ""
    return f"{statistics.fmean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}{n}"


V = TypeVar("V")


def by_seed(runs: Sequence[TargetRun], value: Callable[[TargetRun], V | None]) -> dict[int | None, V]:
    """``value`` of each run, by its seed, for pairing two inits seed by seed; runs without one
    are left out."""
    return {r.seed: v for r in runs if (v := value(r)) is not None}


#: The columns of a paired difference across seeds: its mean ± sd (seeds), the t interval, the MDE.
PAIRED_HEADERS = ("paired by seed", "95 % CI (t)", "MDE")


def paired_cells(diffs: Sequence[float], level: float = 0.95) -> list[str]:
    """A paired difference across seeds as :data:`PAIRED_HEADERS`' three cells: mean ± sd (n),
    the t interval of the mean and the minimal detectable difference (80 % power, two-sided at
    1 − ``level``; :func:`tmerge.report.stats.minimal_detectable_difference`). One pair: its
    value and no interval; none: :data:`MISSING` throughout."""
    if len(diffs) < 2:
        return [spread_cell(list(diffs)), MISSING, MISSING]
    mean, sd, n = statistics.fmean(diffs), statistics.stdev(diffs), len(diffs)
    half = ci_halfwidth(sd, n, level)
    mde = minimal_detectable_difference(sd, n, alpha=1.0 - level)
    return [spread_cell(list(diffs), count=True), f"[{mean - half:+.3f}, {mean + half:+.3f}]", f"{mde:.3f}"]
