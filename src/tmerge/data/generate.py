"""Write the embedded default datasets (HCP-like and BraTS-like) in the real datasets' layouts.

``generate_default(root)`` fills ``root/hcp`` and ``root/brats`` with synthetic subjects
(:mod:`tmerge.data.synth`) so that the same readers serve the default and the real data::

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
  so a subset, a resumed run or a parallel run writes the same arrays.
- **Atomic per subject**: a subject is written into a hidden temporary folder beside its final
  place and renamed into place, so a killed run never leaves a half subject.
- **Idempotent**: ``root/<kind>/.tmerge_manifest.json`` (generator version, size, grid, seed, counts) is
  written last; with it present and every file there, a re-run touches nothing. Missing subjects
  are regenerated. A folder generated with other settings, or holding other data, is refused.
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from tmerge.data.formats import (
    BRATS2018_GRADES,
    BRATS2018_TRAINING,
    BRATS2018_VALIDATION,
    HCP_FILES,
    HCP_LABEL_FILE,
    TASK_CHANNELS,
)
from tmerge.errors import DataError
from tmerge.io import write_json

#: Bump whenever the generated content changes, so stale folders are detected.
GENERATOR_VERSION = 2  # 2: sulcal CSF labelled as FreeSurfer CSF (24)
MANIFEST_NAME = ".tmerge_manifest.json"
#: Settings of a run in progress; replaced by the manifest when the run completes.
PENDING_NAME = ".tmerge_generating.json"
_TMP_PREFIX = ".tmp-"
#: Marks the held-out label map among a subject's arrays (written to ``_Job.label``).
LABEL_KEY = "held-out:"

KINDS = ("hcp", "brats", "structures")
# The datasets' names are their layouts' (tmerge.data.formats): the generated data is read as real data.
#: An HCP subject's files under ``<subject>/T1w/``: T1, T2, then the label map.
HCP_NIFTI = tuple(f"{stem}.nii.gz" for stem in (*HCP_FILES.values(), HCP_LABEL_FILE))
HGG, LGG = BRATS2018_GRADES
BRATS_MODALITIES = TASK_CHANNELS["brats"]
#: Beside ``root/brats``, not in it: the stages read the dataset root only.
BRATS_VALIDATION_LABELS = "brats-validation-labels"
#: Fraction of high-grade gliomas (BraTS 2018 training: 210 HGG / 75 LGG).
HGG_FRACTION = 0.75

# Stream codes that separate the seeds of the different random uses of one ``seed``.
_STREAM_HCP = 1
_STREAM_BRATS_TRAIN = 2
_STREAM_BRATS_VAL = 3
_STREAM_STRUCTURES = 4
_STREAM_STRUCTURES_TS = 5
_STREAM_HCP_IDS = 11
_STREAM_GRADE = 21

#: The ``structures`` target (nnU-Net v2 raw): labelled cases and the unlabelled imagesTs.
STRUCTURES_TRAINING, STRUCTURES_TEST = 60, 10


def structures_dataset_json(n_training: int) -> dict[str, Any]:
    """The ``structures`` target's nnU-Net v2 ``dataset.json``."""
    from tmerge.data.synth import STRUCTURES_CHANNELS, STRUCTURES_CLASSES

    return {
        "channel_names": {str(i): name for i, name in enumerate(STRUCTURES_CHANNELS)},
        "labels": {"background": 0, **{name: value for value, (name, _) in STRUCTURES_CLASSES.items()}},
        "numTraining": n_training,
        "file_ending": ".nii.gz",
        "description": "tmerge's synthetic 'structures' target: task-1 structures (thalamus, caudate) "
        "in three contrasts no source saw, on subjects no source saw",
    }


def structures_case_id(index: int, test: bool = False) -> str:
    """nnU-Net case id of the ``index``-th (0-based) case, e.g. ``structures_001``."""
    return f"structures_{'ts' if test else ''}{index + 1:03d}"


# HCP ids are 6-digit and increasing (100206 ... 996782 for the 1200 real subjects): consecutive
# gaps drawn from this range keep about 1000 subjects within 6 digits.
_HCP_ID_START = 100000
_HCP_ID_GAP = (100, 1400)
_HCP_ID_CHUNK = 1024


