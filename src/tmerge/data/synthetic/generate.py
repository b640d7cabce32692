"""Write the embedded default datasets (HCP-like and BraTS-like) in the real datasets' layouts.

``generate_default(root)`` fills ``root/hcp`` and ``root/brats`` with synthetic subjects
(:mod:`tmerge.data.synthetic.subjects`) so that the same readers serve the default and the real data::

    root/hcp/<6-digit id>/T1w/{T1w,T2w}_acpc_dc_restore_brain.nii.gz, aparc+aseg.nii.gz
    root/brats/MICCAI_BraTS_2018_Data_Training/{HGG,LGG}/Brats18_SYN_0001_1/Brats18_SYN_0001_1_{t1,t1ce,t2,flair,seg}.nii.gz
    root/brats/MICCAI_BraTS_2018_Data_Validation/Brats18_SYNV_0001_1/Brats18_SYNV_0001_1_{t1,t1ce,t2,flair}.nii.gz
    root/brats-validation-labels/Brats18_SYNV_0001_1_seg.nii.gz

The validation set plays BraTS's online leaderboard set: its label maps are written outside the
dataset root, where no stage looks, so that ``tmerge score labels=root/brats-validation-labels
predictions=runs/brats/p100/<init>/predictions/validation`` grades a 100 % run's submission the
way the leaderboard would, while model selection never sees them.

Guarantees:

- **Deterministic**: subject ``i`` of a kind draws only from an RNG seeded by ``(seed, kind, i)``,
  so a subset, a resumed run or a parallel run writes the same arrays
  (:mod:`tmerge.data.synthetic.ids`).
- **Atomic per subject**: a subject is written into a hidden temporary folder beside its final
  place and renamed into place, so a killed run never leaves a half subject
  (:mod:`tmerge.data.synthetic.write`).
- **Idempotent**: ``root/<kind>/.tmerge_manifest.json`` (generator version, size, grid, seed, counts) is
  written last; with it present and every file there, a re-run touches nothing. Missing subjects
  are regenerated. A folder generated with other settings, or holding other data, is refused
  (:mod:`tmerge.data.synthetic.manifest`).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from tmerge.data.formats import BRATS2018_TRAINING, BRATS2018_VALIDATION
from tmerge.data.synthetic.ids import (
    STRUCTURES_TEST,
    STRUCTURES_TRAINING,
    brats_grade,
    brats_subject_id,
    hcp_subject_ids,
    structures_case_id,
)
from tmerge.data.synthetic.manifest import MANIFEST_NAME, PENDING_NAME, folder_settings, folder_state
from tmerge.data.synthetic.write import BRATS_MODALITIES, HCP_NIFTI, Job, remove_stale_tmp, run_jobs
from tmerge.errors import DataError
from tmerge.io import write_json

KINDS = ("hcp", "brats", "structures")
# The datasets' names are their layouts' (tmerge.data.formats): the generated data is read as real data.
#: Beside ``root/brats``, not in it: the stages read the dataset root only.
BRATS_VALIDATION_LABELS = "brats-validation-labels"


def structures_dataset_json(n_training: int) -> dict[str, Any]:
    """The ``structures`` target's nnU-Net v2 ``dataset.json``."""
    from tmerge.data.synthetic.subjects import STRUCTURES_CHANNELS, STRUCTURES_CLASSES

    return {
        "channel_names": {str(i): name for i, name in enumerate(STRUCTURES_CHANNELS)},
        "labels": {"background": 0, **{name: value for value, (name, _) in STRUCTURES_CLASSES.items()}},
        "numTraining": n_training,
        "file_ending": ".nii.gz",
        "description": "tmerge's synthetic 'structures' target: task-1 structures (thalamus, caudate) "
        "in three contrasts no source saw, on subjects no source saw",
    }


