"""``report.md``: links to every table and figure, and an account of the runs they come from —
config, key settings and git commit of each, and the runs that are missing or unfinished."""

from __future__ import annotations

import os
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from tmerge.report.runs import SINGLE, RunIndex, TargetRun, config_value, ordered_inits
from tmerge.report.tables import MISSING, Row, md_table

#: Settings shown beside each BraTS run: (label, config key).
KEY_SETTINGS: tuple[tuple[str, str], ...] = (
    ("seed", "seed"),
    ("base_filters", "net.base_filters"),
    ("depth", "net.depth"),
    ("patch", "data.patch_size"),
    ("max_epochs", "trainer.max_epochs"),
    ("adaption.max_epochs", "adaption.max_epochs"),
    ("lr", "optim.lr"),
)


def commit_of(info: dict[str, Any] | None) -> str:
    """The run's git commit (short, ``+dirty`` with uncommitted changes) or "unknown"."""
    commit = (info or {}).get("commit")
    if not commit:
        return "unknown"
    return str(commit)[:10] + ("+dirty" if (info or {}).get("dirty") else "")


def key_settings(config: dict[str, Any] | None) -> str:
    if config is None:
        return "no config.yaml"
    pairs = [(label, config_value(config, key)) for label, key in KEY_SETTINGS]
    return " ".join(f"{label}={value}" for label, value in pairs if value is not None)


def _rel(path: Path, start: Path) -> str:
    return Path(os.path.relpath(path, start)).as_posix()


def missing_runs(index: RunIndex, rows: Sequence[Row], expected: Sequence[str]) -> list[Path]:
    """Run folders of the expected initialisations that do not exist, per table row (for a sweep
    row, per seed; a sweep's expected initialisations also include those it ran at any seed)."""
    out = []
    expected = ordered_inits(expected)
    for row in rows:
        base = index.root / "brats" / f"p{row.portion}"
        if row.group == SINGLE:
            out += [base / i for i in expected if index.find(row.portion, i, None) is None]
            continue
        ran = {r.init for r in index.targets if r.portion == row.portion and r.seed is not None}
        for seed in row.seeds:
            for init in ordered_inits([*expected, *ran]):
                if index.find(row.portion, init, seed) is None:
                    out.append(base / f"seed{seed}" / init)
    return out


def _run_line(run: TargetRun, out: Path, root: Path) -> list[str]:
    config = run.path / "config.yaml"
    return [
        f"`{_rel(run.path, root)}/`",
        run.status() + ("; legacy CSV (Dice only)" if run.legacy else ""),
        str(len(run.per_subject)) if run.usable else MISSING,
        commit_of(run.info),
        f"[config.yaml]({_rel(config, out)})" if config.is_file() else "none",
        key_settings(run.config),
    ]


def report_markdown(
    index: RunIndex,
    rows: Sequence[Row],
    expected: Sequence[str],
    out: Path,
    table2_main: str,
    figure_notes: dict[str, list[str]],
    settings: dict[str, Any],
) -> str:
    """The text of ``report.md``.

    Args:
        index: the runs found.
        rows: Table 2's rows (for the list of missing runs).
        expected: the initialisations every row is expected to have.
        out: the report folder (links are relative to it).
        table2_main: Table 2's main sub-table, repeated inline.
        figure_notes: figure file → notes (what could not be drawn and why).
        settings: the report's own settings, listed at the end.
    """
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    parts = [
        "# tmerge report\n",
        f"Made {now} from the runs in `{index.root}`: {len(index.usable())} finished BraTS runs, "
        f"{sum(s.finished for s in index.sources)} finished source runs, "
        f"{sum(f.table is not None for f in index.forgetting)} forgetting tables.\n",
        "## Tables\n",
        "- [Table 2](table2.md) — test Dice (ET, TC, WT, mean) and HD95 per initialisation and "
        "portion ([CSV](table2.csv))\n"
        "- [Table 3](table3.md) — epochs and validation scores of the adaption and fine-tune stages\n"
        "- [Table 4](table4.md) — forgetting of the source tasks\n"
        "- [Paired statistics](stats.md) — T-IMM − other per subject: mean, bootstrap CI, Wilcoxon p\n",
        table2_main,
        "## Figures\n",
    ]
    captions = {
        "fig4_paired.png": "Fig. 4 — per-subject Dice difference T-IMM − other, subjects sorted by "
        "T-IMM's Dice; the legend gives the mean difference, its bootstrap CI and the Wilcoxon p.",
        "fig5_alphas.png": "Fig. 5 — mixing ratio α per layer and source model after the adaption "
        "stage (dashed: IMM's uniform ratio).",
        "fig3_examples.png": "Fig. 3 — one axial slice per method: the source tasks' parcellation "
        "by each initialisation's P (forgetting) and the tumour segmentation of each initialisation.",
    }
    for name, caption in captions.items():
        parts.append(f"### {caption.split(' — ')[0]}\n\n![{name}]({name})\n\n{caption}\n")
        for note in figure_notes.get(name, []):
            parts.append(f"- {note}")
        parts.append("")
    parts.append("## Runs\n")
    parts.append("### BraTS runs\n")
    if index.targets:
        parts.append(
            md_table(
                ["run folder", "status", "n", "commit", "config", "key settings"],
                [_run_line(r, out, index.root) for r in index.targets],
            )
        )
    else:
        parts.append(f"No run folder under `{index.root / 'brats'}`.\n")
    missing = missing_runs(index, rows, expected)
    not_used = [r for r in index.targets if not r.usable]
    parts.append("### Missing and unfinished runs\n")
    if not missing and not not_used:
        parts.append("None.\n")
    for path in missing:
        parts.append(f"- `{_rel(path, index.root)}/`: missing")
    for run in not_used:
        parts.append(f"- `{_rel(run.path, index.root)}/`: {run.status()}")
    warnings = [(r, w) for r in index.targets for w in r.warnings]
    if warnings:
        parts.append("\n### Warnings\n")
        parts += [f"- `{_rel(r.path, index.root)}/`: {w}" for r, w in warnings]
    parts.append("\n### Source runs\n")
    if index.sources:
        body = []
        for s in index.sources:
            m = s.metrics or {}
            config = s.path / "config.yaml"
            body.append(
                [
                    f"`{s.name}`",
                    "finished" if s.finished else "unfinished (no metrics.json)",
                    MISSING if m.get("val_dice") is None else f"{m['val_dice']:.3f}",
                    f"{m['epochs']} ({m.get('best_epoch', '?')})" if "epochs" in m else MISSING,
                    commit_of(s.info),
                    f"[config.yaml]({_rel(config, out)})" if config.is_file() else "none",
                ]
            )
        parts.append(md_table(["run", "status", "val Dice", "epochs (best)", "commit", "config"], body))
    else:
        parts.append("No source run found.\n")
    parts.append("### Forgetting\n")
    if index.forgetting:
        parts.append(
            md_table(
                ["folder", "table4.json", "examples.npz"],
                [
                    [
                        f"`{_rel(f.path, index.root)}`",
                        "yes" if f.table else "no",
                        "yes" if f.examples else "no",
                    ]
                    for f in index.forgetting
                ],
            )
        )
    else:
        parts.append("No `forgetting/p<portion>/` folder.\n")
    parts.append("## Report settings\n")
    parts.append("\n".join(f"- {k}: `{v}`" for k, v in settings.items()) + "\n")
    return "\n".join(parts)