@dataclass(frozen=True)
class _Job:
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


# --- ids and seeds ---------------------------------------------------------------------------
def _rng(seed: int, *stream: int) -> np.random.Generator:
    """Independent generator for ``(seed, *stream)`` (NumPy SeedSequence entropy pooling)."""
    return np.random.default_rng(np.random.SeedSequence([seed, *stream]))


def hcp_subject_ids(seed: int, n: int) -> list[str]:
    """Deterministic, unique, increasing 6-digit HCP-style subject ids.

    The first ``k`` ids do not depend on ``n`` (gaps are drawn in fixed-size chunks), so a smaller
    set is a prefix of a larger one.

    Raises:
        DataError: If ``n`` is too large for 6-digit ids (about 1000 subjects).
    """
    rng = _rng(seed, _STREAM_HCP_IDS)
    gaps: list[np.ndarray] = []
    while sum(len(g) for g in gaps) < n:
        gaps.append(rng.integers(*_HCP_ID_GAP, size=_HCP_ID_CHUNK))
    ids = _HCP_ID_START + np.cumsum(np.concatenate(gaps)[:n]) if n else np.zeros(0, dtype=np.int64)
    if n and ids[-1] > 999999:
        raise DataError(
            f"n_hcp={n}: too many subjects for 6-digit HCP-style ids; expected at most about 1000"
        )
    return [str(int(i)) for i in ids]


def brats_subject_id(index: int, validation: bool = False) -> str:
    """BraTS-style id of the ``index``-th (0-based) synthetic subject, e.g. ``Brats18_SYN_0001_1``."""
    return f"Brats18_{'SYNV' if validation else 'SYN'}_{index + 1:04d}_1"


def brats_grade(seed: int, index: int, validation: bool = False) -> str:
    """Grade (``"HGG"`` or ``"LGG"``) of a synthetic BraTS subject, from its own RNG stream."""
    stream = _STREAM_BRATS_VAL if validation else _STREAM_BRATS_TRAIN
    return HGG if _rng(seed, _STREAM_GRADE, stream, index).random() < HGG_FRACTION else LGG


def _jobs(root: Path, kind: str, seed: int, n_hcp: int, n_brats: int, n_brats_val: int) -> list[_Job]:
    """Every subject of ``kind`` under ``root/<kind>``, complete or not."""
    base = root / kind
    if kind == "structures":
        from tmerge.data.synth import STRUCTURES_CHANNELS

        def images(folder: str, case: str) -> tuple[str, ...]:
            return tuple(f"{folder}/{case}_{c:04d}.nii.gz" for c in range(len(STRUCTURES_CHANNELS)))

        train = [
            _Job("structures", i, base, (*images("imagesTr", c), f"labelsTr/{c}.nii.gz"))
            for i, c in ((i, structures_case_id(i)) for i in range(STRUCTURES_TRAINING))
        ]
        test = [
            _Job("structures_ts", i, base, images("imagesTs", structures_case_id(i, test=True)))
            for i in range(STRUCTURES_TEST)
        ]
        return train + test
    if kind == "hcp":
        return [
            _Job("hcp", i, base / sid, tuple(f"T1w/{name}" for name in HCP_NIFTI))
            for i, sid in enumerate(hcp_subject_ids(seed, n_hcp))
        ]
    jobs = []
    for i in range(n_brats):
        sid, grade = brats_subject_id(i), brats_grade(seed, i)
        files = tuple(f"{sid}_{m}.nii.gz" for m in (*BRATS_MODALITIES, "seg"))
        jobs.append(_Job("brats", i, base / BRATS2018_TRAINING / grade / sid, files, grade))
    for i in range(n_brats_val):
        sid, grade = brats_subject_id(i, validation=True), brats_grade(seed, i, validation=True)
        files = tuple(f"{sid}_{m}.nii.gz" for m in BRATS_MODALITIES)
        label = root / BRATS_VALIDATION_LABELS / f"{sid}_seg.nii.gz"
        jobs.append(_Job("brats_val", i, base / BRATS2018_VALIDATION / sid, files, grade, label))
    return jobs


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


