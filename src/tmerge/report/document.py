"""The report's main page (:data:`tmerge.report.REPORT_MD`): links to every table and figure,
what the merges learned (mixing ratios) and how far apart the sources are, and an account of the
runs they come from — config, key settings and git commit of each, and the runs that are missing
or unfinished."""

from __future__ import annotations

import os
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from tmerge.errors import RunError
from tmerge.report.diagnostics import (
    ALPHA_INITS,
    alpha_runs,
    distance_summary,
    per_source_alphas,
    summarise_alphas,
)
from tmerge.report.files import (
    CURVES_MD,
    ENDPOINTS_CSV,
    ENDPOINTS_MD,
    FIG3_EXAMPLES,
    FIG4_PAIRED,
    FIG5_ALPHAS,
    FIG5_TRAJECTORY,
    FIG_CURVES,
    PREMISE_MD,
    STATS_CSV,
    STATS_MD,
    TABLE2_CSV,
    TABLE2_MD,
    TABLE3_MD,
)
from tmerge.report.runs import SINGLE, RunIndex, TargetRun, config_value, init_sort_key, ordered_inits
from tmerge.report.tables import MISSING, Row, md_table
from tmerge.runs import (
    ALPHAS_FILE,
    CONFIG_FILE,
    FORGETTING_DIR,
    FORGETTING_EXAMPLES,
    FORGETTING_MD,
    FORGETTING_TABLE,
    SOURCE_MARKER,
    TARGETS_DIR,
    target_dir,
    target_root,
)

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
        return f"no {CONFIG_FILE}"
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
        if row.group == SINGLE:
            out += [
                target_dir(index.root, row.portion, i, target=index.target)
                for i in expected
                if index.find(row.portion, i, None) is None
            ]
            continue
        ran = {r.init for r in index.targets if r.portion == row.portion and r.seed is not None}
        for seed in row.seeds:
            for init in ordered_inits([*expected, *ran]):
                if index.find(row.portion, init, seed) is None:
                    out.append(target_dir(index.root, row.portion, init, seed, target=index.target))
    return out


def _run_line(run: TargetRun, out: Path, root: Path) -> list[str]:
    config = run.path / CONFIG_FILE
    return [
        f"`{_rel(run.path, root)}/`",
        run.status(),
        str(len(run.per_subject)) if run.usable else MISSING,
        commit_of(run.info),
        f"[{CONFIG_FILE}]({_rel(config, out)})" if config.is_file() else "none",
        key_settings(run.config),
    ]


def _alpha_line(run: TargetRun, root: Path) -> list[str]:
    """One line of the mixing-ratio table; a missing or malformed α file is said so."""
    where = run.path / ALPHAS_FILE
    head = [f"{run.portion} %", MISSING if run.seed is None else str(run.seed), run.init]
    if run.alphas is None:
        return [*head, f"no `{_rel(where, root)}`", *[MISSING] * 4]
    try:
        a = summarise_alphas(run.alphas, str(where))
    except RunError as exc:
        return [*head, str(exc), *[MISSING] * 4]
    if a.epochs is None:
        epochs = f"{MISSING} (no trajectory)"
    else:
        epochs = str(a.epochs) + (
            f", lowest val loss at epoch {a.best_epoch}" if a.best_epoch is not None else ""
        )
    return [*head, a.source, f"{a.low:.3f}–{a.high:.3f}", f"{a.mean:.3f}", str(a.n_layers), epochs]


#: What each initialisation uses besides the source weights (the report's methods table):
#: the sources' Fishers, a common base θ₀, the target's labels before fine-tuning (α learned on
#: the target, or a hyper-parameter grid chosen on its validation set), per-layer learned ratios.
METHOD_INFO: dict[str, tuple[str, str, str, str, str]] = {
    # init: (description, Fisher, base, target labels, learned per layer)
    "none": ("no transfer", "", "", "", ""),
    "m1": ("parameter transfer from M1", "", "", "", ""),
    "m2": ("parameter transfer from M2", "", "", "", ""),
    "imm": ("eq. 2, uniform α (mode-IMM)", "yes", "", "", ""),
    "mean-imm": ("average, uniform α", "", "", "", ""),
    "mean-timm": ("average, α learned per layer (layer-wise AdaMerging)", "", "", "yes", "yes"),
    "timm": ("eq. 2, α learned per layer (T-IMM)", "yes", "", "yes", "yes"),
    "task-arithmetic": ("θ₀ + λ Σ τ_t", "", "yes", "grid", ""),
    "ties": (
        "trim to k % (per tensor, or the whole model: `merge.trim`), sign election, disjoint mean of τ_t",
        "",
        "yes",
        "grid",
        "",
    ),
    "dare": ("random drop and rescale of τ_t, then sum", "", "yes", "grid", ""),
    "dare-ties": ("DARE, then tmerge's TIES (trim, sign election, disjoint mean)", "", "yes", "grid", ""),
    "slerp": ("spherical interpolation per tensor (linear where |cos| > 0.9995)", "", "", "grid", ""),
}


