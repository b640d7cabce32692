"""Premise checks: can a target reward transfer at all? Method-blind, read before any comparison.

* **Frozen-feature probe** — under the fixed protocol every init's warm-up trains S and the
  input layer with P frozen (T-IMM's adaption: with α too) and is then scored on the test
  subjects (``stages.json`` → ``warmup.test`` / ``adaption.test``). ``none``'s is random P.
  A source's P that scores no better than random P carries nothing the target needs.
* **No transfer across portions** — ``none``'s test Dice at every portion: the room transfer
  has to help in (small portion against the most data).
* **Sources converged?** — each source run's validation Dice per epoch (``logs/metrics.csv``):
  its best, its last, and its gain over the last three validated epochs; a source still rising
  by more than :data:`STILL_RISING` was stopped before it learned its task.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from pathlib import Path

from tmerge.report.runs import RunIndex, SourceRun, TargetRun
from tmerge.report.tables import (
    MISSING,
    PAIRED_HEADERS,
    Row,
    by_seed,
    md_table,
    metric_cell,
    paired_cells,
    row_runs,
    run_mean,
    spread_cell,
)

#: Gain in validation Dice over a source's last three validated epochs above which it is
#: reported as still rising (not converged).
STILL_RISING = 0.01


def probe_score(run: TargetRun, score: str = "dice_mean") -> float | None:
    """The test score of a run's frozen-P stage (warm-up or adaption), if it recorded one."""
    stages = run.stages or {}
    for stage in ("warmup", "adaption"):
        value = (stages.get(stage) or {}).get("test", {}).get(score)
        if value is not None:
            return float(value)
    return None


def _test_dice(run: TargetRun) -> float | None:
    return run_mean(run, "dice_mean")[0]  # as Table 2 has it


def probe_markdown(index: RunIndex, rows: Sequence[Row], inits: Sequence[str]) -> str:
    """Probe scores per init and row, and each init's paired difference to random P (``none``)
    over the seeds both have, with its interval and MDE."""
    body = []
    for row in rows:
        random_p = by_seed(row_runs(index, row, "none"), probe_score)
        for init in inits:
            scores = by_seed(row_runs(index, row, init), probe_score)
            if not scores:
                continue
            diffs = [s - random_p[k] for k, s in scores.items() if k in random_p]
            cells = [MISSING] * 3 if init == "none" else paired_cells(diffs)
            body.append([row.label(), init, spread_cell(list(scores.values()), count=True), *cells])
    if not body:
        return "No fixed-protocol run recorded a probe score (`protocol=fixed`).\n"
    headers = ["portion", "init", "probe test Dice", *(f"− random P, {h}" for h in PAIRED_HEADERS)]
    return md_table(headers, body)


def none_markdown(index: RunIndex, rows: Sequence[Row], init: str = "none") -> str:
    """``init``'s test Dice (mean of the classes) per row (default: no transfer); for another
    init also its paired difference to ``none`` over the seeds both have, with interval and MDE."""
    body = []
    for row in rows:
        runs = row_runs(index, row, init)
        cell = metric_cell(runs, "dice_mean")
        if not cell.n_runs:
            continue
        line = [row.label(), cell.format(3, row.group, len(row.seeds))]
        if init != "none":
            reference = by_seed(row_runs(index, row, "none"), _test_dice)
            diffs = [v - reference[k] for k, v in by_seed(runs, _test_dice).items() if k in reference]
            line += paired_cells(diffs)
        body.append(line)
    if not body:
        return f"No finished `{init}` run.\n"
    headers = ["portion", f"{init}: test Dice"]
    if init != "none":
        headers += [f"− none, {h}" for h in PAIRED_HEADERS]
    return md_table(headers, body)


def validation_curve(path: Path, column: str = "val/dice") -> list[float]:
    """A run's validation score per validated epoch from its Lightning CSV log."""
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    except OSError:
        return []
    values = []
    for row in rows:
        text = (row.get(column) or "").strip()
        if text:
            value = float(text)
            if math.isfinite(value):
                values.append(value)
    return values


def sources_markdown(sources: Sequence[SourceRun]) -> str:
    """Each finished source's validation Dice: best, last, gain over its last three epochs."""
    body = []
    for source in sources:
        if not source.finished:
            continue
        curve = validation_curve(source.path / "logs" / "metrics.csv")
        if not curve:
            continue
        gain = curve[-1] - curve[-3] if len(curve) >= 3 else math.nan
        state = MISSING if math.isnan(gain) else ("still rising" if gain > STILL_RISING else "flat")
        body.append(
            [source.name, str(len(curve)), f"{max(curve):.3f}", f"{curve[-1]:.3f}", f"{gain:+.3f}", state]
        )
    if not body:
        return "No finished source run with a validation log.\n"
    return md_table(["source", "epochs", "best val Dice", "last", "gain, last 3", "converged?"], body)


def premise_markdown(index: RunIndex, rows: Sequence[Row], inits: Sequence[str]) -> str:
    """The premise checks' page."""
    return "\n".join(
        [
            f"# Premise checks — target {index.target}\n",
            "Read these before any comparison: they say whether this target can reward transfer at "
            "all, and they know nothing of the merging methods.\n",
            "## Frozen-feature probe\n",
            "Test Dice after the fixed protocol's warm-up: P frozen as the init left it, S and the "
            "input layer trained for `fixed.warmup_epochs` (T-IMM and mean-T-IMM: their adaption, "
            "α included). `none` is random P. A source's P that is not clearly above random P gives "
            "the merge nothing to choose between. Each difference is paired by seed, with its t "
            "interval and its MDE (the smallest true difference these seeds would detect with 80 % "
            "power, two-sided 5 %): an interval that contains 0 rules out only differences above "
            "the MDE.\n",
            probe_markdown(index, rows, inits),
            "## No transfer at each portion\n",
            "The room for transfer: `none` with little data against `none` with the most.\n",
            none_markdown(index, rows),
            "## Sources converged?\n",
            f"Validation Dice of each source run per epoch (`logs/metrics.csv`); still rising: more "
            f"than {STILL_RISING} gained over its last three validated epochs.\n",
            sources_markdown(index.sources),
            "## Shallow baseline\n",
            "`tmerge shallow` (the same splits): a per-voxel MLP on each channel's intensity and two "
            "smoothed copies, no convolutions. Where it comes near the CNNs, intensities decide the "
            "target, not the shapes and context a source learned.\n",
            none_markdown(index, rows, "shallow"),
        ]
    )
