"""``tmerge data``: generate the embedded default datasets (docs/data.md)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from tmerge.paths import default_root

log = logging.getLogger("tmerge")


@dataclass
class DataStageConfig:
    """Config of ``tmerge data``."""

    data_dir: str | None = None  # None: $TMERGE_DATA or ./data; datasets go to <data_dir>/default/
    kinds: list[str] = field(default_factory=lambda: ["hcp", "brats"])
    size: int = 64  # grid edge in voxels; 64 → 3 mm isotropic over a 192 mm field of view
    seed: int = 0
    workers: int | None = None  # None: one process per core


def run_data(cfg: DataStageConfig) -> None:
    """Generate what is missing of the default datasets; say what was done."""
    from tmerge.data.generate import generate_default

    root = default_root(cfg.data_dir)
    written = generate_default(
        root, kinds=tuple(cfg.kinds), size=cfg.size, seed=cfg.seed, workers=cfg.workers
    )
    for kind in cfg.kinds:
        n = written.get(kind, 0)
        log.info("%s: %s", root / kind, f"wrote {n} subjects" if n else "already complete")
