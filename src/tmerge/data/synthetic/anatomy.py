"""Real brain anatomy for the embedded default datasets, read from the ``deepmriprep`` package.

``deepmriprep`` (0.3.0) ships CAT12's MNI152 templates under ``deepmriprep/data/templates/``:

- ``Template_05mm_bet.nii.gz``: skull-stripped T1, 0.5 mm, (339, 411, 339), stored as scaled uint8;
- ``Template_4_GS.nii.gz``: GM / WM / other tissue probabilities, 1.5 mm, (113, 137, 113, 3);
- ``ibsr.nii.gz``: 32 structures in FreeSurfer aseg numbering, 1 mm, (161, 197, 161).

The three files are aligned in *world* coordinates only (their x axes point in different directions
and their grids differ), so everything is resampled through the affines onto one isotropic RAS grid
of ``size``³ voxels spanning 192 mm, centred on the brain.

Only the data files are read: the package is located with :func:`importlib.util.find_spec`
without importing it, because its own dependency tree (deepbet, customtkinter, pandas, ...) is not
needed here. The files are never copied into this repository (IBSR labels: research use with
acknowledgement).
"""

from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from tmerge.errors import DataError

#: Edge length of the generated field of view in mm; 64³ voxels -> 3 mm, 32³ -> 6 mm.
FIELD_OF_VIEW_MM = 192.0

T1_FILE = "Template_05mm_bet.nii.gz"
TISSUE_FILE = "Template_4_GS.nii.gz"
ASEG_FILE = "ibsr.nii.gz"

#: The FreeSurfer aseg labels present in ``ibsr.nii.gz`` (0 = unlabelled / background).
ASEG_LABELS: tuple[int, ...] = (
    0, 2, 3, 4, 5, 7, 8, 10, 11, 12, 13, 14, 15, 16, 17, 18, 24, 26, 28,
    41, 42, 43, 44, 46, 47, 49, 50, 51, 52, 53, 54, 58, 60,
)  # fmt: skip

_INSTALL_HINT = "install it with `pip install --no-deps deepmriprep==0.3.0`"


@dataclass(frozen=True, eq=False)
class Anatomy:
    """The template anatomy resampled onto an isotropic ``S``³ RAS grid.

    All arrays are read-only because one instance is cached and shared per size.

    Attributes:
        t1: Skull-stripped T1, float32 (S, S, S), scaled to 0..1, exactly 0 outside ``mask``.
        tissue: GM / WM / CSF probabilities, float32 (3, S, S, S); they sum to 1 inside ``mask``
            and are 0 outside it (the template's "other" class restricted to the brain is CSF).
        aseg: FreeSurfer aseg labels, int16 (S, S, S), nearest-neighbour resampled, 0 outside
            ``mask``; values are a subset of :data:`ASEG_LABELS`.
        mask: Brain mask, bool (S, S, S): voxels at least half covered by the T1 template's brain.
        affine: Voxel-to-world (RAS, mm) matrix, float64 (4, 4): diagonal spacing 192/S mm.
    """

    t1: np.ndarray
    tissue: np.ndarray
    aseg: np.ndarray
    mask: np.ndarray
    affine: np.ndarray

    @property
    def size(self) -> int:
        """Number of voxels along each axis (S)."""
        return int(self.t1.shape[0])

    @property
    def spacing(self) -> float:
        """Voxel edge length in mm."""
        return float(self.affine[0, 0])


def template_dir() -> Path:
    """Return ``<deepmriprep>/data/templates`` of the installed package, without importing it.

    Raises:
        DataError: If deepmriprep is not installed or its template files are missing.
    """
    try:
        spec = importlib.util.find_spec("deepmriprep")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            "package 'deepmriprep' not found: the embedded default data is generated from the brain "
            f"templates it ships; {_INSTALL_HINT}"
        )
    folder = Path(next(iter(spec.submodule_search_locations))) / "data" / "templates"
    missing = [name for name in (T1_FILE, TISSUE_FILE, ASEG_FILE) if not (folder / name).is_file()]
    if missing:
        raise DataError(
            f"{folder}: template file(s) {', '.join(missing)} missing from the installed deepmriprep; "
            f"expected deepmriprep 0.3.0, {_INSTALL_HINT}"
        )
    return folder


