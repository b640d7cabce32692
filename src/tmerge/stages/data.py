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
    # The files' shape when not size³: the subject centred in it, cropped or zero-padded at the
    # same voxel size, e.g. size=192 grid=[240,240,155] for BraTS's 1 mm geometry. None: size³.
    grid: list[int] | None = None
    seed: int = 0
    workers: int | None = None  # None: one process per core
    # Subjects per dataset: the paper's 58 HCP (its splits need them all), the BraTS-like
    # training and (unlabelled) validation sets of BraTS 2018's sizes.
    n_hcp: int = 58
    n_brats: int = 295
    n_brats_val: int = 66


def run_data(cfg: DataStageConfig) -> None:
    """Generate what is missing of the default datasets; say what was done."""
    from tmerge.data.synthetic.generate import generate_default

    root = default_root(cfg.data_dir)
    written = generate_default(
        root,
        kinds=tuple(cfg.kinds),
        size=cfg.size,
        grid=None if cfg.grid is None else tuple(cfg.grid),
        seed=cfg.seed,
        workers=cfg.workers,
        n_hcp=cfg.n_hcp,
        n_brats=cfg.n_brats,
        n_brats_val=cfg.n_brats_val,
    )
    for kind in cfg.kinds:
        n = written.get(kind, 0)
        log.info("%s: %s", root / kind, f"wrote {n} subjects" if n else "already complete")
