"""Reading NIfTI volumes with errors that name the file and say what was expected, and writing
predicted label maps (:func:`save_labels`).

Every problem with an input file (missing, truncated, not 3-D, NaN/Inf voxels, non-integer
labels, mismatched geometry between modalities) is raised as one :class:`DataError`, so the CLI
can print a single line instead of a nibabel/gzip traceback.
"""

from __future__ import annotations

import gzip
import zlib
from collections.abc import Mapping
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.filebasedimages import ImageFileError

from tmerge.errors import DataError
from tmerge.io import atomic_path

#: Extensions accepted for every volume, in order of preference.
NIFTI_SUFFIXES: tuple[str, ...] = (".nii.gz", ".nii")

# What nibabel/gzip raise on unreadable, truncated or corrupt files.
_READ_ERRORS = (OSError, EOFError, zlib.error, ImageFileError, ValueError, TypeError)

Geometry = tuple[tuple[int, ...], np.ndarray]


def find_modality(folder: str | Path, stem: str) -> Path:
    """Return ``folder/stem.nii.gz`` or ``folder/stem.nii``, whichever exists.

    Raises:
        DataError: neither file exists.
    """
    folder = Path(folder)
    for suffix in NIFTI_SUFFIXES:
        path = folder / f"{stem}{suffix}"
        if path.is_file():
            return path
    raise DataError(
        f"{folder / (stem + NIFTI_SUFFIXES[0])}: file not found (expected {stem}.nii.gz or {stem}.nii)"
    )


def _read(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Read a volume's voxels (native dtype) and affine, squeezing a trailing singleton 4th axis."""
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        img = nib.load(str(path))
        data = np.asanyarray(img.dataobj)
        affine = np.asarray(img.affine, dtype=np.float64)
    except _READ_ERRORS as exc:
        reason = " ".join(str(exc).split())  # nibabel's own text may span lines
        raise DataError(f"{path}: not a readable NIfTI file ({type(exc).__name__}: {reason})") from None
    # Some tools write 3-D volumes as (X, Y, Z, 1); that is still one 3-D volume.
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise DataError(f"{path}: expected a 3-D volume, got shape {tuple(data.shape)}")
    return data, affine


def load_volume(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Load an image volume.

    Args:
        path: A ``.nii`` or ``.nii.gz`` file.

    Returns:
        ``(data, affine)``: ``float32`` array of shape ``(X, Y, Z)`` (voxel order of the file,
        scaling applied) and the ``(4, 4)`` voxel-to-world affine.

    Raises:
        DataError: the file is missing, unreadable, not 3-D, or holds NaN/Inf values.
    """
    path = Path(path)
    data, affine = _read(path)
    data = np.asarray(data, dtype=np.float32)
    finite = np.isfinite(data)
    if not finite.all():
        raise DataError(f"{path}: {int((~finite).sum())} voxels are NaN or Inf; expected finite intensities")
    return data, affine


def load_labels(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Load a label map.

    Returns:
        ``(labels, affine)``: ``int32`` array of shape ``(X, Y, Z)`` and the ``(4, 4)`` affine.

    Raises:
        DataError: the file is missing, unreadable, not 3-D, or holds non-integer values.
    """
    path = Path(path)
    data, affine = _read(path)
    if not np.issubdtype(data.dtype, np.integer):
        # Label maps are often stored as floats; accept them only if every value is a whole number.
        if not np.isfinite(data).all() or not np.array_equal(data, np.round(data)):
            raise DataError(f"{path}: label map holds non-integer or NaN values; expected integer labels")
    return np.asarray(data, dtype=np.int32), affine


def check_same_geometry(volumes: Mapping[str, Geometry], subject: str) -> None:
    """Check that all volumes of one subject share shape and affine.

    Args:
        volumes: ``file name -> (shape, affine)`` for each of the subject's files.
        subject: Subject id, used in the message.

    Raises:
        DataError: naming both files when a shape differs, or an affine differs by more than 1e-3.
    """
    items = list(volumes.items())
    if not items:
        return
    ref_name, (ref_shape, ref_affine) = items[0]
    for name, (shape, affine) in items[1:]:
        if tuple(shape) != tuple(ref_shape):
            raise DataError(
                f"subject {subject}: {name} has shape {tuple(shape)} but {ref_name} has {tuple(ref_shape)}; "
                "expected all modalities on the same voxel grid"
            )
        if not np.allclose(affine, ref_affine, atol=1e-3):
            raise DataError(
                f"subject {subject}: {name} and {ref_name} have different affines; "
                "expected all modalities on the same voxel grid"
            )


def save_labels(path: str | Path, labels: np.ndarray, affine: np.ndarray) -> Path:
    """Write a label map as an ``uint8`` NIfTI file, atomically.

    Args:
        path: Destination, ``.nii.gz`` (gzip-compressed) or ``.nii``.
        labels: ``(X, Y, Z)`` integer labels in 0..255 (e.g. BraTS 0/1/2/4), in the voxel order of
            the image it belongs to.
        affine: That image's ``(4, 4)`` voxel-to-world affine; written as both qform and sform
            (code 1, scanner space), so every reader sees the input's geometry.

    Returns:
        ``path``.
    """
    path = Path(path)
    labels = np.asarray(labels)
    if labels.ndim != 3:
        raise ValueError(f"expected a 3-D label map, got shape {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() > 255):
        raise ValueError(f"label values {labels.min()}..{labels.max()} do not fit uint8")
    affine = np.asarray(affine, dtype=np.float64)
    img = nib.Nifti1Image(labels.astype(np.uint8), affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_intent("label")
    data = img.to_bytes()
    if path.name.endswith(".gz"):
        # The temporary file's name has no NIfTI suffix, so compress here rather than let
        # nibabel choose the format from the name.
        data = gzip.compress(data, compresslevel=6)
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return path
