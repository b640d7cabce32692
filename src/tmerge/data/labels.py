"""Label definitions: FreeSurfer aseg → the paper's 14 HCP classes, and the BraTS tumour regions.

The HCP tasks (paper §4.2) segment 14 classes derived from FreeSurfer's ``aparc+aseg``; task 1
uses classes 1–7 and task 2 classes 8–14. BraTS labels (0, 1 necrosis/non-enhancing core,
2 oedema, 4 enhancing tumour) are trained as three nested, overlapping regions ET ⊂ TC ⊂ WT
with one sigmoid output each, and written back as label maps 0/1/2/4.

All functions here are pure and work on arrays of any spatial shape.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from tmerge.errors import ConfigError, DataError

#: Names of the paper's 14 HCP classes, index ``i`` naming class ``i + 1``.
PAPER_CLASSES: tuple[str, ...] = (
    "cerebellum GM",
    "cerebral GM/cortex + accumbens",
    "thalamus",
    "amygdala + choroid plexus",
    "caudate",
    "pallidum",
    "CSF",
    "cerebellum WM",
    "cerebral WM",
    "hippocampus",
    "ventricles",
    "putamen",
    "ventral DC",
    "brainstem",
)

#: Named label sets: task 1, task 2 and the All-HCP baseline.
LABEL_SETS: dict[str, tuple[int, ...]] = {
    "1:7": tuple(range(1, 8)),
    "8:14": tuple(range(8, 15)),
    "all": tuple(range(1, 15)),
}

# FreeSurfer aseg values of each paper class. Both hemispheres go to the same class because the
# paper's classes are not lateralised; 9/48 are the thalamus in FreeSurfer's old numbering.
_ASEG_TO_PAPER: dict[int, tuple[int, ...]] = {
    1: (8, 47),
    2: (3, 42, 26, 58, *range(1000, 1036), *range(2000, 2036)),
    3: (10, 49, 9, 48),
    4: (18, 54, 31, 63),
    5: (11, 50),
    6: (13, 52),
    7: (24,),
    8: (7, 46),
    9: (2, 41, 77, *range(251, 256)),
    10: (17, 53),
    11: (4, 5, 43, 44, 14, 15),
    12: (12, 51),
    13: (28, 60),
    14: (16,),
}


def _build_aseg_lut() -> np.ndarray:
    """Return the aseg → paper lookup table; its last entry (0) catches out-of-range values."""
    size = max(v for values in _ASEG_TO_PAPER.values() for v in values) + 1
    lut = np.zeros(size + 1, dtype=np.uint8)
    for paper_class, aseg_values in _ASEG_TO_PAPER.items():
        lut[list(aseg_values)] = paper_class
    return lut


_ASEG_LUT = _build_aseg_lut()

#: BraTS training targets, in the order of the network's sigmoid channels.
REGIONS: tuple[str, ...] = ("ET", "TC", "WT")

#: Label values a BraTS ``_seg`` file may hold.
BRATS_LABELS: tuple[int, ...] = (0, 1, 2, 4)


def aseg_to_paper(aseg: np.ndarray) -> np.ndarray:
    """Map FreeSurfer ``aparc+aseg`` values to the paper's classes 0..14.

    Args:
        aseg: Integer label map of any shape, e.g. ``(X, Y, Z)``.

    Returns:
        ``uint8`` array of the same shape: the paper class of each voxel, 0 for any value not
        listed in the paper's 14 classes.
    """
    # Clipping to the table's last entry (a 0) maps negative and unknown large values to
    # background in one vectorised gather, without a per-label loop.
    index = np.clip(np.asarray(aseg), 0, _ASEG_LUT.size - 1)
    return _ASEG_LUT[index]


def resolve_labels(labels: str | Sequence[int]) -> tuple[int, ...]:
    """Turn a label-set spec into paper class ids.

    Args:
        labels: A :data:`LABEL_SETS` name (``"1:7"``, ``"8:14"``, ``"all"``), an inclusive range
            ``"a:b"`` or ``"a-b"``, a comma list ``"2,9,14"``, or a sequence of ints.

    Raises:
        ConfigError: the spec is malformed or a class is outside 1..14 or repeated.
    """
    expected = "a label set ('1:7', '8:14', 'all'), a range 'a-b', a list '2,9,14' or paper classes 1..14"
    if isinstance(labels, str):
        if labels in LABEL_SETS:
            return LABEL_SETS[labels]
        try:
            bounds = labels.replace("-", ":").split(":")
            if len(bounds) == 2:
                classes = tuple(range(int(bounds[0]), int(bounds[1]) + 1))
            else:
                classes = tuple(int(x) for x in labels.split(","))
        except ValueError:
            raise ConfigError(f"labels: got {labels!r}; expected {expected}") from None
    else:
        classes = tuple(int(c) for c in labels)
    bad = [c for c in classes if not 1 <= c <= len(PAPER_CLASSES)]
    if bad or not classes or len(set(classes)) != len(classes):
        # YAML 1.1 (OmegaConf's command line) reads an unquoted 1:7 as the base-60 number 67.
        hint = " (an unquoted a:b on the command line is read as a base-60 number: write a-b)" if bad else ""
        raise ConfigError(f"labels: got {labels!r}; expected {expected}{hint}")
    return classes


def select_labels(paper_map: np.ndarray, labels: str | Sequence[int]) -> np.ndarray:
    """Keep the requested paper classes, renumbered 1..K in the order given; others become 0.

    Args:
        paper_map: Paper class map (values 0..14) of any shape.
        labels: A :data:`LABEL_SETS` name or a sequence of paper classes.

    Returns:
        ``uint8`` array of the same shape with values 0..K, K = number of selected classes.
    """
    lut = np.zeros(len(PAPER_CLASSES) + 1, dtype=np.uint8)
    for new, old in enumerate(resolve_labels(labels), start=1):
        lut[old] = new
    return lut[np.asarray(paper_map)]


def class_names(labels: str | Sequence[int]) -> list[str]:
    """Names of the selected foreground classes, in output-channel order (background excluded)."""
    return [PAPER_CLASSES[c - 1] for c in resolve_labels(labels)]


def brats_regions(seg: np.ndarray) -> np.ndarray:
    """BraTS label map → the three nested regions.

    Args:
        seg: Label map with values in {0, 1, 2, 4}, shape ``(...)``, e.g. ``(D, H, W)``.

    Returns:
        ``bool`` array of shape ``(3, ...)``: channel 0 ET = 4, 1 TC = 1 ∪ 4, 2 WT = 1 ∪ 2 ∪ 4.
    """
    seg = np.asarray(seg)
    et = seg == 4
    tc = et | (seg == 1)
    wt = tc | (seg == 2)
    return np.stack([et, tc, wt])


def regions_to_brats(regions: np.ndarray) -> np.ndarray:
    """Three region masks ``(3, ...)`` (ET, TC, WT) → a BraTS label map 0/1/2/4 of shape ``(...)``.

    The exact inverse of :func:`brats_regions` on nested regions. For predicted masks that are
    not nested, the innermost region present wins (ET over TC over WT), the usual convention.
    """
    regions = np.asarray(regions, dtype=bool)
    if regions.ndim < 1 or regions.shape[0] != len(REGIONS):
        raise ValueError(f"expected regions of shape (3, ...), got {regions.shape}")
    seg = np.zeros(regions.shape[1:], dtype=np.uint8)
    # Paint from the outermost region inwards so inner regions overwrite outer ones.
    seg[regions[2]] = 2
    seg[regions[1]] = 1
    seg[regions[0]] = 4
    return seg


def check_brats_labels(seg: np.ndarray, path: str | Path) -> None:
    """Raise a :class:`DataError` naming ``path`` if ``seg`` holds values outside {0, 1, 2, 4}."""
    values = np.unique(np.asarray(seg))
    bad = np.setdiff1d(values, np.asarray(BRATS_LABELS))
    if bad.size:
        shown = ", ".join(str(v) for v in bad[:10].tolist()) + (", ..." if bad.size > 10 else "")
        raise DataError(f"{path}: label values {{{shown}}} are not BraTS labels; expected only 0, 1, 2, 4")


def check_aseg_labels(aseg: np.ndarray, path: str | Path) -> None:
    """Raise a :class:`DataError` naming ``path`` if an aseg map holds negative values.

    FreeSurfer labels are non-negative; any other value is mapped to background, so only
    negatives (a sign of a wrong file) are rejected.
    """
    low = int(np.asarray(aseg).min()) if np.asarray(aseg).size else 0
    if low < 0:
        raise DataError(f"{path}: negative label value {low}; expected FreeSurfer aseg labels (>= 0)")