def _jobs(root: Path, kind: str, seed: int, n_hcp: int, n_brats: int, n_brats_val: int) -> list[Job]:
    """Every subject of ``kind`` under ``root/<kind>``, complete or not."""
    base = root / kind
    if kind == "structures":
        from tmerge.data.synthetic.subjects import STRUCTURES_CHANNELS

        def images(folder: str, case: str) -> tuple[str, ...]:
            return tuple(f"{folder}/{case}_{c:04d}.nii.gz" for c in range(len(STRUCTURES_CHANNELS)))

        train = [
            Job("structures", i, base, (*images("imagesTr", c), f"labelsTr/{c}.nii.gz"))
            for i, c in ((i, structures_case_id(i)) for i in range(STRUCTURES_TRAINING))
        ]
        test = [
            Job("structures_ts", i, base, images("imagesTs", structures_case_id(i, test=True)))
            for i in range(STRUCTURES_TEST)
        ]
        return train + test
    if kind == "hcp":
        return [
            Job("hcp", i, base / sid, tuple(f"T1w/{name}" for name in HCP_NIFTI))
            for i, sid in enumerate(hcp_subject_ids(seed, n_hcp))
        ]
    jobs = []
    for i in range(n_brats):
        sid, grade = brats_subject_id(i), brats_grade(seed, i)
        files = tuple(f"{sid}_{m}.nii.gz" for m in (*BRATS_MODALITIES, "seg"))
        jobs.append(Job("brats", i, base / BRATS2018_TRAINING / grade / sid, files, grade))
    for i in range(n_brats_val):
        sid, grade = brats_subject_id(i, validation=True), brats_grade(seed, i, validation=True)
        files = tuple(f"{sid}_{m}.nii.gz" for m in BRATS_MODALITIES)
        label = root / BRATS_VALIDATION_LABELS / f"{sid}_seg.nii.gz"
        jobs.append(Job("brats_val", i, base / BRATS2018_VALIDATION / sid, files, grade, label))
    return jobs


def _check_args(
    kinds: Sequence[str],
    size: int,
    seed: int,
    counts: dict[str, int],
    workers: int | None,
    grid: Sequence[int] | None = None,
) -> None:
    if isinstance(kinds, str):
        raise DataError(f"kinds={kinds!r}: expected a sequence of names such as ('hcp', 'brats')")
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        raise DataError(f"kinds: unknown dataset kind(s) {unknown}; expected a subset of {list(KINDS)}")
    for name, value in {"size": size, "seed": seed, **counts}.items():
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 0:
            raise DataError(f"{name}={value!r}: expected a non-negative integer")
    if size < 8:
        raise DataError(f"size={size}: expected at least 8 voxels per axis (64 by default, 32 for tests)")
    if grid is not None and (
        isinstance(grid, str)
        or len(grid) != 3
        or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= 8 for v in grid)
    ):
        raise DataError(
            f"grid={grid!r}: expected three voxel counts >= 8 (e.g. BraTS's 240, 240, 155 with size=192, "
            "i.e. 1 mm), or None for the size³ cube"
        )
    if workers is not None and (not isinstance(workers, (int, np.integer)) or workers < 1):
        raise DataError(f"workers={workers!r}: expected a positive integer or None (all CPU cores)")


