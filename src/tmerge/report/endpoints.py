"""Endpoints that are not coins: per-subject Dice summarised so that an empty class does not decide.

With the BraTS convention (:mod:`tmerge.metrics`) a class absent from a subject's truth scores
Dice 1 when the prediction is empty too and 0 when it is not: a coin, not a measure of overlap.
On the BraTS-like data about a third of the test subjects have no enhancing tumour, so the
paper's per-subject mean of ET, TC and WT moves by 1/3 on each of them with a single voxel.

**Primary endpoint** (:data:`PRIMARY_ENDPOINT`, chosen before running): for each subject, the
mean Dice of the classes *present in its truth* (truth count > 0) — for the BraTS regions TC,
WT and, where the subject has one, ET — then the mean over subjects. It removes the coin while
keeping every subject, and each present class keeps the weight it has in the paper's mean. What
it leaves out, whether a class absent from the truth is predicted anyway, is reported beside it
as the share of c-empty subjects kept empty. A subject without any class in its truth (none on
BraTS, where every case has a whole tumour) has no primary score and is left out, and counted.

Endpoints of one run (:func:`endpoints`), from its per-subject records:

======================== ====================================================================
``dice_present_mean``    the primary endpoint (above)
``dice_mean``            the paper's: mean over subjects of the mean Dice of every class
``dice_<c>``             Dice of c over all subjects
``dice_<c>_present``     Dice of c over the c-present subjects (truth_c > 0)
``kept_empty_<c>``       share of the c-empty subjects (truth_c = 0) predicted empty (pred_c = 0)
======================== ====================================================================

The last two appear for a class only when some subject lacks it (otherwise they equal
``dice_<c>`` and say nothing); on BraTS that is ET. Both need the voxel counts; records without
them (runs written before :data:`tmerge.runs.REGIONS_FILE` existed) give only ``dice_mean`` and
``dice_<c>``.

Under ``metrics.convention=brats2023`` a class empty in both maps has Dice NaN, not a coin:
every mean here leaves NaN out (and its ``n`` counts the values kept), so the paper's endpoint is
then the mean over subjects of each subject's mean over its scored classes, as in
``test_summary.json``. Under the default brats2018 rules no Dice is NaN.

A record is a mapping with, for every class c: ``dice_<c>`` (Dice, BraTS convention),
``truth_<c>`` and ``pred_<c>`` (voxels of c in the truth and in the prediction, ≥ 0); other keys
(``subject``, ``hd95_<c>``, ``dice_mean``) are ignored. Every function here is pure.
:func:`endpoints_markdown` and :func:`endpoints_csv` make the report's endpoint tables from run
folders (each run's :data:`tmerge.runs.PER_SUBJECT_FILE` and :data:`tmerge.runs.REGIONS_FILE`).
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from tmerge.evaluate import record_count, regions_columns, regions_csv  # noqa: F401 - re-exported: the file the endpoints read
from tmerge.metrics import voxel_counts  # noqa: F401 - re-exported: the counts the endpoints read
from tmerge.report.paired import seed_pairs
from tmerge.report.runs import RunIndex, TargetRun
from tmerge.report.tables import (
    MISSING,
    PAIRED_HEADERS,
    Cell,
    Row,
    by_seed,
    md_table,
    paired_cells,
    row_runs,
    scoring_header,
    seed_count,
)
from tmerge.runs import PER_SUBJECT_FILE, REGIONS_FILE, TARGETS_DIR

#: The endpoint that decides: per subject the mean Dice of the classes present in its truth,
#: averaged over subjects (see the module docstring).
PRIMARY_ENDPOINT = "dice_present_mean"
#: The paper's endpoint: per subject the mean Dice of every class, averaged over subjects.
PAPER_ENDPOINT = "dice_mean"


# ---- per-subject records ----------------------------------------------------------------------


def record_classes(record: Mapping[str, Any]) -> tuple[str, ...]:
    """The classes of a record: its ``dice_<c>`` keys other than ``dice_mean``, in order."""
    return tuple(k[len("dice_") :] for k in record if k.startswith("dice_") and k != PAPER_ENDPOINT)


def has_counts(records: Sequence[Mapping[str, Any]], classes: Sequence[str]) -> bool:
    """Whether every record has ``truth_<c>`` and ``pred_<c>`` for every class (False for none)."""
    return bool(records) and all(f"truth_{c}" in r and f"pred_{c}" in r for r in records for c in classes)


def _dice(record: Mapping[str, Any], c: str) -> float:
    try:
        return float(record[f"dice_{c}"])
    except KeyError:
        raise ValueError(f"record {record.get('subject', '?')} has no dice_{c}") from None


def _scored(values: Sequence[float]) -> list[float]:
    """``values`` without NaN (a class empty in both maps under the brats2023 rules)."""
    return [v for v in values if not math.isnan(v)]


def _mean(values: Sequence[float]) -> float | None:
    values = _scored(values)
    return math.fsum(values) / len(values) if values else None


def present_mean(record: Mapping[str, Any], classes: Sequence[str]) -> float | None:
    """One subject's primary score: the mean of ``dice_<c>`` over the classes c with
    ``truth_<c> > 0``; None when its truth has none of them."""
    return _mean([_dice(record, c) for c in classes if record_count(record, f"truth_{c}") > 0])


def paper_mean(records: Sequence[Mapping[str, Any]], classes: Sequence[str]) -> float | None:
    """The paper's endpoint: mean over records of the mean ``dice_<c>`` over every class (over
    the scored classes where some are NaN)."""
    per_subject = [_mean([_dice(r, c) for c in classes]) for r in records]
    return _mean([math.nan if m is None else m for m in per_subject])


def mean_over_all(records: Sequence[Mapping[str, Any]], c: str) -> float | None:
    """Mean ``dice_<c>`` over every record (None for no record)."""
    return _mean([_dice(r, c) for r in records])


def mean_over_present(records: Sequence[Mapping[str, Any]], c: str) -> tuple[float | None, int]:
    """Mean ``dice_<c>`` over the records with ``truth_<c> > 0``, and their number."""
    values = [_dice(r, c) for r in records if record_count(r, f"truth_{c}") > 0]
    return _mean(values), len(values)


def kept_empty(records: Sequence[Mapping[str, Any]], c: str) -> tuple[float | None, int]:
    """Share of the records with ``truth_<c> == 0`` that have ``pred_<c> == 0``, and how many
    records have ``truth_<c> == 0``."""
    empty = [r for r in records if record_count(r, f"truth_{c}") == 0]
    if not empty:
        return None, 0
    kept = sum(record_count(r, f"pred_{c}") == 0 for r in empty)
    return kept / len(empty), len(empty)


@dataclass(frozen=True)
class Endpoint:
    """One endpoint of one run: its value (None: no subject to average) over ``n`` subjects."""

    name: str
    value: float | None
    n: int


def endpoints(
    records: Sequence[Mapping[str, Any]], classes: Sequence[str] | None = None
) -> dict[str, Endpoint]:
    """Every endpoint of one run (module docstring), in the order the report shows them.

    Args:
        records: the run's per-subject records (at least one).
        classes: the class names; None: those of the first record (:func:`record_classes`).

    Returns:
        ``name -> Endpoint``: with voxel counts in every record, :data:`PRIMARY_ENDPOINT`,
        :data:`PAPER_ENDPOINT`, then per class ``dice_<c>`` and, where some subject lacks c,
        ``dice_<c>_present`` and ``kept_empty_<c>``; without counts only :data:`PAPER_ENDPOINT`
        and ``dice_<c>``.

    Raises:
        ValueError: no records or classes, a missing Dice, or a count that is negative or not a
            number.
    """
    if not records:
        raise ValueError("endpoints needs at least one per-subject record, got none")
    classes = tuple(record_classes(records[0]) if classes is None else classes)
    if not classes:
        raise ValueError("endpoints: no classes (no dice_<c> in the records)")
    counted = has_counts(records, classes)
    out: dict[str, Endpoint] = {}
    if counted:
        scores = [present_mean(r, classes) for r in records]
        kept = [s for s in scores if s is not None]
        out[PRIMARY_ENDPOINT] = Endpoint(PRIMARY_ENDPOINT, _mean(kept), len(kept))
    scored = [r for r in records if _scored([_dice(r, c) for c in classes])]
    out[PAPER_ENDPOINT] = Endpoint(PAPER_ENDPOINT, paper_mean(records, classes), len(scored))
    for c in classes:
        n_c = len(_scored([_dice(r, c) for r in records]))
        out[f"dice_{c}"] = Endpoint(f"dice_{c}", mean_over_all(records, c), n_c)
        if not counted:
            continue
        share, n_empty = kept_empty(records, c)
        if n_empty == 0:
            continue
        value, n_present = mean_over_present(records, c)
        out[f"dice_{c}_present"] = Endpoint(f"dice_{c}_present", value, n_present)
        out[f"kept_empty_{c}"] = Endpoint(f"kept_empty_{c}", share, n_empty)
    return out


def endpoint_title(name: str) -> str:
    """A table title for an endpoint name of :func:`endpoints`."""
    if name == PRIMARY_ENDPOINT:
        return "Primary endpoint: Dice of the classes present in each subject's truth"
    if name == PAPER_ENDPOINT:
        return "Dice, mean of every class over all subjects (the paper's)"
    if name.startswith("kept_empty_"):
        c = name[len("kept_empty_") :]
        return f"{c}-empty subjects predicted empty (share)"
    if name.startswith("dice_") and name.endswith("_present"):
        c = name[len("dice_") : -len("_present")]
        return f"Dice {c} over {c}-present subjects"
    return f"Dice {name[len('dice_') :]} over all subjects"


# ---- writing the voxel counts (for the stages) --------------------------------------------------


# ---- the report's tables ------------------------------------------------------------------------


def run_endpoints(run: TargetRun) -> dict[str, Endpoint]:
    """:func:`endpoints` of a finished run's records (per-subject scores and, if read, counts)."""
    return endpoints(run.records())


