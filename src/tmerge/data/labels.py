"""Label definitions: FreeSurfer aseg → the paper's 14 HCP classes, and the BraTS tumour regions;
a dataset's label values ↔ the internal labels (:class:`LabelMapping`). What a network predicts
from them is :mod:`tmerge.data.schemes`.

The HCP tasks (paper §4.2) segment 14 classes derived from FreeSurfer's ``aparc+aseg``; task 1
uses classes 1–7 and task 2 classes 8–14. BraTS labels (0, 1 necrosis/non-enhancing core,
2 oedema, 4 enhancing tumour) are trained as three nested, overlapping regions ET ⊂ TC ⊂ WT
with one sigmoid output each, and written back as label maps 0/1/2/4. Other datasets' label
values (BraTS 2023's 3 for enhancing, an nnU-Net dataset.json's) are mapped to these internal
labels and back by a :class:`LabelMapping` (built by the layouts: :mod:`tmerge.data.formats`,
:mod:`tmerge.data.nnunet`).

All functions here are pure and work on arrays of any spatial shape.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
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


def resolve_labels(labels: str | Sequence[int], classes: Sequence[int] | None = None) -> tuple[int, ...]:
    """Turn a label-set spec into class values.

    Args:
        labels: A :data:`LABEL_SETS` name (``"1:7"``, ``"8:14"``, ``"all"``), an inclusive range
            ``"a:b"`` or ``"a-b"``, a comma list ``"2,9,14"``, or a sequence of ints.
        classes: The dataset's foreground class values the spec selects from (``"all"`` is all
            of them). ``None``: the paper's classes 1..14 (HCP).

    Raises:
        ConfigError: the spec is malformed or a class is not among ``classes`` or repeated.
    """
    paper = classes is None
    known = tuple(range(1, len(PAPER_CLASSES) + 1)) if paper else tuple(int(c) for c in classes)
    if paper:
        expected = "a label set ('1:7', '8:14', 'all'), a range 'a-b', a list '2,9,14' or paper classes 1..14"
    else:
        expected = f"'all', a range 'a-b' or a list 'a,b,…' of the dataset's classes {list(known)}"
    if isinstance(labels, str):
        if labels == "all":
            return known
        if paper and labels in LABEL_SETS:
            return LABEL_SETS[labels]
        try:
            bounds = labels.replace("-", ":").split(":")
            if len(bounds) == 2:
                chosen = tuple(range(int(bounds[0]), int(bounds[1]) + 1))
            else:
                chosen = tuple(int(x) for x in labels.split(","))
        except ValueError:
            raise ConfigError(f"labels: got {labels!r}; expected {expected}") from None
    else:
        chosen = tuple(int(c) for c in labels)
    bad = [c for c in chosen if c not in known]
    if bad or not chosen or len(set(chosen)) != len(chosen):
        # YAML 1.1 (OmegaConf's command line) reads an unquoted 1:7 as the base-60 number 67.
        hint = " (an unquoted a:b on the command line is read as a base-60 number: write a-b)" if bad else ""
        raise ConfigError(f"labels: got {labels!r}; expected {expected}{hint}")
    return chosen


def check_label_spec(labels: str | Sequence[int]) -> None:
    """Check a label-set spec's syntax only (the classes it may name depend on the dataset).

    Raises:
        ConfigError: the spec is malformed.
    """
    if isinstance(labels, str) and labels in ("all", *LABEL_SETS):
        return
    resolve_labels(labels, classes=range(1, 1 << 16))


def select_labels(
    paper_map: np.ndarray, labels: str | Sequence[int], classes: Sequence[int] | None = None
) -> np.ndarray:
    """Keep the requested classes, renumbered 1..K in the order given; others become 0.

    Args:
        paper_map: Class map of any shape (HCP: paper classes 0..14; other datasets: their
            class values, see ``classes``).
        labels: A :data:`LABEL_SETS` name or a sequence of class values.
        classes: The dataset's foreground class values (``None``: the paper's 1..14).

    Returns:
        ``uint8`` array of the same shape with values 0..K, K = number of selected classes.
    """
    chosen = resolve_labels(labels, classes)
    known = range(1, len(PAPER_CLASSES) + 1) if classes is None else classes
    lut = np.zeros(max([*known, *chosen]) + 1, dtype=np.uint8)
    for new, old in enumerate(chosen, start=1):
        lut[old] = new
    index = np.clip(np.asarray(paper_map), 0, lut.size - 1)
    return lut[index]


def class_names(labels: str | Sequence[int], names: Mapping[int, str] | None = None) -> list[str]:
    """Names of the selected foreground classes, in output-channel order (background excluded).

    ``names``: the dataset's class value → name (``None``: the paper's classes)."""
    if names is None:
        return [PAPER_CLASSES[c - 1] for c in resolve_labels(labels)]
    return [names[c] for c in resolve_labels(labels, list(names))]


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


def values_text(values: Sequence[int]) -> str:
    """Label values for a message: ``1, 2, 4``."""
    return ", ".join(str(v) for v in values)


@dataclass(frozen=True)
class LabelMapping:
    """A dataset's label convention and its map to the task's internal labels and back.

    Internal labels are the tumour task's BraTS 2018 values 0/1/2/4 (trained as the regions of
    :func:`brats_regions`) or, for a parcellation, the dataset's class values. Pure and
    JSON-serialisable (:meth:`as_meta`), so it enters the preprocessing cache key and travels in
    a subject's ``meta`` to the writer of its prediction.

    Attributes:
        name: The convention, for messages (e.g. ``"BraTS 2023"``, ``"nnU-Net …/dataset.json"``).
        read: ``(dataset value, internal value)`` pairs; every other value in a label file is an
            error.
        write: ``(internal value, dataset value)`` pairs applied to written predictions; values
            not listed are written as they are. Empty: predictions keep the internal values.
    """

    name: str
    read: tuple[tuple[int, int], ...]
    write: tuple[tuple[int, int], ...] = ()

    def __post_init__(self) -> None:
        for pairs in (self.read, self.write):
            for a, b in pairs:
                if not (0 <= int(a) and 0 <= int(b) <= 255):
                    raise ValueError(f"label mapping {self.name}: pair ({a}, {b}) out of range")

    @property
    def values(self) -> tuple[int, ...]:
        """The dataset values a label file may hold, sorted."""
        return tuple(sorted(int(a) for a, _ in self.read))

    def to_internal(self, raw: np.ndarray, path: str | Path) -> np.ndarray:
        """Dataset label map → internal ``uint8`` labels of the same shape.

        Raises:
            DataError: naming ``path``, if a value is not one of the convention's.
        """
        raw = np.asarray(raw)
        values = np.unique(raw)
        bad = np.setdiff1d(values, np.asarray(self.values))
        if bad.size:
            shown = values_text(bad[:10].tolist()) + (", ..." if bad.size > 10 else "")
            raise DataError(
                f"{path}: label values {{{shown}}} are not {self.name} labels; "
                f"expected only {values_text(self.values)}"
            )
        lut = np.zeros(max(self.values) + 1, dtype=np.uint8)
        for a, b in self.read:
            lut[int(a)] = int(b)
        return lut[raw]

    def to_dataset(self, labels: np.ndarray) -> np.ndarray:
        """Internal labels (predictions) → the dataset's values, ``uint8``."""
        labels = np.asarray(labels)
        if not self.write:
            return labels.astype(np.uint8)
        lut = np.arange(256, dtype=np.uint8)
        for a, b in self.write:
            lut[int(a)] = int(b)
        return lut[labels.astype(np.uint8)]

    def as_meta(self) -> dict[str, object]:
        """JSON form (for a subject's ``meta``); :meth:`from_meta` reads it back."""
        return {
            "name": self.name,
            "read": [list(p) for p in self.read],
            "write": [list(p) for p in self.write],
        }

    @classmethod
    def from_meta(cls, meta: Mapping[str, object]) -> LabelMapping:
        """The mapping written by :meth:`as_meta`."""

        def pairs(key: str) -> tuple[tuple[int, int], ...]:
            return tuple((int(a), int(b)) for a, b in meta.get(key, ()))  # type: ignore[union-attr]

        return cls(str(meta["name"]), pairs("read"), pairs("write"))


#: BraTS 2023 (GLI): 1 NCR, 2 ED, 3 ET → the internal 1, 2, 4; predictions written with 3.
BRATS2023_LABELS = LabelMapping("BraTS 2023", read=((0, 0), (1, 1), (2, 2), (3, 4)), write=((4, 3),))


def dataset_labels(labels: np.ndarray, meta: Mapping[str, object] | None) -> np.ndarray:
    """A predicted label map (internal labels) in the label convention of the subject's dataset,
    as its ``meta["labels"]`` (a :meth:`LabelMapping.as_meta`) says; unchanged without one."""
    if not meta or not meta.get("labels"):
        return np.asarray(labels)
    return LabelMapping.from_meta(meta["labels"]).to_dataset(labels)  # type: ignore[arg-type]