def generate_default(
    root: Path,
    *,
    kinds: Sequence[str] = ("hcp", "brats"),
    size: int = 64,
    grid: Sequence[int] | None = None,
    seed: int = 0,
    n_hcp: int = 58,
    n_brats: int = 295,
    n_brats_val: int = 66,
    workers: int | None = None,
    progress: bool = True,
) -> dict[str, int]:
    """Generate the embedded default datasets under ``root`` (missing subjects only).

    Args:
        root: Data root; ``root/hcp`` and ``root/brats`` are created as needed.
        kinds: Which datasets: any of ``"hcp"``, ``"brats"``, ``"structures"`` (a non-BraTS
            target in nnU-Net v2 raw layout: two task-1 structures in three new contrasts).
        size: Grid edge S (S³ voxels spanning 192 mm: 64 -> 3 mm).
        grid: The files' shape, when not S³: the S³ subject centred in it, cropped or
            zero-padded per axis at the same voxel size (:func:`~tmerge.data.synthetic.write.fit_to_grid`); e.g. ``size=192,
            grid=(240, 240, 155)`` for BraTS's 1 mm geometry. None: S³.
        seed: Master seed; subject ``i`` of a kind is a function of ``(seed, kind, i)`` only.
        n_hcp: Number of HCP-like subjects (the paper uses 58).
        n_brats: Number of labelled BraTS-like training subjects (~75 % HGG).
        n_brats_val: Number of unlabelled BraTS-like validation subjects.
        workers: Worker processes (default: all CPU cores; 1 = in this process). Workers are
            *spawned*, so a script calling this at import time needs the usual
            ``if __name__ == "__main__":`` guard (the ``tmerge`` CLI has it).
        progress: Show a progress bar / counter on stderr.

    Returns:
        Subjects written per requested kind (BraTS counts training plus validation); all 0 when
        everything was already there.

    Raises:
        DataError: On invalid arguments, a folder generated with other settings or holding
            foreign data, or missing anatomy templates (deepmriprep).
    """
    counts = {"n_hcp": n_hcp, "n_brats": n_brats, "n_brats_val": n_brats_val}
    _check_args(kinds, size, seed, counts, workers, grid)
    shape = None if grid is None else (int(grid[0]), int(grid[1]), int(grid[2]))
    root = Path(root)
    kinds = tuple(dict.fromkeys(kinds))  # drop duplicates, keep order

    # Check every requested folder before writing anything, so a refusal leaves all untouched.
    states = {}
    for kind in kinds:
        settings = folder_settings(
            kind, int(size), int(seed), int(n_hcp), int(n_brats), int(n_brats_val), shape
        )
        states[kind] = (settings, folder_state(root / kind, settings))

    plan: dict[str, tuple[dict[str, Any], list[Job], list[Job]]] = {}
    for kind, (settings, state) in states.items():
        jobs = _jobs(root, kind, int(seed), int(n_hcp), int(n_brats), int(n_brats_val))
        if shape is not None:
            jobs = [replace(job, grid=shape) for job in jobs]
        missing = [job for job in jobs if not job.complete()]
        if missing and state != "pending":
            # Marks the folder as ours and in progress, so a killed run (or a killed repair of a
            # complete folder that lost subjects) is recognised and resumed by the next run.
            write_json(root / kind / PENDING_NAME, settings)
        if missing:
            remove_stale_tmp(jobs)
        if kind == "structures" and not (root / kind / "dataset.json").is_file():
            write_json(root / kind / "dataset.json", structures_dataset_json(STRUCTURES_TRAINING))
        plan[kind] = (settings, jobs, missing)

    todo = [job for _, _, missing in plan.values() for job in missing]
    written = {kind: 0 for kind in kinds}
    if todo:
        from tqdm import tqdm  # comes with Lightning

        from tmerge.data.synthetic.anatomy import load_anatomy

        anat = load_anatomy(int(size))
        n_workers = int(workers) if workers is not None else (os.cpu_count() or 1)
        label = f"tmerge data ({'+'.join(k for k in kinds if plan[k][2])})"
        bar = tqdm(total=len(todo), desc=label, unit="subject", file=sys.stderr, disable=not progress)

        def on_done(job: Job) -> None:
            written[job.kind.removesuffix("_ts").removesuffix("_val")] += 1
            bar.update(1)

        try:
            run_jobs(todo, int(seed), anat, n_workers, on_done)
        finally:
            bar.close()

    for kind, (settings, jobs, missing) in plan.items():
        if not missing and states[kind][1] == "complete":
            continue  # nothing changed: leave the manifest (and its mtime) alone
        base = root / kind
        manifest = {
            **settings,
            "description": "synthetic default data generated by tmerge from deepmriprep's templates "
            "(CAT12 MNI152 T1 and tissue maps, IBSR labels)",
            "subjects": [job.folder.relative_to(base).as_posix() for job in jobs],
        }
        write_json(base / MANIFEST_NAME, manifest)  # last: its presence means complete
        (base / PENDING_NAME).unlink(missing_ok=True)
    return written