def _load(path: Path) -> tuple[np.ndarray, np.ndarray, float]:
    """Read a NIfTI file's stored (unscaled) array, its affine and its scale slope.

    Reading the unscaled integers avoids nibabel's float64 copy of the 47 M-voxel T1 template.
    """
    import nibabel as nib

    try:
        img = nib.load(str(path))
        raw = np.asarray(img.dataobj.get_unscaled())
        slope = img.dataobj.slope
        inter = img.dataobj.inter
    except Exception as exc:  # nibabel raises many types for corrupt files
        raise DataError(f"{path}: not a readable NIfTI template ({exc}); {_INSTALL_HINT}") from None
    slope = 1.0 if slope is None or not np.isfinite(slope) else float(slope)
    if inter is not None and np.isfinite(inter) and inter != 0:
        raise DataError(f"{path}: unexpected intensity intercept {inter}; expected deepmriprep 0.3.0")
    return raw, np.asarray(img.affine, dtype=np.float64), slope


def _block_mean(raw: np.ndarray, factor: int) -> np.ndarray:
    """Average non-overlapping ``factor``³ blocks of a 3-D array (zero-padding the far edges).

    This is the anti-aliasing step before interpolating onto a much coarser grid: a box filter as
    wide as the target spacing, computed with integer sums so the big template is never converted
    to floats as a whole.

    Args:
        raw: (X, Y, Z) integer or float array.
        factor: Block edge in voxels (>= 1).

    Returns:
        float32 (ceil(X/f), ceil(Y/f), ceil(Z/f)).
    """
    if factor <= 1:
        return raw.astype(np.float32)
    pad = [(0, (-n) % factor) for n in raw.shape]
    if any(p for _, p in pad):
        raw = np.pad(raw, pad)
    nx, ny, nz = (n // factor for n in raw.shape)
    acc_dtype = np.uint32 if np.issubdtype(raw.dtype, np.integer) else np.float64
    blocks = raw.reshape(nx, factor, ny, factor, nz, factor)
    # Summing one axis at a time keeps every temporary smaller than the input.
    total = blocks.sum(axis=5, dtype=acc_dtype).sum(axis=3).sum(axis=1)
    return (total / float(factor**3)).astype(np.float32)


def _block_affine(affine: np.ndarray, factor: int) -> np.ndarray:
    """Affine of a block-averaged array: block ``i`` is centred on source voxel ``f*i + (f-1)/2``."""
    scale = np.diag([factor, factor, factor, 1.0])
    scale[:3, 3] = (factor - 1) / 2.0
    return affine @ scale


def _resample(
    src: np.ndarray, src_affine: np.ndarray, out_affine: np.ndarray, size: int, order: int
) -> np.ndarray:
    """Resample ``src`` onto the ``size``³ grid of ``out_affine`` through world coordinates.

    Args:
        src: (X, Y, Z) source array.
        src_affine: (4, 4) voxel-to-world matrix of ``src`` (axes may be flipped).
        out_affine: (4, 4) voxel-to-world matrix of the output grid.
        size: Output edge length S.
        order: Spline order (0 nearest, 1 linear).

    Returns:
        (S, S, S) array of ``src``'s dtype for order 0, float32 otherwise; 0 outside ``src``.
    """
    # output index -> world -> source index, one 4x4 matrix for the whole grid.
    vox2vox = np.linalg.inv(src_affine) @ out_affine
    return ndimage.affine_transform(
        src,
        vox2vox[:3, :3],
        offset=vox2vox[:3, 3],
        output_shape=(size, size, size),
        output=src.dtype if order == 0 else np.float32,
        order=order,
        mode="constant",
        cval=0.0,
        prefilter=False,
    )


def _grid_affine(size: int, centre_mm: np.ndarray) -> np.ndarray:
    """RAS affine of an S³ grid with spacing 192/S mm whose centre is at ``centre_mm``."""
    spacing = FIELD_OF_VIEW_MM / size
    affine = np.diag([spacing, spacing, spacing, 1.0])
    affine[:3, 3] = centre_mm - spacing * (size - 1) / 2.0
    return affine


def _brain_centre(raw: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """World centre (mm, rounded to 0.5) of the bounding box of the template's nonzero voxels."""
    # Project onto each axis instead of argwhere on 47 M voxels: three cheap any() reductions.
    lo, hi = [], []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        nz = np.flatnonzero(raw.any(axis=other))
        if nz.size == 0:
            raise DataError("the T1 template is empty; expected deepmriprep 0.3.0's Template_05mm_bet")
        lo.append(nz[0])
        hi.append(nz[-1])
    corners = affine @ np.array([[*lo, 1.0], [*hi, 1.0]]).T
    return np.round((corners[:3, 0] + corners[:3, 1]) / 2.0 * 2.0) / 2.0


def load_anatomy(size: int = 64) -> Anatomy:
    """Resample the deepmriprep templates onto an isotropic ``size``³ grid (cached per size).

    The grid spans 192 mm (64³ -> 3 mm) and is centred on the brain. Images are box-averaged at
    the target spacing before linear interpolation so a 0.5 mm template does not alias at 3 mm;
    labels are nearest-neighbour from the 1 mm atlas.

    Args:
        size: Voxels per axis S (>= 8).

    Returns:
        The shared, read-only :class:`Anatomy`.

    Raises:
        DataError: If deepmriprep or its templates are missing, or ``size`` is not sensible.
    """
    if not isinstance(size, (int, np.integer)) or isinstance(size, bool) or size < 8:
        raise DataError(f"anatomy size={size!r}: expected an integer >= 8 (voxels per axis, 64 by default)")
    # One cache key per grid, however the size was passed (positional, keyword, numpy integer).
    return _load_anatomy(int(size))


@functools.lru_cache(maxsize=4)
def _load_anatomy(size: int) -> Anatomy:
    """Uncached body of :func:`load_anatomy` (``size`` already validated)."""
    folder = template_dir()
    spacing = FIELD_OF_VIEW_MM / size

    t1_raw, t1_affine, t1_slope = _load(folder / T1_FILE)
    if t1_raw.ndim != 3:
        raise DataError(f"{folder / T1_FILE}: expected a 3-D image, got shape {t1_raw.shape}")
    out_affine = _grid_affine(size, _brain_centre(t1_raw, t1_affine))

    # Box width = target spacing (in units of the source voxel edge).
    f_t1 = max(1, int(spacing / abs(t1_affine[0, 0]) + 1e-6))
    t1_block = _block_mean(t1_raw, f_t1) * np.float32(t1_slope)
    inside_block = _block_mean((t1_raw > 0).view(np.uint8), f_t1)
    del t1_raw
    block_affine = _block_affine(t1_affine, f_t1)
    t1 = _resample(t1_block, block_affine, out_affine, size, order=1)
    mask = _resample(inside_block, block_affine, out_affine, size, order=1) > 0.5
    t1 = np.clip(t1, 0.0, None) * mask
    t1 /= max(float(t1.max()), 1e-6)

    ts_raw, ts_affine, ts_slope = _load(folder / TISSUE_FILE)
    if ts_raw.ndim != 4 or ts_raw.shape[-1] < 3:
        raise DataError(
            f"{folder / TISSUE_FILE}: expected a (X, Y, Z, 3) probability map, got {ts_raw.shape}"
        )
    f_ts = max(1, int(spacing / abs(ts_affine[0, 0]) + 1e-6))
    ts_block_affine = _block_affine(ts_affine, f_ts)
    tissue = np.stack(
        [
            _resample(
                _block_mean(ts_raw[..., c], f_ts) * np.float32(ts_slope), ts_block_affine, out_affine, size, 1
            )
            for c in range(3)
        ]
    )
    tissue = np.clip(tissue, 0.0, None) * mask
    # Inside the skull-stripped brain the template's "other" class is CSF; renormalise so the
    # three probabilities sum to one there (interpolation leaves them slightly off).
    total = tissue.sum(axis=0)
    tissue /= np.where(total > 1e-6, total, 1.0)
    tissue[2][mask & (total <= 1e-6)] = 1.0

    lab_raw, lab_affine, _ = _load(folder / ASEG_FILE)
    if lab_raw.ndim != 3 or not np.issubdtype(lab_raw.dtype, np.integer):
        raise DataError(
            f"{folder / ASEG_FILE}: expected a 3-D integer label image, got {lab_raw.shape} {lab_raw.dtype}"
        )
    aseg = _resample(lab_raw.astype(np.int16), lab_affine, out_affine, size, order=0)
    aseg[~mask] = 0
    # IBSR leaves the sulcal/extra-cerebral CSF inside the brain mask unlabelled, so FreeSurfer's
    # CSF (24) would be ~45 voxels at 3 mm — too small to learn or score. Label the brain voxels
    # the template calls CSF as 24 (≈2,800 voxels at 64³), so the paper's class 7 is a real task.
    aseg[mask & (aseg == 0) & (tissue[2] > 0.5)] = 24

    arrays = {
        "t1": t1.astype(np.float32),
        "tissue": tissue.astype(np.float32),
        "aseg": aseg.astype(np.int16),
        "mask": mask,
        "affine": out_affine,
    }
    for value in arrays.values():
        value.setflags(write=False)
    return Anatomy(**arrays)
