"""Synthetic subjects built from the real template anatomy: HCP-like, BraTS-like and the
``structures`` target's.

Every function here is pure numpy/scipy and draws all its randomness from the
:class:`numpy.random.Generator` it is given, so a subject is a deterministic function of
``(anatomy, rng state)``.

A subject is the template anatomy (:class:`~tmerge.data.synthetic.anatomy.Anatomy`) seen through a
random spatial transform (rotation, scale, shift and a smooth elastic warp;
:mod:`tmerge.data.synthetic.warp`), with contrasts derived from the tissue probabilities and labels
and then corrupted like a scanner would (smooth multiplicative bias field, gamma, Rician noise;
:mod:`tmerge.data.synthetic.contrast`). Images are returned as float32 in roughly 0..1, exactly 0
outside the (warped) brain, like skull-stripped HCP and BraTS data. Arrays are (S, S, S) on the
anatomy's grid and share its affine.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from tmerge.data.channels import TASK_CHANNELS
from tmerge.data.formats import BRATS2018_GRADES
from tmerge.data.synthetic.anatomy import Anatomy
from tmerge.data.synthetic.contrast import (
    FLAIR_TISSUE,
    T2_LABEL_FACTOR,
    label_factor,
    random_label_contrast,
    scanner_effects,
    t2_from_tissue,
    tissue_mix,
)
from tmerge.data.synthetic.warp import (
    anatomy_aux,
    random_coords,
    random_rotation,
    smooth_noise,
    warp_anatomy,
)

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



def _sigmoid(x: np.ndarray) -> np.ndarray:
    """Numerically safe logistic function (float32)."""
    return (0.5 * (1.0 + np.tanh(0.5 * np.clip(x, -60.0, 60.0)))).astype(np.float32)


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
    warped = warp_anatomy(anat, coords)
    t1 = warped["t1"]
    t2 = t2_from_tissue(warped)
    if rng.random() < random_contrast_p:
        t1 = random_label_contrast(t1, warped, rng)
        t2 = random_label_contrast(t2, warped, rng)
    mask = warped["mask"]
    return {
        "t1": scanner_effects(t1, mask, rng),
        "t2": scanner_effects(t2, mask, rng),
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
    metric = (np.diag(1.0 / (axes * radius)) @ random_rotation(rng, 90.0).T).astype(np.float32)
    rel = coords.reshape(3, -1) - centre.astype(np.float32)[:, None]
    return (
        np.linalg.norm(np.einsum("ij,jn->in", metric, rel), axis=0)
        .reshape(coords.shape[1:])
        .astype(np.float32)
    )


def _tumour_centre(anat: Anatomy, rng: np.random.Generator, radius: float) -> np.ndarray:
    """Random tumour centre (anatomy voxel coords) in cerebral WM/cortex, away from the brain edge."""
    aux = anatomy_aux(anat)
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
    warped = warp_anatomy(anat, anat_coords)
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
        "t2": t2_from_tissue(warped),
        "flair": tissue_mix(warped["tissue"], FLAIR_TISSUE),
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
        images[name] = scanner_effects(np.clip(img, 0.0, None).astype(np.float32), mask, rng)

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
    1.15) per subject) with the deep nuclei's T2 factors, through
    :func:`~tmerge.data.synthetic.contrast.scanner_effects`.

    Returns:
        ``syn1``, ``syn2``, ``syn3``: float32 (S, S, S), about 0..1, 0 outside the brain;
        ``label``: uint8 (S, S, S) with values 0, 1 (thalamus), 2 (caudate).
    """
    from tmerge.data.labels import aseg_to_paper

    warped = warp_anatomy(anat, random_coords(anat, rng))
    mask = warped["mask"]
    factor = label_factor(warped["aseg"], T2_LABEL_FACTOR)
    out: dict[str, Any] = {}
    for name, levels in zip(STRUCTURES_CHANNELS, _STRUCTURES_TISSUE, strict=True):
        jitter = rng.uniform(0.85, 1.15, size=3)
        image = tissue_mix(warped["tissue"], tuple(float(v) for v in np.asarray(levels) * jitter)) * factor
        out[name] = scanner_effects(image, mask, rng)
    paper = aseg_to_paper(warped["aseg"])
    label = np.zeros(paper.shape, dtype=np.uint8)
    for value, (_, paper_class) in STRUCTURES_CLASSES.items():
        label[paper == paper_class] = value
    out["label"] = label
    return out
