"""Writing one generated subject: its arrays, drawn from its own stream, written as NIfTI files
atomically (a killed run never leaves a half subject), in this process or in a pool of workers.
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tmerge.data.channels import TASK_CHANNELS
from tmerge.data.formats import HCP_FILES, HCP_LABEL_FILE
from tmerge.data.synthetic.ids import (
    STREAM_BRATS_TRAIN,
    STREAM_BRATS_VAL,
    STREAM_HCP,
    STREAM_STRUCTURES,
    STREAM_STRUCTURES_TS,
    stream_rng,
)

#: Prefix of the hidden temporary folders and files a subject is written through.
TMP_PREFIX = ".tmp-"
#: Marks the held-out label map among a subject's arrays (written to ``Job.label``).
LABEL_KEY = "held-out:"
#: An HCP subject's files under ``<subject>/T1w/``: T1, T2, then the label map.
HCP_NIFTI = tuple(f"{stem}.nii.gz" for stem in (*HCP_FILES.values(), HCP_LABEL_FILE))
BRATS_MODALITIES = TASK_CHANNELS["brats"]


@dataclass(frozen=True)
class Job:
    """One subject to write.

    Attributes:
        kind: ``"hcp"``, ``"brats"`` (training, labelled) or ``"brats_val"`` (unlabelled).
        index: Position of the subject within its kind (its RNG stream).
        folder: Final subject folder.
        files: File names the subject folder must contain (relative to ``folder``).
        grade: ``"HGG"``/``"LGG"`` for BraTS kinds, ``""`` for HCP.
        label: ``"brats_val"``: the held-out label map, outside the dataset root.
        grid: The written arrays' shape, when not the anatomy's cube (:func:`fit_to_grid`).
    """

    kind: str
    index: int
    folder: Path
    files: tuple[str, ...]
    grade: str = ""
    label: Path | None = None
    grid: tuple[int, int, int] | None = None

    def complete(self) -> bool:
        """Whether every file of the subject exists (the fast idempotence check)."""
        files = all((self.folder / name).is_file() for name in self.files)
        return files and (self.label is None or self.label.is_file())


# --- writing one subject ---------------------------------------------------------------------
def fit_to_grid(array: np.ndarray, affine: np.ndarray, grid: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """``array`` (spatial axes first) centred in a ``grid``-shaped box: cropped along an axis
    where the grid is smaller, zero-padded where it is larger; the voxel size is kept.

    Every voxel keeps its world position: the returned affine is ``affine`` shifted by the
    crop/pad offset. E.g. a 1 mm 192³ cube into BraTS's 240 × 240 × 155 pads 24 voxels on each
    side of the first two axes and crops 18 below, 19 above on the third.

    Args:
        array: ``(X, Y, Z, …)``.
        affine: Voxel-to-world ``(4, 4)`` of ``array``.
        grid: The output's spatial shape ``(X', Y', Z')``.

    Returns:
        ``(array of shape (X', Y', Z', …), its affine)``.
    """
    old = array.shape[:3]
    # Output voxel i is input voxel i + start (start < 0: padding before the input).
    starts = [(n - g) // 2 for n, g in zip(old, grid, strict=True)]
    out = np.zeros((*grid, *array.shape[3:]), dtype=array.dtype)
    src, dst = [], []
    for start, n, g in zip(starts, old, grid, strict=True):
        lo, hi = max(start, 0), min(start + g, n)
        src.append(slice(lo, hi))
        dst.append(slice(lo - start, hi - start))
    out[tuple(dst)] = array[tuple(src)]
    shifted = np.array(affine, dtype=np.float64, copy=True)
    shifted[:3, 3] = affine[:3, :3] @ np.asarray(starts, dtype=np.float64) + affine[:3, 3]
    return out, shifted


def _nifti(array: np.ndarray, affine: np.ndarray) -> Any:
    """NIfTI-1 image with qform and sform both set to ``affine`` (scanner space, mm)."""
    import nibabel as nib

    img = nib.Nifti1Image(array, affine)
    img.header.set_xyzt_units("mm", "sec")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    return img


def _to_int16(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Scale a ~0..1 float image to int16 like a scanner export (brain's 99th percentile ~500-1500).

    Stored as int16 like the real data: half the size of float32 and, with the noise floor at
    ~1-5 % of the range, no loss that matters.
    """
    scale = rng.uniform(500.0, 1500.0)
    return np.clip(np.rint(image * scale), 0, np.iinfo(np.int16).max).astype(np.int16)


def _subject_arrays(job: Job, seed: int, anat: Any) -> dict[str, np.ndarray]:
    """Synthesise one subject: file name (relative to its folder) -> array to write."""
    from tmerge.data.synthetic.subjects import synth_brats_subject, synth_hcp_subject

    if job.kind in ("structures", "structures_ts"):
        from tmerge.data.synthetic.subjects import STRUCTURES_CHANNELS, synth_structures_subject

        test = job.kind == "structures_ts"
        rng = stream_rng(seed, STREAM_STRUCTURES_TS if test else STREAM_STRUCTURES, job.index)
        subject = synth_structures_subject(anat, rng)
        images = [_to_int16(subject[name], rng) for name in STRUCTURES_CHANNELS]
        arrays = dict(zip(job.files, images, strict=False))
        if not test:
            arrays[job.files[-1]] = subject["label"]
        return arrays
    if job.kind == "hcp":
        rng = stream_rng(seed, STREAM_HCP, job.index)
        subject = synth_hcp_subject(anat, rng)
        t1, t2, aseg = HCP_NIFTI
        return {
            f"T1w/{t1}": _to_int16(subject["t1"], rng),
            f"T1w/{t2}": _to_int16(subject["t2"], rng),
            f"T1w/{aseg}": subject["aseg"].astype(np.int16),
        }
    validation = job.kind == "brats_val"
    rng = stream_rng(seed, STREAM_BRATS_VAL if validation else STREAM_BRATS_TRAIN, job.index)
    # The validation subjects are drawn labelled too (the same draws: the label map costs no
    # random numbers); their label map goes to job.label, outside the dataset.
    subject = synth_brats_subject(anat, rng, grade=job.grade, labelled=True)
    sid = job.folder.name
    arrays = {f"{sid}_{m}.nii.gz": _to_int16(subject[m], rng) for m in BRATS_MODALITIES}
    key = f"{LABEL_KEY}{sid}_seg.nii.gz" if validation else f"{sid}_seg.nii.gz"
    arrays[key] = subject["seg"].astype(np.uint8)
    return arrays


def _write_subject(job: Job, seed: int, anat: Any) -> None:
    """Write one subject into a temporary folder, then rename it onto ``job.folder``; a held-out
    label map is written (atomically, by rename) to ``job.label`` first."""
    arrays = _subject_arrays(job, seed, anat)
    affine = np.asarray(anat.affine, dtype=np.float64)
    if job.grid is not None:
        cube = affine
        for name, array in arrays.items():
            arrays[name], affine = fit_to_grid(array, cube, job.grid)
    if job.kind.startswith("structures"):
        # nnU-Net's layout keeps a case's files in shared folders: each file is renamed into place.
        for name, array in arrays.items():
            path = job.folder / name
            path.parent.mkdir(parents=True, exist_ok=True)
            partial = path.with_name(f"{TMP_PREFIX}{path.name}")
            _nifti(array, affine).to_filename(str(partial))
            os.replace(partial, path)
        return
    held_out = {k: arrays.pop(k) for k in list(arrays) if k.startswith(LABEL_KEY)}
    if held_out and job.label is not None:
        [seg] = held_out.values()
        job.label.parent.mkdir(parents=True, exist_ok=True)
        partial = job.label.with_name(f"{TMP_PREFIX}{job.label.name}")
        _nifti(seg, affine).to_filename(str(partial))
        os.replace(partial, job.label)
    parent = job.folder.parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{job.folder.name}-", dir=parent))
    try:
        for name, array in arrays.items():
            path = tmp / name
            path.parent.mkdir(parents=True, exist_ok=True)
            _nifti(array, affine).to_filename(str(path))
        if job.folder.exists():
            # An incomplete subject (a file deleted by hand): replace it as a whole.
            shutil.rmtree(job.folder)
        os.rename(tmp, job.folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


# --- worker processes ------------------------------------------------------------------------
_WORKER_STATE: dict[str, Any] = {}


def _init_worker(anat: Any, seed: int) -> None:
    """Process-pool initialiser: keep the (pickled once) anatomy and seed in the worker."""
    _WORKER_STATE["anat"] = anat
    _WORKER_STATE["seed"] = seed


def _run_job(job: Job) -> Job:
    """Worker entry point."""
    _write_subject(job, _WORKER_STATE["seed"], _WORKER_STATE["anat"])
    return job


def run_jobs(
    jobs: Sequence[Job], seed: int, anat: Any, workers: int, on_done: Callable[[Job], None]
) -> None:
    """Write ``jobs`` in this process (``workers <= 1``) or in a pool of spawned processes.

    ``spawn`` rather than ``fork``: the caller may hold threads (torch, a progress bar) that a
    forked child would inherit in an undefined state.
    """
    if workers <= 1 or len(jobs) <= 1:
        for job in jobs:
            _write_subject(job, seed, anat)
            on_done(job)
        return
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(
        max_workers=min(workers, len(jobs)),
        mp_context=context,
        initializer=_init_worker,
        initargs=(anat, seed),
    ) as pool:
        pending: set[Future[Job]] = {pool.submit(_run_job, job) for job in jobs}
        try:
            while pending:
                done, pending = wait(pending, return_when=FIRST_EXCEPTION)
                for future in done:
                    on_done(future.result())  # re-raises a worker's exception here
        except BaseException:
            for future in pending:
                future.cancel()
            raise


def remove_stale_tmp(jobs: Iterable[Job]) -> None:
    """Remove temporary subject folders and files left by a killed run (only our own hidden
    prefix), beside the subject folders and, for nnU-Net's layout, in its file folders."""
    parents = {job.folder.parent for job in jobs} | {(job.folder / f).parent for job in jobs for f in job.files}
    for parent in parents:
        if parent.is_dir():
            for entry in parent.iterdir():
                if entry.name.startswith(TMP_PREFIX) and entry.is_dir():
                    shutil.rmtree(entry, ignore_errors=True)
                elif entry.name.startswith(TMP_PREFIX):
                    entry.unlink(missing_ok=True)
