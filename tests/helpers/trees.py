"""Tiny HCP and BraTS 2018 trees in the real datasets' layouts, for the DataModule and format
tests; independent of ``tmerge.data.synthetic.generate``."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

SHAPE = (22, 20, 18)
AFFINE = np.diag([3.0, 3.0, 3.0, 1.0])
# A few FreeSurfer values of each hemisphere/structure, covering paper classes 1..14.
ASEG_VALUES = np.array([8, 3, 1021, 10, 18, 11, 13, 24, 7, 2, 17, 4, 12, 28, 16, 0, 85])


def _brain(shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    centre = np.array(shape) / 2 + rng.uniform(-1, 1, 3)
    radii = np.array(shape) * rng.uniform(0.35, 0.42, 3)
    grid = np.indices(shape).astype(float)
    return sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radii, strict=True)) < 1


def _save(path: Path, data: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, AFFINE), path)


def write_hcp_tree(root: Path, n: int = 58, seed: int = 0, suffix: str = ".nii.gz") -> list[str]:
    """Write ``n`` HCP-layout subjects (T1, T2, aparc+aseg) of ``SHAPE``; return their ids."""
    rng = np.random.default_rng(seed)
    ids = [f"{100206 + 13 * i:06d}" for i in range(n)]
    for sid in ids:
        folder = root / sid / "T1w"
        brain = _brain(SHAPE, rng)
        aseg = np.where(brain, rng.choice(ASEG_VALUES, size=SHAPE), 0).astype(np.int32)
        for stem, base in (("T1w_acpc_dc_restore_brain", 300.0), ("T2w_acpc_dc_restore_brain", 500.0)):
            image = np.where(brain, base + 20 * (aseg % 9) + rng.normal(0, 5, SHAPE), 0).astype(np.float32)
            _save(folder / f"{stem}{suffix}", image)
        _save(folder / f"aparc+aseg{suffix}", aseg)
    return ids


def write_brats_tree(
    root: Path, n_train: int = 12, n_val: int = 2, seed: int = 0, suffix: str = ".nii.gz"
) -> tuple[list[str], list[str]]:
    """Write BraTS-2018-layout training (HGG/LGG, with nested tumours) and validation subjects."""
    rng = np.random.default_rng(seed)
    train = [f"Brats18_TCIA{i % 3}_{100 + i}_1" for i in range(n_train)]
    val = [f"Brats18_CBICA_V{i:02d}_1" for i in range(n_val)]
    for i, sid in enumerate(train + val):
        if i < n_train:
            folder = root / "MICCAI_BraTS_2018_Data_Training" / ("HGG" if i % 2 else "LGG") / sid
        else:
            folder = root / "MICCAI_BraTS_2018_Data_Validation" / sid
        brain = _brain(SHAPE, rng)
        c = np.array(SHAPE) // 2 + rng.integers(-2, 3, 3)
        dist = np.sqrt(sum((g - ci) ** 2 for g, ci in zip(np.indices(SHAPE), c, strict=True)))
        seg = np.select([dist < 1.5, dist < 2.5, dist < 4.5], [4, 1, 2], 0).astype(np.uint8) * brain
        for m, base in zip(("t1", "t1ce", "t2", "flair"), (200.0, 250.0, 400.0, 300.0), strict=True):
            image = np.where(brain, base + 30 * seg + rng.normal(0, 5, SHAPE), 0).astype(np.float32)
            _save(folder / f"{sid}_{m}{suffix}", image)
        if i < n_train:
            _save(folder / f"{sid}_seg{suffix}", seg)
    return train, val
