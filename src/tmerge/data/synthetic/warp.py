"""The random spatial transform of a synthetic subject: smooth random fields and the template
anatomy warped through a random rotation, scale, shift and elastic displacement.

Every function here is pure numpy/scipy and draws all its randomness from the
:class:`numpy.random.Generator` it is given. Arrays are (S, S, S) on the anatomy's grid.
"""

from __future__ import annotations

import functools

import numpy as np
from scipy import ndimage

from tmerge.data.synthetic.anatomy import Anatomy

# --- FreeSurfer aseg label groups used to shape contrasts and place tumours -----------------
_CEREBRAL_WM = (2, 41)
_CORTEX = (3, 42)


# --- smooth random fields --------------------------------------------------------------------
@functools.lru_cache(maxsize=64)
def _rbf_matrix(size: int, n_ctrl: int) -> np.ndarray:
    """Gaussian interpolation weights from ``n_ctrl`` control points to ``size`` voxels.

    Rows are L2-normalised, so a field built from i.i.d. unit normals on the control grid has unit
    variance at *every* voxel (stationary amplitude, no weaker edges).

    Returns:
        float32 (size, n_ctrl), read-only.
    """
    step = size / n_ctrl
    centres = (np.arange(n_ctrl) + 0.5) * step - 0.5
    x = np.arange(size, dtype=np.float64)[:, None]
    weights = np.exp(-0.5 * ((x - centres[None, :]) / step) ** 2)
    weights /= np.linalg.norm(weights, axis=1, keepdims=True)
    weights = weights.astype(np.float32)
    weights.setflags(write=False)
    return weights


def smooth_noise(rng: np.random.Generator, size: int, n_ctrl: int, n_fields: int = 1) -> np.ndarray:
    """Smooth Gaussian random fields with unit variance everywhere.

    Separable Gaussian-RBF upsampling of an ``n_ctrl``³ grid of normals: three small matrix
    products instead of a 3-D spline zoom, so a 64³ field costs about a millisecond.

    Args:
        rng: Random generator.
        size: Output edge S.
        n_ctrl: Control points per axis (higher = finer detail; correlation length ~ S / n_ctrl).
        n_fields: Number of independent fields.

    Returns:
        float32 (n_fields, S, S, S).
    """
    n_ctrl = int(np.clip(n_ctrl, 2, size))
    w = _rbf_matrix(size, n_ctrl)
    coarse = rng.standard_normal((n_fields, n_ctrl, n_ctrl, n_ctrl)).astype(np.float32)
    # One axis at a time with einsum's own loops: BLAS is slower for these tiny inner dimensions
    # and its threads spin badly on a busy machine.
    along_z = np.einsum("nijk,ck->nijc", coarse, w)
    along_y = np.einsum("nijc,bj->nibc", along_z, w)
    return np.einsum("nibc,ai->nabc", along_y, w)


# --- spatial transform -----------------------------------------------------------------------
def random_rotation(rng: np.random.Generator, max_deg: float) -> np.ndarray:
    """Random rotation matrix (3, 3) from three Euler angles uniform in ±``max_deg``."""
    ax, ay, az = np.deg2rad(rng.uniform(-max_deg, max_deg, size=3))
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


@functools.lru_cache(maxsize=8)
def anatomy_aux(anat: Anatomy) -> dict[str, np.ndarray]:
    """Per-anatomy helpers, computed once (the anatomy is immutable and cached by size).

    Returns:
        ``surface``: float64 (N, 3) voxel coordinates of the brain mask's surface (bounds any
        affine image of the brain); ``near``: bool (S, S, S), the mask dilated by 2 voxels (a
        sample point rounding outside it cannot interpolate any brain voxel); ``depth``: float32
        (S, S, S) distance in voxels to the outside of the brain; ``cerebral``: bool (S, S, S)
        cerebral WM or cortex.
    """
    mask = np.asarray(anat.mask)
    surface = np.argwhere(mask & ~ndimage.binary_erosion(mask)).astype(np.float64)
    near = ndimage.binary_dilation(mask, iterations=2)
    depth = ndimage.distance_transform_edt(mask).astype(np.float32)
    cerebral = np.isin(np.asarray(anat.aseg), _CEREBRAL_WM + _CORTEX)
    aux = {"surface": surface, "near": near, "depth": depth, "cerebral": cerebral}
    for value in aux.values():
        value.setflags(write=False)
    return aux