def _ordered_names(found: Sequence[dict[str, Endpoint]]) -> list[str]:
    """The endpoint names of any of ``found``, in the order of :func:`endpoints` (classes in the
    order they are first seen)."""
    seen = {name for ends in found for name in ends}
    classes = dict.fromkeys(
        name[len("dice_") :]
        for ends in found
        for name in ends
        if name.startswith("dice_")
        and not name.endswith("_present")
        and name not in (PRIMARY_ENDPOINT, PAPER_ENDPOINT)
    )
    order = [PRIMARY_ENDPOINT, PAPER_ENDPOINT]
    for c in classes:
        order += [f"dice_{c}", f"dice_{c}_present", f"kept_empty_{c}"]
    return [name for name in order if name in seen]


def _subjects(values: Sequence[Endpoint]) -> str:
    sizes = sorted({e.n for e in values})
    if not sizes:
        return MISSING
    return str(sizes[0]) if len(sizes) == 1 else f"{sizes[0]}–{sizes[-1]}"


def _collect(
    index: RunIndex, rows: Sequence[Row], inits: Sequence[str]
) -> tuple[dict[tuple[Row, str], list[dict[str, Endpoint]]], list[str], list[TargetRun]]:
    """Per (row, init) the endpoints of its runs; every endpoint name; the runs without counts."""
    per_cell: dict[tuple[Row, str], list[dict[str, Endpoint]]] = {}
    without: list[TargetRun] = []
    for row in rows:
        for init in inits:
            runs = row_runs(index, row, init)
            per_cell[(row, init)] = [run_endpoints(r) for r in runs]
            without += [r for r in runs if r.regions is None and r not in without]
    names = _ordered_names([e for ends in per_cell.values() for e in ends])
    return per_cell, names, without


