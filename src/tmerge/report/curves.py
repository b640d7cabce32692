"""Learning curves: the three benefits of transfer (start, growth, end; Tommasi et al.) per init.

A fixed-protocol run records its test scores after fine-tune epochs 1, 2, 4, … and the last
(:data:`tmerge.runs.CURVE_FILE`, written by :class:`~tmerge.callbacks.LearningCurve`). Per run,
from its ``dice_mean`` points:

* **start** — the score after the first epoch (what the initialisation gives at once);
* **area** — the area under the curve over the epochs, trapezoidal, divided by the epoch span
  (a mean score over training: growth and start together, in Dice units);
* **end** — the score after the last epoch.

Sweeps show each as mean ± sd over seeds, and each init's difference to no transfer (``none``)
paired by seed, with its t interval and MDE: transfer helps by a criterion only where that
interval excludes 0. The figure draws the mean curve per init with a band of ± one sd over seeds.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tmerge.report.runs import RunIndex, TargetRun
from tmerge.report.tables import (
    MISSING,
    PAIRED_HEADERS,
    Row,
    by_seed,
    md_table,
    paired_cells,
    row_runs,
    spread_cell,
)
from tmerge.runs import CURVE_FILE

#: The score a curve is summarised by.
CURVE_SCORE = "dice_mean"
#: What every init's curve is compared with.
NO_TRANSFER = "none"


@dataclass(frozen=True)
class Curve:
    """One run's curve: ``epochs`` (increasing) and the score after each."""

    epochs: tuple[int, ...]
    scores: tuple[float, ...]

    @property
    def start(self) -> float:
        return self.scores[0]

    @property
    def end(self) -> float:
        return self.scores[-1]

    @property
    def area(self) -> float:
        """Trapezoidal area under the curve over its epochs, per epoch of span (a single point:
        that point)."""
        return normalised_area(self.epochs, self.scores)


def normalised_area(epochs: Sequence[float], scores: Sequence[float]) -> float:
    """∫ score d(epoch) / (last − first epoch) by the trapezoidal rule; one point: its score.

    Raises:
        ValueError: empty or unequal inputs, or epochs that do not increase.
    """
    if not epochs or len(epochs) != len(scores):
        raise ValueError(f"normalised_area: {len(epochs)} epochs for {len(scores)} scores")
    if any(b <= a for a, b in zip(epochs, epochs[1:], strict=False)):
        raise ValueError(f"normalised_area: epochs must increase, got {list(epochs)}")
    if len(epochs) == 1:
        return float(scores[0])
    total = sum((b - a) * (sa + sb) / 2 for a, b, sa, sb in zip(epochs, epochs[1:], scores, scores[1:], strict=False))
    return total / (epochs[-1] - epochs[0])


def read_curve(run: TargetRun, score: str = CURVE_SCORE) -> Curve | None:
    """A run's curve, or None where it has no (readable) curve file."""
    path = Path(run.path) / CURVE_FILE
    if not path.is_file():
        return None
    try:
        points = json.loads(path.read_text())["points"]
        pairs = sorted((int(p["epoch"]), float(p["scores"][score])) for p in points)
    except (OSError, ValueError, KeyError, TypeError):
        run.warnings.append(f"{CURVE_FILE} unreadable; no curve")
        return None
    if not pairs:
        return None
    return Curve(tuple(e for e, _ in pairs), tuple(s for _, s in pairs))


