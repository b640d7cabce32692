"""MR contrasts of a warped anatomy and a scanner's corruptions of them.

Contrasts are derived from the tissue probabilities and labels (:mod:`tmerge.data.synthetic.warp`)
and corrupted like a scanner would (smooth multiplicative bias field, gamma, Rician noise). Every
function here is pure numpy/scipy and draws all its randomness from the
:class:`numpy.random.Generator` it is given.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from tmerge.data.synthetic.warp import smooth_noise

#: Multiplicative T2 factor per aseg label on top of the tissue mix: iron-rich deep grey matter
#: (pallidum, ventral DC / substantia nigra, putamen) is darker on T2 than cortex.
T2_LABEL_FACTOR: dict[int, float] = {
    13: 0.72, 52: 0.72,  # pallidum
    28: 0.82, 60: 0.82,  # ventral DC
    12: 0.9, 51: 0.9,  # putamen
    10: 0.93, 49: 0.93,  # thalamus
    16: 0.88,  # brainstem
}  # fmt: skip

#: Tissue (GM, WM, CSF) intensities on the scale where the template T1's WM is ~0.9.
_T2_TISSUE = (0.62, 0.38, 1.0)
FLAIR_TISSUE = (0.62, 0.47, 0.08)  # CSF suppressed by the inversion pulse


# --- contrasts and scanner effects -----------------------------------------------------------
def tissue_mix(tissue: np.ndarray, levels: tuple[float, float, float]) -> np.ndarray:
    """Intensity as the probability-weighted mix of GM/WM/CSF ``levels``: (3,S,S,S) -> (S,S,S)."""
    return np.einsum("c,cxyz->xyz", np.asarray(levels, dtype=np.float32), tissue).astype(np.float32)


def label_factor(aseg: np.ndarray, factors: dict[int, float]) -> np.ndarray:
    """Per-voxel multiplicative factor from an aseg label lookup, lightly smoothed.

    The smoothing (σ 0.6 voxel) stands in for partial volume so nearest-neighbour label edges do
    not print as sharp steps in the image.
    """
    lut = np.ones(int(aseg.max()) + 1 if aseg.size else 1, dtype=np.float32)
    for label, value in factors.items():
        if label < lut.size:
            lut[label] = value
    return ndimage.gaussian_filter(lut[aseg], 0.6).astype(np.float32)


def t2_from_tissue(warped: dict[str, np.ndarray]) -> np.ndarray:
    """T2 contrast (CSF bright, WM dark, iron-rich nuclei darker) from tissue and labels."""
    return tissue_mix(warped["tissue"], _T2_TISSUE) * label_factor(warped["aseg"], T2_LABEL_FACTOR)


def random_label_contrast(
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


def scanner_effects(
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