def endpoints_markdown(index: RunIndex, rows: Sequence[Row], inits: Sequence[str]) -> str:
    """The endpoint tables: one sub-table per endpoint (the primary first), rows = Table 2's rows,
    columns = initialisations; a sweep cell is the mean ± sample sd (ddof = 1) over seeds of the
    per-seed values, as in Table 2."""
    per_cell, names, without = _collect(index, rows, inits)
    parts = [
        "# Endpoints that are not coins\n",
        "A class absent from a subject's truth has Dice 1 if nothing is predicted and 0 otherwise "
        "(BraTS convention): a coin. Besides the paper's mean of every class, these tables give "
        "each class over all subjects, the classes that some test subjects lack over the subjects "
        "that have them, and the share of the subjects without them that were predicted empty. "
        f"**Primary endpoint** (`{PRIMARY_ENDPOINT}`, named before running): per subject, the "
        "mean Dice of the classes present in its truth (BraTS: TC, WT and ET where present), "
        "averaged over subjects — the coin removed, every subject kept; whether absent classes "
        "are left empty is the kept-empty share beside it. "
        f"From each run's `{PER_SUBJECT_FILE}` and `{REGIONS_FILE}` (voxels of each class in the "
        "truth and the prediction). Sweep rows: mean ± sd over seeds of the per-seed values "
        '("(k/n seeds)" where only k of the n seeds have the value); n: subjects the endpoint '
        f"averages over in each run. {MISSING}: no finished run, or no `{REGIONS_FILE}`.\n",
        f"Dice scored with {scoring_header('dice_mean', index.usable())} (brats2023: a class empty "
        "in both maps is NaN and left out of every mean, not a coin).\n",
    ]
    if without:
        listed = ", ".join(f"`{_rel(r, index)}`" for r in without)
        if len(without) == sum(len(e) for e in per_cell.values()):
            parts.append(
                f"No run has `{REGIONS_FILE}` (runs written before it existed): the primary "
                "endpoint, the present-only means and the kept-empty shares need each subject's "
                f"voxel counts, so only the columns of `{PER_SUBJECT_FILE}` are shown.\n"
            )
        else:
            parts.append(
                f"Without `{REGIONS_FILE}` (written before it existed; only the columns of "
                f"`{PER_SUBJECT_FILE}` are used): {listed}.\n"
            )
    if not names:
        parts.append(f"No finished run under `{TARGETS_DIR}/`.\n")
    for name in names:
        body = []
        for row in rows:
            cells = [
                [e[name] for e in per_cell[(row, init)] if name in e and e[name].value is not None]
                for init in inits
            ]
            body.append(
                [
                    row.label(),
                    _subjects([e for c in cells for e in c]),
                    seed_count(row),
                    *(Cell.of(e.value for e in c).format(3, row.group, len(row.seeds)) for c in cells),
                ]
            )
        parts.append(f"## {endpoint_title(name)}\n\n" + md_table(["portion", "n", "seeds", *inits], body))
        if name == PRIMARY_ENDPOINT:
            parts.append(primary_paired_markdown(index, rows, inits))
    return "\n".join(parts)


