"""``tmerge sweep``: every initialisation of ``inits`` once per seed of ``seeds``, on identical
splits (the train/val draw of a seed is the same for every initialisation)."""

from __future__ import annotations

import dataclasses
import json
import logging

from tmerge.evaluate import format_summary
from tmerge.runs import TARGET_MARKER
from tmerge.stages.configs import TargetStageConfig
from tmerge.stages.target import ALIASES, describe, run_target

__all__ = ["ALIASES", "describe", "run_sweep"]  # ALIASES: the short keys of `tmerge sweep`, as of `tmerge target`

log = logging.getLogger("tmerge")


def run_sweep(cfg: TargetStageConfig) -> None:
    """Every initialisation in ``cfg.inits``, once per seed in ``cfg.seeds``, on identical splits.

    Logs a line when each run starts (``run k/N``) and one summary line when it has finished.
    """
    runs = [(seed, init) for seed in cfg.seeds for init in cfg.inits]
    for k, (seed, init) in enumerate(runs, start=1):
        log.info("sweep p%s: run %d/%d — seed %d, %s", cfg.data.portion, k, len(runs), seed, init)
        run_dir = run_target(dataclasses.replace(cfg, init=init, seed=seed))  # draw: see run_config
        if not (run_dir / TARGET_MARKER).is_file():  # a DDP rank other than 0: rank 0 writes the marker
            continue
        summary = json.loads((run_dir / TARGET_MARKER).read_text())
        log.info("sweep p%s seed %d %-12s test %s", cfg.data.portion, seed, init, format_summary(summary))
