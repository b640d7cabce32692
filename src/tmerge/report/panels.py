"""What Fig. 4, Fig. 5 and Fig. 5b draw, gathered from the runs: one panel per table row (Fig. 5b:
per portion) with data."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from tmerge.errors import RunError
from tmerge.report.diagnostics import ALPHA_INITS, trajectory, trajectory_run
from tmerge.report.figures import AlphaPanel, PairedPanel, TrajectoryPanel
from tmerge.report.paired import Comparison, subject_means
from tmerge.report.runs import RunIndex
from tmerge.report.tables import Row, row_runs
from tmerge.runs import ALPHAS_FILE


def _legend(c: Comparison) -> str:
    r = c.result
    text = f"{c.scores.other}: {r.mean_diff:+.3f}" if r.mean_diff is not None else c.scores.other
    if r.ci is not None:
        text += f" [{r.ci[0]:+.3f}, {r.ci[1]:+.3f}]"
    if r.p is not None:
        text += f", p={r.p:.2g}"
    elif r.note:
        text += f" ({r.note})"
    if c.scores.seeds:
        text += f", seeds {','.join(map(str, c.scores.seeds))}"
    return text


def paired_panels(
    index: RunIndex, comparisons: Mapping[Row, Sequence[Comparison]], reference: str
) -> list[PairedPanel]:
    """Fig. 4's panels: per row, every comparison's per-subject differences. The x order is the
    reference's per-subject score (averaged over all its finished seeds for a sweep)."""
    panels = []
    for row, found in comparisons.items():
        if not found:
            continue
        panels.append(
            PairedPanel(
                title=f"{row.label()}: {reference} − other, per test subject "
                "(legend: mean difference [bootstrap CI], Wilcoxon p)",
                reference=reference,
                reference_scores=subject_means(row_runs(index, row, reference)),
                series=[(_legend(c), c.scores.differences()) for c in found],
            )
        )
    return panels


def alpha_panels(index: RunIndex, rows: Sequence[Row], reference: str) -> list[AlphaPanel]:
    """Fig. 5's panels: α per layer and source of each row's ``reference`` runs (mean ± std over
    a sweep's seeds, on the layers every seed mixed)."""
    panels = []
    for row in rows:
        runs = [r for r in row_runs(index, row, reference) if r.alphas and r.alphas.get("alphas")]
        if not runs:
            continue
        first = runs[0].alphas or {}
        layers = [
            layer
            for layer in first.get("layers", list(first["alphas"]))
            if all(layer in (r.alphas or {})["alphas"] for r in runs)
        ]
        stack = np.array([[(r.alphas or {})["alphas"][layer] for layer in layers] for r in runs], dtype=float)
        n_sources = stack.shape[2] if stack.ndim == 3 else 0
        sources = list(first.get("sources") or [f"source {t + 1}" for t in range(n_sources)])
        seeds = [r.seed for r in runs if r.seed is not None]
        title = f"{row.label()}: α after the adaption stage"
        if len(runs) > 1:
            title += f" (mean ± std over seeds {','.join(map(str, seeds))})"
        panels.append(
            AlphaPanel(
                title=title,
                layers=layers,
                sources=sources,
                mean=stack.mean(axis=0),
                std=stack.std(axis=0, ddof=1) if len(runs) > 1 else None,
            )
        )
    return panels


def trajectory_panels(index: RunIndex, reference: str) -> tuple[list[TrajectoryPanel], list[str]]:
    """Fig. 5b's panels: per portion, the α trajectory of one ``reference`` run (the single-seed
    run, else the lowest seed; ``timm`` where the reference learns no α), and notes on the
    portions whose runs have none.
    """
    init = reference if reference in ALPHA_INITS else "timm"
    panels, notes = [], []
    for portion in index.portions():
        run = trajectory_run(index, portion, init)
        if run is None:
            if any(r.portion == portion and r.init == init for r in index.usable()):
                notes.append(
                    f"{portion} %: no {init} {ALPHAS_FILE} with a trajectory (written before it was recorded)"
                )
            continue
        try:
            path = trajectory(run.alphas or {}, str(run.path / ALPHAS_FILE))
        except RunError as exc:
            notes.append(str(exc))
            continue
        if path is None:
            continue
        where = "single run" if run.seed is None else f"seed {run.seed}"
        panels.append(
            TrajectoryPanel(
                title=f"{portion} % ({where}): {init} α of {path.source} per layer over the adaption epochs",
                source=path.source,
                n_sources=path.n_sources,
                epochs=path.epochs,
                layers=path.layers,
                values=path.values,
                best_epoch=path.best_epoch(),
            )
        )
    return panels, notes
