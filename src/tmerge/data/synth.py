"""Synthetic subjects built from the real template anatomy: HCP-like and BraTS-like.

Every function here is pure numpy/scipy and draws all its randomness from the
:class:`numpy.random.Generator` it is given, so a subject is a deterministic function of
``(anatomy, rng state)``.

A subject is the template anatomy (:class:`~tmerge.data.anatomy.Anatomy`) seen through a random
spatial transform (rotation, scale, shift and a smooth elastic warp), with contrasts derived from
the tissue probabilities and labels and then corrupted like a scanner would (smooth multiplicative
bias field, gamma, Rician noise). Images are returned as float32 in roughly 0..1, exactly 0 outside
the (warped) brain, like skull-stripped HCP and BraTS data. Arrays are (S, S, S) on the anatomy's
grid and share its affine.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
from scipy import ndimage

from tmerge.data.anatomy import Anatomy
from tmerge.data.formats import BRATS2018_GRADES, TASK_CHANNELS

# --- FreeSurfer aseg label groups used to shape contrasts and place tumours -----------------
_CEREBRAL_WM = (2, 41)
_CORTEX = (3, 42)

#: Multiplicative T2 factor per aseg label on top of the tissue mix: iron-rich deep grey matter
#: (pallidum, ventral DC / substantia nigra, putamen) is darker on T2 than cortex.
_T2_LABEL_FACTOR: dict[int, float] = {
    13: 0.72, 52: 0.72,  # pallidum
    28: 0.82, 60: 0.82,  # ventral DC
    12: 0.9, 51: 0.9,  # putamen
    10: 0.93, 49: 0.93,  # thalamus
    16: 0.88,  # brainstem
}  # fmt: skip

#: Tissue (GM, WM, CSF) intensities on the scale where the template T1's WM is ~0.9.
_T2_TISSUE = (0.62, 0.38, 1.0)
_FLAIR_TISSUE = (0.62, 0.47, 0.08)  # CSF suppressed by the inversion pulse

#: Per-compartment target intensity ranges (low, high) per modality, same scale as above.
#: Oedema: FLAIR/T2 bright, T1 a bit dark. Necrosis: T2 very bright, T1 dark, FLAIR variable.
#: Enhancing tumour: T1ce bright (rim). Non-enhancing tumour: T2/FLAIR bright, T1 dark.
_LESION_RANGES: dict[str, dict[str, tuple[float, float]]] = {
    "t1": {"oedema": (0.55, 0.78), "necrosis": (0.12, 0.4), "enhancing": (0.42, 0.7), "nonenh": (0.32, 0.58)},
    "t1ce": {
        "oedema": (0.55, 0.78),
        "necrosis": (0.12, 0.4),
        "enhancing": (1.0, 1.45),
        "nonenh": (0.32, 0.6),
    },
    "t2": {
        "oedema": (0.66, 0.95),
        "necrosis": (0.78, 1.08),
        "enhancing": (0.48, 0.78),
        "nonenh": (0.62, 0.92),
    },
    "flair": {
        "oedema": (0.72, 1.02),
        "necrosis": (0.25, 0.8),
        "enhancing": (0.58, 0.88),
        "nonenh": (0.66, 0.95),
    },
}


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


def _sigmoid(x: np.ndarray) -> np.ndarray:
    """Numerically safe logistic function (float32)."""
    return (0.5 * (1.0 + np.tanh(0.5 * np.clip(x, -60.0, 60.0)))).astype(np.float32)


# --- spatial transform -----------------------------------------------------------------------
def _rotation(rng: np.random.Generator, max_deg: float) -> np.ndarray:
    """Random rotation matrix (3, 3) from three Euler angles uniform in ±``max_deg``."""
    ax, ay, az = np.deg2rad(rng.uniform(-max_deg, max_deg, size=3))
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


@functools.lru_cache(maxsize=8)
def _anatomy_aux(anat: Anatomy) -> dict[str, np.ndarray]:
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
    rot = _rotation(rng, max_rot_deg)
    scale = rng.uniform(1.0 - max_scale, 1.0 + max_scale)
    aniso = np.diag(rng.uniform(0.97, 1.03, size=3))
    shift = rng.uniform(-max_shift_mm, max_shift_mm, size=3) / h
    elastic_sd = rng.uniform(*elastic_mm) / h
    displacement = smooth_noise(rng, size, 6, n_fields=3) * np.float32(elastic_sd)

    # Keep the warped brain inside the grid with a margin for the elastic part (~2.5 sd).
    margin = 1.0 + 2.5 * elastic_sd
    lin = aniso @ rot
    pts = _anatomy_aux(anat)["surface"] - centre
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


def _warp_anatomy(anat: Anatomy, coords: np.ndarray) -> dict[str, np.ndarray]:
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
    near = _anatomy_aux(anat)["near"]
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


# --- contrasts and scanner effects -----------------------------------------------------------
def _tissue_mix(tissue: np.ndarray, levels: tuple[float, float, float]) -> np.ndarray:
    """Intensity as the probability-weighted mix of GM/WM/CSF ``levels``: (3,S,S,S) -> (S,S,S)."""
    return np.einsum("c,cxyz->xyz", np.asarray(levels, dtype=np.float32), tissue).astype(np.float32)


def _label_factor(aseg: np.ndarray, factors: dict[int, float]) -> np.ndarray:
    """Per-voxel multiplicative factor from an aseg label lookup, lightly smoothed.

    The smoothing (σ 0.6 voxel) stands in for partial volume so nearest-neighbour label edges do
    not print as sharp steps in the image.
    """
    lut = np.ones(int(aseg.max()) + 1 if aseg.size else 1, dtype=np.float32)
    for label, value in factors.items():
        if label < lut.size:
            lut[label] = value
    return ndimage.gaussian_filter(lut[aseg], 0.6).astype(np.float32)


def _t2_from_tissue(warped: dict[str, np.ndarray]) -> np.ndarray:
    """T2 contrast (CSF bright, WM dark, iron-rich nuclei darker) from tissue and labels."""
    return _tissue_mix(warped["tissue"], _T2_TISSUE) * _label_factor(warped["aseg"], _T2_LABEL_FACTOR)


def _random_label_contrast(
    image: np.ndarray, warped: dict[str, np.ndarray], rng: np.random.Generator
) -> np.ndarray:
    """Blend ``image`` with a random intensity per aseg label so intensity alone is unreliable.

    Unlabelled brain voxels (aseg 0 inside the mask) get their own random level. The label image
    is smoothed like partial volume before blending with weight U(0.4, 0.9).
    """
    aseg = warped["aseg"]
    lut = rng.uniform(0.05, 1.0, size=int(aseg.max()) + 1).astype(np.float32)
    random_img = ndimage.gaussian_filter(lut[aseg] * warped["mask"], 0.6)
    weight = np.float32(rng.uniform(0.4, 0.9))
    return ((1.0 - weight) * image + weight * random_img).astype(np.float32)


def _scanner(
    image: np.ndarray,
    mask: np.ndarray,
    rng: np.random.Generator,
    *,
    bias: float = 0.3,
    gamma_sd: float = 0.25,
    noise: tuple[float, float] = (0.01, 0.05),
) -> np.ndarray:
    """Apply a scanner's corruptions and skull-strip.

    Smooth multiplicative bias field ``exp(b·field)`` (b ≤ ``bias``, 4 control points per axis),
    normalisation of the brain's 99th percentile to 1, gamma ``exp(N(0, gamma_sd))``, then Rician
    noise (magnitude of a complex signal with Gaussian noise of std U(``noise``)), and finally 0
    outside ``mask``.

    Args:
        image: float32 (S, S, S), nonnegative.
        mask: bool (S, S, S) brain mask.
        rng: Random generator.

    Returns:
        float32 (S, S, S), about 0..1 inside the brain, exactly 0 outside.
    """
    size = image.shape[0]
    field = smooth_noise(rng, size, 4)[0]
    gain = np.float32(rng.uniform(0.0, bias))
    gamma = np.float32(np.exp(rng.normal(0.0, gamma_sd)))
    sigma = np.float32(rng.uniform(*noise))
    # Everything outside the mask ends as 0, so only brain voxels are computed (~1/4 of the grid).
    sel = np.flatnonzero(mask)
    values = image.reshape(-1)[sel] * np.exp(gain * field.reshape(-1)[sel])
    ref = float(np.percentile(values, 99)) if values.size else 1.0
    values = np.clip(values / np.float32(max(ref, 1e-6)), 0.0, None) ** gamma
    real = values + sigma * rng.standard_normal(values.shape, dtype=np.float32)
    imag = sigma * rng.standard_normal(values.shape, dtype=np.float32)
    out = np.zeros(size**3, dtype=np.float32)
    out[sel] = np.sqrt(real * real + imag * imag)
    return out.reshape(image.shape)


# --- HCP-like subjects -----------------------------------------------------------------------
def synth_hcp_subject(
    anat: Anatomy, rng: np.random.Generator, *, random_contrast_p: float = 0.3
) -> dict[str, Any]:
    """One HCP-like subject: skull-stripped T1w and T2w with its FreeSurfer aseg labels.

    Args:
        anat: Template anatomy on an S³ grid.
        rng: The subject's own random generator.
        random_contrast_p: Probability that the subject's contrasts are partly replaced by a random
            intensity per label (forces a model to use shape, not only intensity).

    Returns:
        ``t1``, ``t2``: float32 (S, S, S), about 0..1, 0 outside the brain;
        ``aseg``: int16 (S, S, S), FreeSurfer numbering (subset of the template's labels);
        ``mask``: bool (S, S, S) brain mask; ``affine``: float64 (4, 4), the anatomy's.
    """
    coords = random_coords(anat, rng)
    warped = _warp_anatomy(anat, coords)
    t1 = warped["t1"]
    t2 = _t2_from_tissue(warped)
    if rng.random() < random_contrast_p:
        t1 = _random_label_contrast(t1, warped, rng)
        t2 = _random_label_contrast(t2, warped, rng)
    mask = warped["mask"]
    return {
        "t1": _scanner(t1, mask, rng),
        "t2": _scanner(t2, mask, rng),
        "aseg": warped["aseg"].astype(np.int16),
        "mask": mask,
        "affine": np.array(anat.affine, dtype=np.float64),
    }


# --- BraTS-like subjects ---------------------------------------------------------------------
def _ellipsoid_norm(
    coords: np.ndarray, centre: np.ndarray, radius: float, rng: np.random.Generator
) -> np.ndarray:
    """Distance to ``centre`` in units of ``radius`` under a random ellipsoid metric.

    Args:
        coords: float32 (3, S, S, S) positions (anatomy voxels).
        centre: (3,) centre.
        radius: Mean semi-axis in voxels.

    Returns:
        float32 (S, S, S); 1 on the (random) ellipsoid's surface.
    """
    axes = rng.uniform(0.7, 1.3, size=3)
    axes /= np.cbrt(np.prod(axes))  # keep the volume of the sphere of ``radius``
    metric = (np.diag(1.0 / (axes * radius)) @ _rotation(rng, 90.0).T).astype(np.float32)
    rel = coords.reshape(3, -1) - centre.astype(np.float32)[:, None]
    return (
        np.linalg.norm(np.einsum("ij,jn->in", metric, rel), axis=0)
        .reshape(coords.shape[1:])
        .astype(np.float32)
    )


def _tumour_centre(anat: Anatomy, rng: np.random.Generator, radius: float) -> np.ndarray:
    """Random tumour centre (anatomy voxel coords) in cerebral WM/cortex, away from the brain edge."""
    aux = _anatomy_aux(anat)
    depth, cerebral = aux["depth"], aux["cerebral"]
    for min_depth in (max(2.0, 0.35 * radius), 2.0, 1.0):
        candidates = np.argwhere(cerebral & (depth >= min_depth))
        if len(candidates):
            break
    else:
        candidates = np.argwhere(np.asarray(anat.mask))
    jitter = rng.uniform(-0.5, 0.5, size=3)
    return candidates[rng.integers(len(candidates))].astype(np.float64) + jitter


def _mass_effect(coords: np.ndarray, centre: np.ndarray, strength: float, width: float) -> np.ndarray:
    """Push tissue away from ``centre``: sample the anatomy closer to it (Gaussian radial field).

    ``x' = x - a·(x - c)·exp(-|x - c|²/(2w²))``; with ``a < 1`` the map stays one-to-one.
    """
    rel = coords - centre.astype(np.float32)[:, None, None, None]
    fall = np.exp(-(rel * rel).sum(axis=0) / np.float32(2.0 * width * width))
    return (coords - np.float32(strength) * rel * fall[None]).astype(np.float32)


def synth_brats_subject(
    anat: Anatomy, rng: np.random.Generator, grade: str = "HGG", labelled: bool = True
) -> dict[str, Any]:
    """One BraTS-like subject: four skull-stripped contrasts with a nested synthetic glioma.

    Tumour compartments (BraTS labels): oedema 2, necrosis / non-enhancing 1, enhancing 4, with
    ET ⊂ TC = 1 ∪ 4 ⊂ WT = 1 ∪ 2 ∪ 4 by construction. Shapes are noise-perturbed random ellipsoids
    (size log-uniform from small to large, oedema spreading along WM and sparing CSF), placed in
    cerebral WM/cortex, optionally with mass effect. HGG: mostly an enhancing rim around a necrotic
    core (sometimes solid, sometimes a broken rim). LGG: mostly non-enhancing, patchy or no ET.
    Lesion intensities, their contrast to tissue, boundary sharpness and texture are drawn per
    subject (sometimes a weak ET on T1ce), and some subjects carry unlabelled FLAIR/T2-bright
    white-matter lesions, so no single modality can be thresholded.

    Args:
        anat: Template anatomy on an S³ grid.
        rng: The subject's own random generator.
        grade: ``"HGG"`` or ``"LGG"``.
        labelled: If False, ``seg`` is None (the tumour is still drawn, identically).

    Returns:
        ``t1``, ``t1ce``, ``t2``, ``flair``: float32 (S, S, S), about 0..1, 0 outside the brain;
        ``seg``: uint8 (S, S, S) with values in {0, 1, 2, 4}, or None when unlabelled;
        ``mask``: bool (S, S, S); ``grade``: str; ``affine``: float64 (4, 4), the anatomy's.

    Raises:
        ValueError: If ``grade`` is not HGG or LGG.
    """
    if grade not in BRATS2018_GRADES:
        raise ValueError(f"grade={grade!r}: expected 'HGG' or 'LGG'")
    hgg = grade == BRATS2018_GRADES[0]
    size, h = anat.size, anat.spacing

    coords = random_coords(anat, rng)

    # Sizes in mm, converted to voxels; never below ~1.5 voxels so the lesion survives sampling.
    r_wt = max(np.exp(rng.uniform(np.log(14.0), np.log(42.0))) / h, 1.5)
    tc_ratio = rng.uniform(0.45, 0.9) if hgg else rng.uniform(0.4, 0.95)
    r_tc = max(r_wt * tc_ratio, 1.2)
    centre = _tumour_centre(anat, rng, r_wt)
    centre_tc = centre + rng.uniform(-0.25, 0.25, size=3) * r_wt

    # Mass effect only moves the healthy anatomy; the tumour is drawn on the undisplaced coords.
    anat_coords = coords
    if rng.random() < 0.6:
        anat_coords = _mass_effect(coords, centre_tc, rng.uniform(0.1, 0.45), 0.9 * r_tc + 1.0)
    warped = _warp_anatomy(anat, anat_coords)
    mask = warped["mask"]
    gm, wm, csf = warped["tissue"]

    # Shape noise with a correlation length of about half the lesion radius.
    n_shape = int(np.clip(size / max(0.6 * r_wt, 1.0), 3, min(12, size // 2)))
    noise = smooth_noise(rng, size, n_shape, n_fields=3)
    tex = smooth_noise(rng, size, max(size // 4, 3))[0]
    f_wt = (
        1.0
        - _ellipsoid_norm(coords, centre, r_wt, rng)
        + rng.uniform(0.1, 0.4) * noise[0]
        + rng.uniform(0.0, 0.5) * (wm - 0.3)
        - 1.2 * csf
    )
    f_tc = 1.0 - _ellipsoid_norm(coords, centre_tc, r_tc, rng) + rng.uniform(0.1, 0.35) * noise[1]
    f_wt = np.maximum(f_wt, f_tc)  # oedema surrounds the core

    wt = (f_wt > 0) & mask
    if not wt.any():  # tiny lesion lost between voxels: keep its strongest voxel
        wt.flat[np.argmax(np.where(mask, f_wt, -np.inf))] = True
    tc = (f_tc > 0) & wt
    if not tc.any():
        tc.flat[np.argmax(np.where(wt, f_tc, -np.inf))] = True

    if hgg:
        # Necrotic core inside an enhancing rim; 15 % solid (no core); rim sometimes broken.
        # The rim is at least ~1 voxel thick so small tumours keep their enhancing part.
        core_level = np.inf if rng.random() < 0.15 else max(rng.uniform(0.2, 0.6), 1.0 / r_tc)
        rim_break = rng.uniform(-2.5, 0.3)  # threshold on unit noise: low = intact rim
        core = f_tc > core_level
        et = tc & ~core & (noise[2] > rim_break)
    else:
        # LGG: mostly non-enhancing; a third with small enhancing patches.
        core_level = np.inf
        rim_break = rng.uniform(0.8, 1.8) if rng.random() < 0.35 else np.inf
        et = tc & (noise[2] > rim_break)

    # Soft compartment fractions drive the intensities, so the label edge is a blurred transition
    # whose sharpness varies per subject (τ in units of the field's per-voxel change).
    tau = np.float32(rng.uniform(0.3, 1.2) / r_tc)
    w_wt = _sigmoid(f_wt / max(tau, 1e-3) * np.float32(r_tc / r_wt)) * mask
    w_tc = _sigmoid(f_tc / tau) * mask
    w_core = _sigmoid((f_tc - np.float32(core_level)) / tau) * mask if np.isfinite(core_level) else 0.0 * w_tc
    w_rim = _sigmoid((noise[2] - np.float32(rim_break)) / 0.3) if np.isfinite(rim_break) else 0.0 * w_tc
    w_tc = np.maximum(w_tc, w_core)
    frac_enh = np.clip((w_tc - w_core) * w_rim, 0.0, 1.0)
    frac_nonenh = np.clip(w_tc - w_core - frac_enh, 0.0, 1.0)
    frac_oedema = np.clip(w_wt - w_tc, 0.0, 1.0)
    frac_tissue = np.clip(1.0 - np.maximum(w_wt, w_tc), 0.0, 1.0)
    # Oedema is strongest next to the core and fades outwards.
    oedema_gain = 0.55 + 0.45 * np.clip(f_wt * np.float32(2.0), 0.0, 1.0)

    # Unlabelled FLAIR/T2-bright white-matter lesions (small-vessel disease) in ~40 % of subjects.
    distractor = np.zeros((size, size, size), dtype=np.float32)
    if rng.random() < 0.4:
        spots = np.argwhere((wm > 0.6) & (f_wt < -0.5))
        for _ in range(int(rng.integers(1, 5)) if len(spots) else 0):
            spot = spots[rng.integers(len(spots))].astype(np.float32)
            radius = max(rng.uniform(3.0, 8.0) / h, 0.7)
            rel = np.indices((size,) * 3, dtype=np.float32) - spot[:, None, None, None]
            distractor = np.maximum(distractor, np.exp(-(rel * rel).sum(axis=0) / np.float32(2 * radius**2)))

    base = {
        "t1": warped["t1"],
        "t1ce": warped["t1"] * np.float32(rng.uniform(0.92, 1.0)),
        "t2": _t2_from_tissue(warped),
        "flair": _tissue_mix(warped["tissue"], _FLAIR_TISSUE),
    }
    low_contrast_et = rng.random() < 0.2
    distractor_gain = {"t1": -0.12, "t1ce": -0.05, "t2": 0.35, "flair": 0.3}
    tex_amp = np.float32(rng.uniform(0.0, 0.15))
    images: dict[str, np.ndarray] = {}
    for name in TASK_CHANNELS["brats"]:
        ranges = _LESION_RANGES[name]
        target = {comp: np.float32(rng.uniform(*lims)) for comp, lims in ranges.items()}
        if name == "t1ce" and low_contrast_et:
            target["enhancing"] = np.float32(rng.uniform(0.72, 0.95))
        kappa = np.float32(rng.uniform(0.45, 1.0))  # this subject's lesion conspicuity
        tissue_img = base[name]

        def toward(level: np.float32, img: np.ndarray = tissue_img, k: np.float32 = kappa) -> np.ndarray:
            return img + k * (level - img)

        texture = 1.0 + tex_amp * tex
        img = (
            frac_tissue * tissue_img
            + frac_oedema * (tissue_img + oedema_gain * (toward(target["oedema"]) - tissue_img))
            + (
                w_core * toward(target["necrosis"])
                + frac_nonenh * toward(target["nonenh"])
                + frac_enh * toward(target["enhancing"])
            )
            * texture
        )
        img = img * (1.0 + np.float32(distractor_gain[name] * rng.uniform(0.5, 1.0)) * distractor)
        images[name] = _scanner(np.clip(img, 0.0, None).astype(np.float32), mask, rng)

    seg = None
    if labelled:
        seg = np.zeros((size, size, size), dtype=np.uint8)
        seg[wt] = 2
        seg[tc] = 1
        seg[et & tc] = 4
    return {
        **images,
        "seg": seg,
        "mask": mask,
        "grade": grade,
        "affine": np.array(anat.affine, dtype=np.float64),
    }


# --- the "structures" target: task-1 structures in contrasts the sources never saw -----------
#: Its channels: three synthetic contrasts named after no MR sequence a source saw.
STRUCTURES_CHANNELS: tuple[str, ...] = ("syn1", "syn2", "syn3")
#: Its classes (dataset value → name) and the paper class each is (both among task 1's 1–7).
STRUCTURES_CLASSES: dict[int, tuple[str, int]] = {1: ("thalamus", 3), 2: ("caudate", 5)}
# GM/WM/CSF levels of each channel: a T1-like, an inverted (CSF-bright) and a flat-WM contrast.
_STRUCTURES_TISSUE = ((0.55, 0.9, 0.15), (0.7, 0.45, 1.0), (0.8, 0.75, 0.35))


def synth_structures_subject(anat: Anatomy, rng: np.random.Generator) -> dict[str, Any]:
    """One subject of the ``structures`` target: new contrasts of a warped anatomy, labelled
    with two deep grey-matter structures that parcellation task 1 learned.

    Each channel is a tissue mix (:data:`_STRUCTURES_TISSUE`, each level jittered by ×U(0.85,
    1.15) per subject) with the deep nuclei's T2 factors, through :func:`_scanner`.

    Returns:
        ``syn1``, ``syn2``, ``syn3``: float32 (S, S, S), about 0..1, 0 outside the brain;
        ``label``: uint8 (S, S, S) with values 0, 1 (thalamus), 2 (caudate).
    """
    from tmerge.data.labels import aseg_to_paper

    warped = _warp_anatomy(anat, random_coords(anat, rng))
    mask = warped["mask"]
    factor = _label_factor(warped["aseg"], _T2_LABEL_FACTOR)
    out: dict[str, Any] = {}
    for name, levels in zip(STRUCTURES_CHANNELS, _STRUCTURES_TISSUE, strict=True):
        jitter = rng.uniform(0.85, 1.15, size=3)
        image = _tissue_mix(warped["tissue"], tuple(float(v) for v in np.asarray(levels) * jitter)) * factor
        out[name] = _scanner(image, mask, rng)
    paper = aseg_to_paper(warped["aseg"])
    label = np.zeros(paper.shape, dtype=np.uint8)
    for value, (_, paper_class) in STRUCTURES_CLASSES.items():
        label[paper == paper_class] = value
    out["label"] = label
    return out