def _subject_arrays(job: _Job, seed: int, anat: Any) -> dict[str, np.ndarray]:
    """Synthesise one subject: file name (relative to its folder) -> array to write."""
    from tmerge.data.synth import synth_brats_subject, synth_hcp_subject

    if job.kind in ("structures", "structures_ts"):
        from tmerge.data.synth import STRUCTURES_CHANNELS, synth_structures_subject

        test = job.kind == "structures_ts"
        rng = _rng(seed, _STREAM_STRUCTURES_TS if test else _STREAM_STRUCTURES, job.index)
        subject = synth_structures_subject(anat, rng)
        images = [_to_int16(subject[name], rng) for name in STRUCTURES_CHANNELS]
        arrays = dict(zip(job.files, images, strict=False))
        if not test:
            arrays[job.files[-1]] = subject["label"]
        return arrays
    if job.kind == "hcp":
        rng = _rng(seed, _STREAM_HCP, job.index)
        subject = synth_hcp_subject(anat, rng)
        t1, t2, aseg = HCP_NIFTI
        return {
            f"T1w/{t1}": _to_int16(subject["t1"], rng),
            f"T1w/{t2}": _to_int16(subject["t2"], rng),
            f"T1w/{aseg}": subject["aseg"].astype(np.int16),
        }
    validation = job.kind == "brats_val"
    rng = _rng(seed, _STREAM_BRATS_VAL if validation else _STREAM_BRATS_TRAIN, job.index)
    # The validation subjects are drawn labelled too (the same draws: the label map costs no
    # random numbers); their label map goes to job.label, outside the dataset.
    subject = synth_brats_subject(anat, rng, grade=job.grade, labelled=True)
    sid = job.folder.name
    arrays = {f"{sid}_{m}.nii.gz": _to_int16(subject[m], rng) for m in BRATS_MODALITIES}
    key = f"{LABEL_KEY}{sid}_seg.nii.gz" if validation else f"{sid}_seg.nii.gz"
    arrays[key] = subject["seg"].astype(np.uint8)
    return arrays


def _write_subject(job: _Job, seed: int, anat: Any) -> None:
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
            partial = path.with_name(f"{_TMP_PREFIX}{path.name}")
            _nifti(array, affine).to_filename(str(partial))
            os.replace(partial, path)
        return
    held_out = {k: arrays.pop(k) for k in list(arrays) if k.startswith(LABEL_KEY)}
    if held_out and job.label is not None:
        [seg] = held_out.values()
        job.label.parent.mkdir(parents=True, exist_ok=True)
        partial = job.label.with_name(f"{_TMP_PREFIX}{job.label.name}")
        _nifti(seg, affine).to_filename(str(partial))
        os.replace(partial, job.label)
    parent = job.folder.parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}{job.folder.name}-", dir=parent))
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


def _run_job(job: _Job) -> _Job:
    """Worker entry point."""
    _write_subject(job, _WORKER_STATE["seed"], _WORKER_STATE["anat"])
    return job