def random_coords(
    anat: Anatomy,
    rng: np.random.Generator,
    *,
    max_rot_deg: float = 10.0,
    max_scale: float = 0.08,
    max_shift_mm: float = 6.0,
    elastic_mm: tuple[float, float] = (1.0, 3.5),
) -> np.ndarray:
    """Sampling coordinates of a random subject: for each subject voxel, where to read the anatomy.

    Forward (anatomy -> subject) is ``y = c + s·D·R·(x - c) + t`` (rotation ±``max_rot_deg``,
    isotropic scale ``s`` within ±``max_scale`` with ±3 % per-axis anisotropy ``D``, shift ``t``);
    the returned map is its inverse plus a smooth elastic displacement (Gaussian-RBF field,
    6 control points per axis, std drawn from ``elastic_mm``). Scale and shift are pulled back
    when the transformed brain would leave the field of view, so no subject is clipped.

    Args:
        anat: Template anatomy (grid S³, spacing h mm).
        rng: Random generator.
        max_rot_deg: Rotation bound per Euler angle, degrees.
        max_scale: Relative isotropic scale bound.
        max_shift_mm: Shift bound per axis, mm.
        elastic_mm: Range of the elastic displacement's standard deviation, mm.

    Returns:
        float32 (3, S, S, S) anatomy voxel coordinates, for ``scipy.ndimage.map_coordinates``.
    """
    size, h = anat.size, anat.spacing
    centre = np.full(3, (size - 1) / 2.0)
    rot = random_rotation(rng, max_rot_deg)
    scale = rng.uniform(1.0 - max_scale, 1.0 + max_scale)
    aniso = np.diag(rng.uniform(0.97, 1.03, size=3))
    shift = rng.uniform(-max_shift_mm, max_shift_mm, size=3) / h
    elastic_sd = rng.uniform(*elastic_mm) / h
    displacement = smooth_noise(rng, size, 6, n_fields=3) * np.float32(elastic_sd)

    # Keep the warped brain inside the grid with a margin for the elastic part (~2.5 sd).
    margin = 1.0 + 2.5 * elastic_sd
    lin = aniso @ rot
    pts = anatomy_aux(anat)["surface"] - centre
    ext = pts @ lin.T  # (N, 3) at unit scale, centred
    room = (size - 1) / 2.0 - margin
    needed = np.maximum(ext.max(axis=0), -ext.min(axis=0)).max()
    scale = min(scale, room / max(needed, 1e-6))
    lo = centre + scale * ext.min(axis=0)
    hi = centre + scale * ext.max(axis=0)
    shift = np.clip(shift, margin - lo, (size - 1 - margin) - hi)

    # Inverse map y -> x = c + (s·lin)^-1 (y - c - t), applied to every subject voxel.
    inv = np.linalg.inv(scale * lin)
    grid = np.indices((size, size, size), dtype=np.float32).reshape(3, -1)
    rel = grid - (centre + shift).astype(np.float32)[:, None]
    coords = np.einsum("ij,jn->in", inv.astype(np.float32), rel) + centre.astype(np.float32)[:, None]
    return coords.reshape(3, size, size, size) + displacement


def _sample(volume: np.ndarray, points: np.ndarray, order: int) -> np.ndarray:
    """``map_coordinates`` at (3, N) points with zero outside; order 0 keeps the dtype (labels)."""
    return ndimage.map_coordinates(
        volume,
        points,
        order=order,
        mode="constant",
        cval=0,
        prefilter=False,
        output=volume.dtype if order == 0 else np.float32,
    )


def warp_anatomy(anat: Anatomy, coords: np.ndarray) -> dict[str, np.ndarray]:
    """Resample the anatomy at ``coords`` (3, S, S, S): images linear, labels nearest-neighbour.

    Only points that land near the brain are interpolated (about a third of the grid); the rest
    is background by construction, which makes this ~3x faster than sampling everything.

    Returns:
        ``t1`` float32 (S,S,S), ``tissue`` float32 (3,S,S,S) summing to 1 in the mask,
        ``aseg`` int16 (S,S,S), ``mask`` bool (S,S,S).
    """
    size = coords.shape[1]
    flat = coords.reshape(3, -1)
    idx = np.rint(flat).astype(np.intp)
    valid = ((idx >= 0) & (idx < size)).all(axis=0)
    idx[:, ~valid] = 0
    near = anatomy_aux(anat)["near"]
    sel = np.flatnonzero(valid & near[idx[0], idx[1], idx[2]])
    points = flat[:, sel]

    def scatter(values: np.ndarray) -> np.ndarray:
        out = np.zeros(size**3, dtype=values.dtype)
        out[sel] = values
        return out.reshape(size, size, size)

    inside = _sample(np.asarray(anat.mask, dtype=np.float32), points, 1) > 0.5
    # CSF as the remainder keeps the three probabilities summing to one without a third resample.
    gm = np.clip(_sample(np.asarray(anat.tissue[0]), points, 1), 0.0, 1.0) * inside
    wm = np.clip(_sample(np.asarray(anat.tissue[1]), points, 1), 0.0, 1.0) * inside
    csf = np.clip(1.0 - gm - wm, 0.0, 1.0) * inside
    t1 = _sample(np.asarray(anat.t1), points, 1) * inside
    aseg = _sample(np.asarray(anat.aseg), points, 0) * inside.astype(np.int16)
    return {
        "t1": scatter(t1.astype(np.float32)),
        "tissue": np.stack([scatter(gm), scatter(wm), scatter(csf)]).astype(np.float32),
        "aseg": scatter(aseg.astype(np.int16)),
        "mask": scatter(inside),
    }