def curves_markdown(index: RunIndex, rows: Sequence[Row], inits: Sequence[str]) -> str:
    """The learning-curve table: start, area and end per init and row (mean ± sd over seeds)."""
    parts = [
        "# Learning curves — start, area under the curve, end\n",
        f"From each fixed-protocol run's `{CURVE_FILE}` (test `{CURVE_SCORE}` after fine-tune epochs "
        "1, 2, 4, … and the last): **start** is the score after epoch 1, **area** the trapezoidal "
        "area under the curve divided by its epoch span (a mean score over training), **end** the "
        "last point (the tested weights). Sweeps: mean ± sd over seeds. Runs of the paper protocol "
        f"have no curve ({MISSING}).\n",
    ]
    body = []
    for row in rows:
        for init in inits:
            curves = [c for c in (read_curve(r) for r in row_runs(index, row, init)) if c is not None]
            if not curves:
                continue
            body.append(
                [
                    row.label(),
                    init,
                    str(len(curves)),
                    spread_cell([c.start for c in curves]),
                    spread_cell([c.area for c in curves]),
                    spread_cell([c.end for c in curves]),
                ]
            )
    if not body:
        parts.append(f"No run with a `{CURVE_FILE}` (run with `protocol=fixed`).\n")
        return "\n".join(parts)
    parts.append(md_table(["portion", "init", "runs", "start", "area", "end"], body))
    parts.append(f"## Against no transfer ({NO_TRANSFER}), paired by seed\n")
    parts.append(
        "Per criterion the difference init − none over the seeds both finished: mean ± sd (pairs), "
        "the 95 % t interval and the MDE (the smallest true difference these seeds detect with 80 % "
        "power, two-sided 5 %).\n"
    )
    paired = []
    for row in rows:
        reference = by_seed(row_runs(index, row, NO_TRANSFER), read_curve)
        for init in inits:
            if init == NO_TRANSFER:
                continue
            mine = by_seed(row_runs(index, row, init), read_curve)
            seeds = [k for k in mine if k in reference]
            if not seeds:
                continue
            line = [row.label(), init]
            for criterion in ("start", "area", "end"):
                diffs = [getattr(mine[k], criterion) - getattr(reference[k], criterion) for k in seeds]
                line += paired_cells(diffs)
            paired.append(line)
    if paired:
        headers = ["portion", "init"]
        headers += [f"{c}: {h}" for c in ("start", "area", "end") for h in PAIRED_HEADERS]
        parts.append(md_table(headers, paired))
    else:
        parts.append(f"No seed with a curve of `{NO_TRANSFER}` and of another init.\n")
    return "\n".join(parts)


def plot_curves(index: RunIndex, rows: Sequence[Row], inits: Sequence[str], path: Path) -> Path:
    """One panel per row: the mean curve per init over seeds, with a ± sd band."""
    from tmerge.report.figures import plt, save_figure

    panels = []
    for row in rows:
        series = []
        for init in inits:
            curves = [c for c in (read_curve(r) for r in row_runs(index, row, init)) if c is not None]
            epochs = sorted({e for c in curves for e in c.epochs})
            if not curves:
                continue
            shared = [e for e in epochs if all(e in c.epochs for c in curves)]
            values = [[c.scores[c.epochs.index(e)] for c in curves] for e in shared]
            mean = [statistics.fmean(v) for v in values]
            sd = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in values]
            series.append((init, shared, mean, sd))
        if series:
            panels.append((row, series))
    fig = plt.figure(figsize=(7, 3.6 * max(1, len(panels))))
    if not panels:
        fig.text(0.5, 0.5, f"no run with a {CURVE_FILE} (protocol=fixed)", ha="center", va="center")
        return save_figure(fig, path)
    for i, (row, series) in enumerate(panels):
        ax = fig.add_subplot(len(panels), 1, i + 1)
        for init, epochs, mean, sd in series:
            (line,) = ax.plot(epochs, mean, marker="o", label=init)
            low = [m - s for m, s in zip(mean, sd, strict=True)]
            high = [m + s for m, s in zip(mean, sd, strict=True)]
            ax.fill_between(epochs, low, high, color=line.get_color(), alpha=0.15)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("fine-tune epoch")
        ax.set_ylabel(f"test {CURVE_SCORE}")
        ax.set_title(row.label())
        ax.legend(fontsize=8, ncol=2)
        ax.set_ylim(0, max(1e-3, max(max(m) for _, _, m, _ in series) * 1.15) if series else 1)
    fig.tight_layout()
    return save_figure(fig, path)


__all__ = ["CURVE_SCORE", "Curve", "curves_markdown", "normalised_area", "plot_curves", "read_curve"]
