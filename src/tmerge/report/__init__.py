"""``tmerge report``: the paper's tables and figures, with paired statistics, from finished runs.

Reads every run folder under the runs root (:mod:`tmerge.report.runs`) and writes
``<runs>/report/``, the files named here (their names are :mod:`tmerge.report.files`'; Table 4
keeps the forgetting stage's name, :data:`tmerge.runs.FORGETTING_MD`):

=================== =========================================================================
``table2.md/.csv``  test Dice (ET, TC, WT, mean) and HD95 per initialisation and portion
``endpoints.md/.csv`` the primary endpoint (Dice of the classes present in each subject's truth)
                    and the endpoints that are not coins, per initialisation and portion
``table3.md``       epochs and validation scores of T-IMM's adaption and fine-tune stages
Table 4             forgetting: P of M1, M2, IMM, T-IMM with each source task's S
``stats.md/.csv``   T-IMM − other across seeds (hierarchical bootstrap CI) and per subject
                    (bootstrap CI, Wilcoxon p, Holm-adjusted; training variance ignored), each
                    with its minimal detectable difference (80 % power)
``fig4_paired.png`` per-subject Dice differences, subjects sorted by T-IMM's Dice
``fig5_alphas.png`` learned α per layer and source model
``fig5_alpha_trajectory.png`` α of the first source per layer over the adaption epochs
``fig3_examples.png`` one axial slice per method: parcellation (forgetting) and tumours
``report.md``       links to all of the above; mixing ratios, the sources' distance, and
                    config, settings and commit of every run
=================== =========================================================================

Only finished runs are used; missing and unfinished ones are shown as such, never filled in.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tmerge.errors import ConfigError, RunError
from tmerge.io import write_text
from tmerge.paths import runs_dir
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
    REPORT_DIR,
    REPORT_MD,
    STATS_CSV,
    STATS_MD,
    TABLE2_CSV,
    TABLE2_MD,
    TABLE3_MD,
)
from tmerge.runs import TARGETS_DIR, target_roots

log = logging.getLogger("tmerge")

@dataclass
class ReportConfig:
    """Config of ``tmerge report``."""

    runs_dir: str | None = None  # None: $TMERGE_RUNS or ./runs
    out_dir: str | None = None  # None: <runs>/report
    reference: str = "timm"  # the initialisation every other one is compared with
    # Rows and columns shown even without runs (as "—"), so that gaps are visible: the paper's
    # portions and the default sweep. Portions and initialisations found on disk are added.
    portions: list[int] = field(default_factory=lambda: [4, 8, 100])
    inits: list[str] = field(
        default_factory=lambda: ["none", "m1", "m2", "imm", "mean-imm", "mean-timm", "timm"]
    )
    bootstrap: int = 10_000  # resamples per CI: the usual size for percentile intervals, < 1 s each
    seed: int = 0  # of every comparison's numpy Generator: the same runs give the same report
    # Fewer pairs get no test: a two-sided Wilcoxon test cannot reach p < 0.05 below 6 pairs.
    min_pairs: int = 6
    level: float = 0.95  # coverage of the bootstrap CI
    # The half-width and MDE the seed-aware table counts the seeds for: about the paper's T-IMM − IMM.
    target_difference: float = 0.03


ALIASES = {"out": "out_dir"}


def check_config(cfg: ReportConfig) -> None:
    """Reject settings no report can be made with, naming the key."""
    if cfg.bootstrap < 1:
        raise ConfigError(f"bootstrap: expected a number of resamples >= 1, got {cfg.bootstrap}")
    if not 0.0 < cfg.level < 1.0:
        raise ConfigError(f"level: expected a coverage in (0, 1), got {cfg.level}")
    if not cfg.target_difference > 0:
        raise ConfigError(f"target_difference: expected a difference > 0, got {cfg.target_difference}")
    if cfg.min_pairs < 1:
        raise ConfigError(f"min_pairs: expected >= 1, got {cfg.min_pairs}")
    if any(p <= 0 or p > 100 for p in cfg.portions):
        raise ConfigError(f"portions: expected percentages in 1..100, got {list(cfg.portions)}")


def run_report(cfg: ReportConfig) -> Path:
    """Write the report of the runs under ``cfg.runs_dir``; return its folder.

    Raises:
        RunError: the runs folder does not exist.
        ConfigError: an invalid setting (see :func:`check_config`).
    """
    from tmerge.report.runs import discover

    check_config(cfg)
    root = runs_dir(cfg.runs_dir)
    if not root.is_dir():
        raise RunError(
            f"{root}: runs folder not found; train first (make task1 task2 timm) or set runs_dir / TMERGE_RUNS"
        )
    out = Path(cfg.out_dir) if cfg.out_dir else root / REPORT_DIR
    others = [t for t in target_roots(root) if t != TARGETS_DIR]
    for target in others:  # each other target's own report, in a folder of the main one
        _report_target(cfg, discover(root, target), out / target, main=False)
    return _report_target(cfg, discover(root), out, main=True, others=others)


def _report_target(
    cfg: ReportConfig, index: Any, out: Path, *, main: bool, others: Sequence[str] = ()
) -> Path:
    """One target's report into ``out``: Tables 2 and 3, the statistics and the figures; the
    main (BraTS) one also Table 4, the examples and links to the ``others``' reports."""
    from tmerge.report import figures
    from tmerge.report.curves import curves_markdown, plot_curves
    from tmerge.report.document import report_markdown
    from tmerge.report.endpoints import endpoints_csv, endpoints_markdown
    from tmerge.report.examples import parcellation_rows, tumour_rows
    from tmerge.report.paired import compare_row, compare_seeds, seed_aware_rows
    from tmerge.report.panels import alpha_panels, paired_panels, trajectory_panels
    from tmerge.report.premise import premise_markdown
    from tmerge.report.stats_page import stats_csv, stats_markdown
    from tmerge.report.tables import (
        scoring_header,
        table2_csv,
        table2_markdown,
        table3_markdown,
        table4_markdown,
        table_inits,
        table_rows,
    )
    from tmerge.runs import ALPHAS_FILE, FORGETTING_DIR, FORGETTING_MD

    root = index.root
    # The paper's portions are expected rows for BraTS; another target shows the portions it has.
    rows = table_rows(index, cfg.portions if main else [])
    inits = table_inits(index, [*cfg.inits, cfg.reference])
    log.info(
        "report: %d %s run folders (%d finished), %d source runs, %d forgetting folders under %s",
        len(index.targets),
        index.target,
        len(index.usable()),
        len(index.sources),
        len(index.forgetting),
        root,
    )

    table2 = table2_markdown(index, rows, inits)
    write_text(out / TABLE2_MD, table2)
    write_text(out / TABLE2_CSV, table2_csv(index, rows, inits))
    write_text(out / ENDPOINTS_MD, endpoints_markdown(index, rows, inits))
    write_text(out / ENDPOINTS_CSV, endpoints_csv(index, rows, inits))
    write_text(out / TABLE3_MD, table3_markdown(index, rows, inits, cfg.reference))
    write_text(out / PREMISE_MD, premise_markdown(index, rows, inits))  # before any comparison
    write_text(out / CURVES_MD, curves_markdown(index, rows, inits))  # fixed protocol: start, area, end
    plot_curves(index, rows, inits, out / FIG_CURVES)
    if main:
        write_text(out / FORGETTING_MD, table4_markdown(index.forgetting))

    stats = dict(n_boot=cfg.bootstrap, seed=cfg.seed, min_pairs=cfg.min_pairs)
    comparisons = {
        row: compare_row(index, row, inits, cfg.reference, **stats, level=cfg.level) for row in rows
    }
    # Across seeds: the same bootstrap size and seed, min_pairs does not apply (every seed's pairs
    # are resampled together, and the interval's honesty rests on the number of seeds).
    seed_aware = {
        row: compare_seeds(
            index, row, inits, cfg.reference, n_boot=cfg.bootstrap, seed=cfg.seed, level=cfg.level
        )
        for row in seed_aware_rows(rows)
    }
    target = cfg.target_difference
    write_text(
        out / STATS_MD,
        stats_markdown(
            comparisons,
            inits,
            cfg.reference,
            **stats,
            level=cfg.level,
            seed_aware=seed_aware,
            target=target,
            scoring=scoring_header("dice_mean", index.usable()),
        ),
    )
    write_text(out / STATS_CSV, stats_csv(comparisons, seed_aware, target))

    notes: dict[str, list[str]] = {}
    panels = paired_panels(index, comparisons, cfg.reference)
    if not panels:
        notes[FIG4_PAIRED] = [f"no row has a finished {cfg.reference} run and another finished run"]
    figures.plot_paired(panels, out / FIG4_PAIRED, empty="; ".join(notes.get(FIG4_PAIRED, [])))
    alphas = alpha_panels(index, rows, cfg.reference)
    if not alphas:
        notes[FIG5_ALPHAS] = [f"no finished {cfg.reference} run with {ALPHAS_FILE}"]
    figures.plot_alphas(alphas, out / FIG5_ALPHAS, empty="; ".join(notes.get(FIG5_ALPHAS, [])))
    paths, notes[FIG5_TRAJECTORY] = trajectory_panels(index, cfg.reference)
    if not paths and not notes[FIG5_TRAJECTORY]:
        notes[FIG5_TRAJECTORY] = [f"no finished {cfg.reference} run with {ALPHAS_FILE}"]
    figures.plot_alpha_trajectory(paths, out / FIG5_TRAJECTORY, empty="; ".join(notes[FIG5_TRAJECTORY]))
    parcellation, p_notes = parcellation_rows(index.forgetting)
    if not index.forgetting:
        p_notes = [f"no {FORGETTING_DIR}/p<portion>/ folder (make forgetting PORTION=…)"]
    tumours, t_notes = tumour_rows(index, rows, inits, cfg.reference) if main else ([], [f"{index.target}: tumour examples are BraTS'"])
    if not tumours and not t_notes:
        t_notes = ["no finished BraTS run"]
    figures.plot_examples(
        [
            ("Parcellation of the source tasks by each P (forgetting, paper Fig. 3)", parcellation, p_notes),
            (
                "Tumour segmentation per initialisation (FLAIR; red NCR/NET, green oedema, yellow ET)",
                tumours,
                t_notes,
            ),
        ],
        out / FIG3_EXAMPLES,
    )
    notes[FIG3_EXAMPLES] = [*p_notes, *t_notes]

    main_table = table2.split("\n## ", 2)[1] if "\n## " in table2 else ""
    if others:
        links = ", ".join(f"[{t}]({t}/{REPORT_MD})" for t in others)
        notes["targets"] = [f"other targets' reports: {links}"]
    write_text(
        out / REPORT_MD,
        report_markdown(
            index,
            rows,
            [*cfg.inits, cfg.reference],
            out,
            "### Table 2 — " + main_table if main_table else "",
            notes,
            asdict(cfg),
        ),
    )
    log.info("report: wrote %s", out / REPORT_MD)
    return out