def methods_section(inits: Sequence[str]) -> str:
    """A table of the initialisations in ``inits``: what information each uses. "grid": the
    target's validation labels choose a hyper-parameter, when a grid of several is given."""
    known = [i for i in inits if i in METHOD_INFO]
    if not known:
        return ""
    rows = [[f"`{i}`", *METHOD_INFO[i]] for i in known]
    header = ["init", "what", "Fisher", "base θ₀", "target labels before fine-tuning", "learned per layer"]
    return "## Methods\n\n" + md_table(header, rows) + "\n"


def mixing_section(index: RunIndex) -> str:
    """``## Mixing ratios``: per portion and seed, the first source's α over layers of every
    finished ``timm`` and ``mean-timm`` run, and its number of adaption epochs."""
    runs = alpha_runs(index)
    parts = [
        "## Mixing ratios\n",
        "α of the first source model per mixed layer after the adaption stage, from each run's "
        f"`{ALPHAS_FILE}`: min–max and mean over the layers (with two sources the second's α is "
        "1 − α; IMM's uniform α is 1/T, 0.5 for two sources). `timm` learns α with the sources' "
        "Fishers, `mean-timm` with unit Fishers. Adaption epochs: entries of the file's "
        f"`trajectory` (α after each epoch; {MISSING} for files written before it was recorded), "
        "and the epoch with the lowest validation loss, whose α were kept.\n",
    ]
    if not runs:
        parts.append(f"No finished {' or '.join(ALPHA_INITS)} run.\n")
        return "\n".join(parts)
    parts.append(
        md_table(
            ["portion", "seed", "init", "first source", "α min–max", "α mean", "layers", "adaption epochs"],
            [_alpha_line(r, index.root) for r in runs],
        )
    )
    per_source = [(r, per_source_alphas(r.alphas)) for r in runs if isinstance(r.alphas, dict)]
    lines = [
        [str(r.portion), "—" if r.seed is None else str(r.seed), r.init, name, f"{mean:.3f}", f"{top:.0%}"]
        for r, found in per_source
        if found
        for name, (mean, top) in found.items()
    ]
    if lines:
        parts.append(
            "Per source: the mean α over the merged layers and the share of layers where the source "
            "has the largest α. In the negative control (`sources=[task1,task2,noise]`, "
            "`tmerge noise-source`) the noise source should have the smallest of both.\n"
        )
        parts.append(md_table(["portion", "seed", "init", "source", "mean α", "largest in"], lines))
    return "\n".join(parts)


def _range(values: tuple[float, float, float]) -> str:
    low, median, high = values
    return f"{median:.3f} ({low:.3f}–{high:.3f})"


def sources_section(index: RunIndex) -> str:
    """``## Sources``: each source run's ``distance_from_init`` — median and range over layers of
    ‖θ − θ_from‖/‖θ_from‖ and of the cosine — where its metrics (the source marker) record one."""
    parts = [
        "## Sources\n",
        "How far a source model moved from the model it was trained from (M2 from M1), per fused "
        "layer: the relative distance ‖θ₂ − θ₁‖/‖θ₁‖ and the cosine between θ₂ and θ₁, as median "
        f"(min–max) over layers, from `{SOURCE_MARKER}` → `distance_from_init`. IMM assumes the "
        "merged models sit in one basin of the loss: a relative distance near 1, or a cosine "
        "well below 1, says M2 has left M1's.\n",
    ]
    body, without, problems = [], [], []
    for s in index.sources:
        if not s.finished:
            continue
        try:
            d = distance_summary(s)
        except RunError as exc:
            problems.append(str(exc))
            continue
        if d is None:
            without.append(s.name)
            continue
        body.append([f"`{d.source}`", d.start, str(d.n_layers), _range(d.rel_distance), _range(d.cosine)])
    if body:
        parts.append(
            md_table(["run", "from", "layers", "rel. distance median (range)", "cosine median (range)"], body)
        )
    else:
        parts.append("No source run records `distance_from_init`.\n")
    if without:
        parts.append(
            f"No distance recorded (trained from scratch, or `{SOURCE_MARKER}` written before it was): "
            f"{', '.join(without)}.\n"
        )
    parts += [f"- {p}" for p in problems]
    return "\n".join(parts)