def _primary(run: TargetRun) -> float | None:
    end = run_endpoints(run).get(PRIMARY_ENDPOINT)
    return None if end is None else end.value


def primary_paired_markdown(
    index: RunIndex, rows: Sequence[Row], inits: Sequence[str], reference: str = "timm"
) -> str:
    """The primary endpoint's comparisons, paired by seed: T-IMM against every other init, then
    the ladder's rungs (:func:`tmerge.report.paired.seed_pairs`), each as the mean ± sd of the
    per-seed differences with its t interval and MDE (:func:`tmerge.report.tables.paired_cells`).
    Rows where no pair has two seeds are left out."""
    body = []
    for row in rows:
        values = {init: by_seed(row_runs(index, row, init), _primary) for init in inits}
        for ref, other in seed_pairs(inits, reference) if reference in values else []:
            diffs = [v - values[other][k] for k, v in values[ref].items() if k in values[other]]
            if len(diffs) >= 2:
                body.append([row.label(), f"{ref} − {other}", *paired_cells(diffs)])
    if not body:
        return ""
    return (
        "### The primary endpoint, paired by seed\n\n"
        "Per comparison the per-seed differences of the primary endpoint over the seeds where "
        "both finished: mean ± sd (pairs), the 95 % t interval and the MDE (the smallest true "
        "difference these seeds detect with 80 % power, two-sided 5 %). An interval that "
        "contains 0 is not an effect; it rules out only differences above the MDE.\n\n"
        + md_table(["portion", "comparison", *PAIRED_HEADERS], body)
    )


def _rel(run: TargetRun, index: RunIndex) -> str:
    try:
        return run.path.relative_to(index.root).as_posix() + "/"
    except ValueError:
        return str(run.path)


def endpoints_csv(index: RunIndex, rows: Sequence[Row], inits: Sequence[str]) -> str:
    """The endpoint tables as CSV, one line per (portion, runs, initialisation, endpoint) that has
    a value: ``value``/``std`` over seeds (``std`` empty for one run), ``n_runs``, ``n_subjects``
    (the subjects averaged over, "a–b" where runs differ)."""
    per_cell, names, _ = _collect(index, rows, inits)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["portion", "runs", "seeds", "init", "endpoint", "value", "std", "n_runs", "n_subjects"])
    for row in rows:
        for init in inits:
            for name in names:
                found = [e[name] for e in per_cell[(row, init)] if name in e and e[name].value is not None]
                if not found:
                    continue
                cell = Cell.of(e.value for e in found)
                writer.writerow(
                    [
                        row.portion,
                        row.group,
                        " ".join(map(str, row.seeds)),
                        init,
                        name,
                        repr(cell.value),
                        "" if cell.std is None else repr(cell.std),
                        cell.n_runs,
                        _subjects(found),
                    ]
                )
    return buf.getvalue()