def _run_jobs(
    jobs: Sequence[_Job], seed: int, anat: Any, workers: int, on_done: Callable[[_Job], None]
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
        pending: set[Future[_Job]] = {pool.submit(_run_job, job) for job in jobs}
        try:
            while pending:
                done, pending = wait(pending, return_when=FIRST_EXCEPTION)
                for future in done:
                    on_done(future.result())  # re-raises a worker's exception here
        except BaseException:
            for future in pending:
                future.cancel()
            raise


# --- folder state ----------------------------------------------------------------------------
def _settings(
    kind: str,
    size: int,
    seed: int,
    n_hcp: int,
    n_brats: int,
    n_brats_val: int,
    grid: tuple[int, int, int] | None = None,
) -> dict[str, Any]:
    """What identifies a generated folder's content (compared on every run)."""
    counts = (
        {"subjects": n_hcp}
        if kind == "hcp"
        else {"training": STRUCTURES_TRAINING, "test": STRUCTURES_TEST}
        if kind == "structures"
        else {"training": n_brats, "validation": n_brats_val}
    )
    return {
        "generator": "tmerge.data.generate",
        "version": GENERATOR_VERSION,
        "kind": kind,
        "size": size,
        "grid": None if grid is None else list(grid),
        "seed": seed,
        "counts": counts,
    }


_COMPARED = ("generator", "version", "kind", "size", "grid", "seed", "counts")


def _read_settings(path: Path) -> dict[str, Any]:
    import json

    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise DataError(
            f"{path}: unreadable generator manifest ({exc}); delete {path.parent} to regenerate it"
        ) from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a JSON object; delete {path.parent} to regenerate it")
    return data


def _check_settings(path: Path, found: dict[str, Any], wanted: dict[str, Any]) -> None:
    """Raise a :class:`DataError` naming every setting that differs between a folder and a request."""
    diffs = [
        f"{key}={found.get(key)!r} there, {wanted[key]!r} requested"
        for key in _COMPARED
        if found.get(key) != wanted[key]
    ]
    if diffs:
        raise DataError(
            f"{path}: {path.parent} was generated with other settings ({'; '.join(diffs)}); "
            f"delete {path.parent} to regenerate it, or choose another data root"
        )


def _remove_stale_tmp(jobs: Iterable[_Job]) -> None:
    """Remove temporary subject folders and files left by a killed run (only our own hidden
    prefix), beside the subject folders and, for nnU-Net's layout, in its file folders."""
    parents = {job.folder.parent for job in jobs} | {(job.folder / f).parent for job in jobs for f in job.files}
    for parent in parents:
        if parent.is_dir():
            for entry in parent.iterdir():
                if entry.name.startswith(_TMP_PREFIX) and entry.is_dir():
                    shutil.rmtree(entry, ignore_errors=True)
                elif entry.name.startswith(_TMP_PREFIX):
                    entry.unlink(missing_ok=True)


def _folder_state(base: Path, settings: dict[str, Any]) -> str:
    """Check, without writing, that ``base`` may receive this generation.

    Returns:
        ``"complete"`` (manifest with these settings), ``"pending"`` (an interrupted run with these
        settings) or ``"new"`` (absent, or empty but for our temporary folders).

    Raises:
        DataError: If ``base`` was generated with other settings, or holds data tmerge did not
            generate (no manifest and no run-in-progress marker).
    """
    manifest, pending = base / MANIFEST_NAME, base / PENDING_NAME
    if manifest.is_file():
        _check_settings(manifest, _read_settings(manifest), settings)
        return "complete"
    if pending.is_file():
        _check_settings(pending, _read_settings(pending), settings)
        return "pending"
    if base.exists() and not base.is_dir():
        raise DataError(f"{base}: exists but is not a folder; choose another data root")
    if base.is_dir() and any(not e.name.startswith(_TMP_PREFIX) for e in base.iterdir()):
        raise DataError(
            f"{base}: folder exists but was not generated by `tmerge data` (no {MANIFEST_NAME}); "
            "refusing to write into it. Choose another data root, or delete the folder"
        )
    return "new"


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
            zero-padded per axis at the same voxel size (:func:`fit_to_grid`); e.g. ``size=192,
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
        settings = _settings(kind, int(size), int(seed), int(n_hcp), int(n_brats), int(n_brats_val), shape)
        states[kind] = (settings, _folder_state(root / kind, settings))

    plan: dict[str, tuple[dict[str, Any], list[_Job], list[_Job]]] = {}
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
            _remove_stale_tmp(jobs)
        if kind == "structures" and not (root / kind / "dataset.json").is_file():
            write_json(root / kind / "dataset.json", structures_dataset_json(STRUCTURES_TRAINING))
        plan[kind] = (settings, jobs, missing)

    todo = [job for _, _, missing in plan.values() for job in missing]
    written = {kind: 0 for kind in kinds}
    if todo:
        from tqdm import tqdm  # comes with Lightning

        from tmerge.data.anatomy import load_anatomy

        anat = load_anatomy(int(size))
        n_workers = int(workers) if workers is not None else (os.cpu_count() or 1)
        label = f"tmerge data ({'+'.join(k for k in kinds if plan[k][2])})"
        bar = tqdm(total=len(todo), desc=label, unit="subject", file=sys.stderr, disable=not progress)

        def on_done(job: _Job) -> None:
            written[job.kind.removesuffix("_ts").removesuffix("_val")] += 1
            bar.update(1)

        try:
            _run_jobs(todo, int(seed), anat, n_workers, on_done)
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