def report_markdown(
    index: RunIndex,
    rows: Sequence[Row],
    expected: Sequence[str],
    out: Path,
    table2_main: str,
    figure_notes: dict[str, list[str]],
    settings: dict[str, Any],
) -> str:
    """The text of the report's main page.

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
    target = "BraTS" if index.target == TARGETS_DIR else f"target {index.target} ({', '.join(index.classes)})"
    parts = [
        "# tmerge report" + ("" if index.target == TARGETS_DIR else f" — {target}") + "\n",
        f"Made {now} from the runs in `{index.root}`: {len(index.usable())} finished {target} runs, "
        f"{sum(s.finished for s in index.sources)} finished source runs, "
        f"{sum(f.table is not None for f in index.forgetting)} forgetting tables.\n",
        "## Tables\n",
        f"- [Premise checks]({PREMISE_MD}) — first: can this target reward transfer at all? The "
        "frozen-feature probe (each init's P against random P), no transfer at each portion, and "
        "whether the sources converged\n",
        f"- [Table 2]({TABLE2_MD}) — test Dice (ET, TC, WT, mean) and HD95 per initialisation and "
        f"portion ([CSV]({TABLE2_CSV}))\n"
        f"- [Endpoints]({ENDPOINTS_MD}) — the primary endpoint (per subject the mean Dice of the "
        "classes present in its truth: TC, WT and ET where present), each class over all "
        "subjects, a class some subjects lack over those that have it, and the share of those "
        f"without it predicted empty, and the primary endpoint's comparisons paired by seed with "
        f"their intervals and MDE ([CSV]({ENDPOINTS_CSV}))\n"
        f"- [Table 3]({TABLE3_MD}) — epochs and validation scores of the adaption and fine-tune stages\n"
        f"- [Learning curves]({CURVES_MD}) ([figure]({FIG_CURVES})) — fixed-protocol runs: test Dice after "
        "fine-tune epochs 1, 2, 4, … and the last; start, area under the curve and end per init\n"
        f"- [Table 4]({FORGETTING_MD}) — forgetting of the source tasks\n"
        f"- [Paired statistics]({STATS_MD}) — T-IMM − other: across seeds (hierarchical bootstrap CI, "
        "training variance included) and per subject (bootstrap CI, Wilcoxon p; training variance "
        f"ignored) ([CSV]({STATS_CSV})). Beside every interval stands its minimal detectable "
        "difference (MDE): the smallest true difference its seeds (or subjects) would detect with "
        f"80 % power in a two-sided test at {1 - float(settings.get('level', 0.95)):.0%}. An interval that contains 0 rules out only "
        "differences larger than its MDE; the seed-aware table also says how many seeds would "
        "bring the interval and the MDE down to the size of the difference in question.\n",
        *(f"{note}\n" for note in figure_notes.get("targets", [])),
        table2_main,
        "## Figures\n",
    ]
    captions = {
        FIG4_PAIRED: "Fig. 4 — per-subject Dice difference T-IMM − other, subjects sorted by "
        "T-IMM's Dice; the legend gives the mean difference, its bootstrap CI and the Wilcoxon p.",
        FIG5_ALPHAS: "Fig. 5 — mixing ratio α per layer and source model after the adaption "
        "stage (dashed: IMM's uniform ratio).",
        FIG5_TRAJECTORY: "Fig. 5b — α of the first source per layer (one line each, "
        "coloured by depth) after each adaption epoch, for the T-IMM run of each portion (the "
        "single-seed run, else the lowest seed); dotted: the epoch kept (lowest validation loss).",
        FIG3_EXAMPLES: "Fig. 3 — one axial slice per method: the source tasks' parcellation "
        "by each initialisation's P (forgetting) and the tumour segmentation of each initialisation.",
    }
    for name, caption in captions.items():
        parts.append(f"### {caption.split(' — ')[0]}\n\n![{name}]({name})\n\n{caption}\n")
        for note in figure_notes.get(name, []):
            parts.append(f"- {note}")
        parts.append("")
    parts.append(methods_section(sorted({r.init for r in index.targets}, key=init_sort_key)))
    parts.append(mixing_section(index))
    parts.append(sources_section(index))
    parts.append("## Runs\n")
    parts.append(f"### {target} runs\n")
    if index.targets:
        parts.append(
            md_table(
                ["run folder", "status", "n", "commit", "config", "key settings"],
                [_run_line(r, out, index.root) for r in index.targets],
            )
        )
    else:
        parts.append(f"No run folder under `{target_root(index.root, index.target)}`.\n")
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
            config = s.path / CONFIG_FILE
            body.append(
                [
                    f"`{s.name}`",
                    "finished" if s.finished else f"unfinished (no {SOURCE_MARKER})",
                    MISSING if m.get("val_dice") is None else f"{m['val_dice']:.3f}",
                    f"{m['epochs']} ({m.get('best_epoch', '?')})" if "epochs" in m else MISSING,
                    commit_of(s.info),
                    f"[{CONFIG_FILE}]({_rel(config, out)})" if config.is_file() else "none",
                ]
            )
        parts.append(md_table(["run", "status", "val Dice", "epochs (best)", "commit", "config"], body))
    else:
        parts.append("No source run found.\n")
    parts.append("### Forgetting\n")
    if index.forgetting:
        parts.append(
            md_table(
                ["folder", FORGETTING_TABLE, FORGETTING_EXAMPLES],
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
        parts.append(f"No `{FORGETTING_DIR}/p<portion>/` folder.\n")
    parts.append("## Report settings\n")
    parts.append("\n".join(f"- {k}: `{v}`" for k, v in settings.items()) + "\n")
    return "\n".join(parts)
