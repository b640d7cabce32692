"""Per-subject preprocessing (paper §4.2), done once and cached, never in the training loop.

Pipeline for one subject:

1. load the modalities (and the label map, in the task's internal labels: see
   :class:`~tmerge.data.labels.LabelMapping`) and check they share one voxel grid;
   with ``orientation`` / ``spacing`` set, reorient and resample them (MONAI ``Orientation``,
   ``Spacing``: images linearly, labels by nearest neighbour);
2. brain mask = voxels where any modality is non-zero (the inputs are skull-stripped);
3. N4 bias-field correction inside the mask (SimpleITK; BraTS only, as in the paper);
4. histogram normalisation of each modality inside the mask (MONAI ``HistogramNormalize``),
   background set to 0;
5. crop to the bounding box of the brain (and any labelled voxel), then zero-pad symmetrically to
   a multiple of the network's divisor (the product of its downsampling strides, e.g. 2⁴ = 16)
   that is at least the patch size (random patches must fit).

The crop box, padding, original shape and affine (and, when resampled, the resampled grid) are
kept in ``meta`` so :func:`~tmerge.data.geometry.uncrop` can put a prediction back into the
original geometry (:mod:`tmerge.data.geometry`). The cache of the results is
:mod:`tmerge.data.cache`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from tmerge.data.geometry import apply_box, crop_box, resample_case, uncrop, voxel_spacing
from tmerge.data.labels import LabelMapping, aseg_to_paper, check_aseg_labels, check_brats_labels
from tmerge.data.nifti import check_same_geometry, load_labels, load_volume
from tmerge.errors import DataError

log = logging.getLogger(__name__)

Kind = Literal["hcp", "brats", "target"]

# Bump when the algorithm changes in a way the settings do not capture, so old caches miss.
_PIPELINE_VERSION = 1


@dataclass(frozen=True)
class PreprocessSettings:
    """Settings that change the preprocessed arrays (all of them enter the cache key).

    Attributes:
        n4: Run N4 bias-field correction (the paper does so for BraTS only).
        n4_shrink: Shrink factor of the image N4 fits the bias on; the bias field is smooth,
            so fitting on a 4× shrunk image loses little and is ~60× cheaper (64³ at 3 mm:
            ~0.3 s per modality instead of several seconds at factor 2).
        n4_iterations: Iterations per fitting level; few, because the bias of skull-stripped,
            already-reconstructed MRI is mild and N4 must stay well under a second per volume.
        histogram_bins: Bins of the histogram normalisation; 256 resolves the tissue peaks.
        multiple: Output sizes are multiples of this: the network's divisor
            (:attr:`tmerge.nets.config.NetConfig.divisor`); 1: no constraint.
        min_size: Smallest output size per axis: the training patch size, so patches fit.
        spacing: Voxel size (mm per array axis) every case is resampled to; ``None``: none.
        orientation: Axis codes every case is reoriented to (e.g. ``"RAS"``); ``None``: none.
        labels: The dataset's label convention, mapped to the internal labels on reading;
            ``None``: the kind's native one (BraTS 0/1/2/4 checked as they are, HCP aseg).
        allow_blank_modality: Accept a modality that is all zero or constant within the brain
            (a zero-filled missing sequence) instead of refusing the subject.
    """

    n4: bool = False
    n4_shrink: int = 4
    n4_iterations: tuple[int, ...] = (20, 10)
    histogram_bins: int = 256
    multiple: int = 1
    min_size: int = 48
    spacing: tuple[float, float, float] | None = None
    orientation: str | None = None
    labels: LabelMapping | None = None
    allow_blank_modality: bool = False

    @property
    def resamples(self) -> bool:
        """Whether cases are reoriented or resampled (their grid differs from their files')."""
        return self.spacing is not None or self.orientation is not None

    def digest(self, **extra: Any) -> str:
        """Short stable hash of the settings plus ``extra`` (e.g. kind and dataset root).

        Settings added after the first cache (spacing, orientation, labels, allow_blank_modality)
        enter the hash only when not at their default, so the caches of the defaults keep their
        keys."""
        settings = dataclasses.asdict(self)
        for key, default in _OPTIONAL_KEYS.items():
            if settings[key] == default:
                del settings[key]
        payload = {"version": _PIPELINE_VERSION, **settings, **extra}
        return _sha(json.dumps(payload, sort_keys=True, default=str))[:16]


# Settings left out of the cache key at their default (the value given here).
_OPTIONAL_KEYS: dict[str, Any] = {
    "spacing": None,
    "orientation": None,
    "labels": None,
    "allow_blank_modality": False,
}

#: The config key that accepts blank modalities (named in :class:`BlankModality`'s message).
ALLOW_BLANK_KEY = "data.allow_blank_modality"


class BlankModality(DataError):
    """A modality with no signal in a subject: all zero, or constant within the brain mask.

    Attributes:
        path: The modality's file.
        detail: What was found (``"all zero"``, ``"constant 7 within the brain mask …"``).
    """

    def __init__(self, path: Path, detail: str, subject: str = "", option: str = ALLOW_BLANK_KEY) -> None:
        self.path, self.detail, self.subject = Path(path), detail, subject
        of = f" (subject {subject})" if subject else ""
        super().__init__(
            f"{path}{of}: this modality is blank ({detail}); expected an image with signal, and a blank "
            f"sequence is most often a conversion error. If the dataset zero-fills missing sequences, "
            f"set {option}=true to accept it"
        )

    def with_option(self, option: str) -> BlankModality:
        """The same error, naming ``option`` as the key that accepts it (e.g. in ``tmerge predict``)."""
        return BlankModality(self.path, self.detail, self.subject, option)


def check_modalities(volumes: Mapping[Path, np.ndarray], subject: str = "") -> None:
    """Refuse a modality that carries no signal: all zero, or one constant value on the brain
    (voxels where any modality is non-zero). A subject that is all zero is not checked here.

    Args:
        volumes: file → its ``(X, Y, Z)`` intensities, every modality of one subject on one grid.
        subject: Subject id for the message.

    Raises:
        BlankModality: naming the first blank modality's file.
    """
    brain = np.any(np.stack(list(volumes.values())) != 0, axis=0)
    if not brain.any():
        return
    for path, volume in volumes.items():
        inside = volume[brain]
        low, high = inside.min(), inside.max()
        if low != high:
            continue
        if not volume.any():
            detail = "all zero"
        else:
            detail = f"constant {float(low):g} within the brain mask, the voxels where any modality is non-zero"
        raise BlankModality(Path(path), detail, subject)


@dataclass
class Preprocessed:
    """One preprocessed subject.

    Attributes:
        image: ``(C, D, H, W)`` float32, one channel per modality, 0 outside the brain.
        label: ``(D, H, W)`` uint8 on the same grid (HCP: paper classes 0..14; BraTS: 0/1/2/4),
            or ``None`` for unlabelled subjects.
        meta: JSON-serialisable geometry needed by :func:`~tmerge.data.geometry.uncrop`
            (``original_shape``, ``affine``, ``crop_start``, ``crop_end``, ``pad_before``,
            ``shape``) plus ``subject``, ``kind`` and ``modalities``.
    """

    image: np.ndarray
    label: np.ndarray | None
    meta: dict[str, Any] = field(default_factory=dict)


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def n4_correct(
    volume: np.ndarray,
    mask: np.ndarray,
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0),
    shrink: int = 4,
    iterations: tuple[int, ...] = (20, 10),
) -> np.ndarray:
    """N4 bias-field correction of one modality inside a mask.

    Args:
        volume: ``(X, Y, Z)`` intensities, positive inside the mask.
        mask: ``(X, Y, Z)`` bool brain mask; the field is fitted and applied only there.
        spacing: Voxel sizes in mm (N4's B-spline mesh lives in physical space).
        shrink: The field is fitted on a ``shrink``× downsampled copy, then evaluated at full
            resolution.
        iterations: Maximum iterations per fitting level (one level per entry).

    Returns:
        ``(X, Y, Z)`` float32 corrected volume, 0 outside the mask.
    """
    import SimpleITK as sitk

    # N4 works on log intensities: voxels at 0 inside the brain would poison the fit.
    fit_mask = mask & (volume > 0)
    if fit_mask.sum() < 64:
        return np.where(mask, volume, 0).astype(np.float32)
    # SimpleITK arrays are (z, y, x); reversing the spacing keeps each axis paired with its size.
    image = sitk.GetImageFromArray(volume.astype(np.float32))
    image.SetSpacing(tuple(reversed(spacing)))
    mask_img = sitk.GetImageFromArray(fit_mask.astype(np.uint8))
    mask_img.CopyInformation(image)
    # Never shrink below 16 voxels per axis: the B-spline fit needs a few voxels per mesh span.
    shrink = max(1, min(shrink, min(volume.shape) // 16))
    factors = [shrink] * 3
    corrector = sitk.N4BiasFieldCorrectionImageFilter()
    corrector.SetMaximumNumberOfIterations(list(iterations))
    corrector.Execute(sitk.Shrink(image, factors), sitk.Shrink(mask_img, factors))
    # Evaluate the smooth field on the full-resolution grid, so shrinking costs no detail.
    log_bias = sitk.GetArrayFromImage(corrector.GetLogBiasFieldAsImage(image))
    corrected = volume / np.exp(log_bias)
    return np.where(mask, corrected, 0).astype(np.float32)


def histogram_normalise(volume: np.ndarray, mask: np.ndarray, bins: int = 256) -> np.ndarray:
    """Histogram-equalise one modality on the brain's intensities (MONAI ``HistogramNormalize``).

    Args:
        volume: ``(X, Y, Z)`` intensities.
        mask: ``(X, Y, Z)`` bool brain mask; only these voxels define the histogram.
        bins: Number of histogram bins.

    Returns:
        ``(X, Y, Z)`` float32 in [0, 1], roughly uniform inside the mask, 0 outside.
    """
    from monai.transforms import HistogramNormalize

    normalise = HistogramNormalize(num_bins=bins, min=0, max=1, mask=mask[None])
    out = np.asarray(normalise(volume[None]))[0]
    # Zero the background explicitly so it is the same constant whatever the interpolation gives.
    return np.where(mask, out, 0).astype(np.float32)



def original_labels(grid_labels: np.ndarray, meta: Mapping[str, Any]) -> np.ndarray:
    """A label map on the preprocessed grid → the subject's label map in its files' geometry.

    Without resampling this is :func:`~tmerge.data.geometry.uncrop` (the crop keeps every labelled
    voxel, so it is exact). A resampled subject's true labels are read again from its label file
    (``meta["label_file"]``) in the internal labels — resampling them twice would not be exact —
    and, for a parcellation, renumbered to the selected classes ``meta["classes"]``
    (:func:`tmerge.data.labels.select_labels`); without that file or selection, ``uncrop``.
    """
    from tmerge.data.labels import select_labels

    path = meta.get("label_file")
    parcellation = meta.get("kind") == "hcp"
    if "grid_affine" not in meta or not path or (parcellation and meta.get("classes") is None):
        return uncrop(grid_labels, meta)
    raw, _ = load_labels(path)
    mapping = LabelMapping.from_meta(meta["labels"]) if meta.get("labels") else None
    internal = _dataset_labels(raw, Path(path), meta["kind"], mapping)
    if parcellation:
        classes = mapping.values[1:] if mapping is not None else None
        internal = select_labels(internal, list(meta["classes"]), classes)
    return internal.astype(np.asarray(grid_labels).dtype)


def _dataset_labels(
    raw: np.ndarray, path: Path, kind: Kind, labels: LabelMapping | None = None
) -> np.ndarray:
    """Check a raw label map and bring it to the cached form (uint8): through the dataset's
    mapping where it has one, else BraTS labels as they are, FreeSurfer aseg values mapped to the
    paper's classes."""
    if labels is not None:
        return labels.to_internal(raw, path)
    if kind == "brats":
        check_brats_labels(raw, path)
        return raw.astype(np.uint8)
    check_aseg_labels(raw, path)
    return aseg_to_paper(raw)


def preprocess_subject(
    files: Mapping[str, Path],
    label_file: Path | None,
    kind: Kind,
    settings: PreprocessSettings,
    subject: str = "",
) -> Preprocessed:
    """Preprocess one subject (no caching; see :func:`tmerge.data.cache.preprocess_cached`).

    Args:
        files: ``modality name -> NIfTI path``, in channel order.
        label_file: HCP ``aparc+aseg`` or BraTS ``_seg`` file, or ``None`` if unlabelled.
        kind: ``"hcp"`` (labels mapped to the paper's 14 classes) or ``"brats"`` (labels
            checked to be 0/1/2/4), unless ``settings.labels`` gives the dataset's mapping.
        settings: Preprocessing settings.
        subject: Subject id for messages and ``meta``.

    Returns:
        The preprocessed subject; see :class:`Preprocessed` for layouts.

    Raises:
        DataError: a file is missing/unreadable/not finite, geometries differ, a label value is
            invalid, or the images are all zero.
        BlankModality: a modality is all zero or constant within the brain (a :class:`DataError`),
            unless ``settings.allow_blank_modality``.
    """
    volumes: list[np.ndarray] = []
    geometry: dict[str, tuple[tuple[int, ...], np.ndarray]] = {}
    affine = np.eye(4)
    for path in files.values():
        data, affine = load_volume(path)
        volumes.append(data)
        geometry[Path(path).name] = (data.shape, affine)
    label = None
    if label_file is not None:
        raw, label_affine = load_labels(label_file)
        geometry[Path(label_file).name] = (raw.shape, label_affine)
        label = _dataset_labels(raw, label_file, kind, settings.labels)
    check_same_geometry(geometry, subject)
    if not settings.allow_blank_modality:  # on the files' own grid, before any resampling
        check_modalities(dict(zip(map(Path, files.values()), volumes, strict=True)), subject)
    original_shape, original_affine = volumes[0].shape, affine
    grid: dict[str, Any] = {}
    if settings.resamples:
        stacked, label, affine = resample_case(
            np.stack(volumes), label, affine, settings.spacing, settings.orientation
        )
        volumes = list(stacked)
        grid = {"grid_shape": [int(n) for n in stacked.shape[1:]], "grid_affine": affine.tolist()}
        if label_file is not None:
            grid["label_file"] = str(label_file)

    brain = np.any(np.stack(volumes) != 0, axis=0)
    if not brain.any():
        names = ", ".join(Path(p).name for p in files.values())
        raise DataError(f"subject {subject}: {names} are all zero; expected skull-stripped brain images")
    spacing = voxel_spacing(affine)
    channels = []
    for volume in volumes:
        if settings.n4:
            volume = n4_correct(volume, brain, spacing, settings.n4_shrink, settings.n4_iterations)
        channels.append(histogram_normalise(volume, brain, settings.histogram_bins))

    # Keep labelled voxels even if they lie outside the non-zero image region.
    foreground = brain if label is None else brain | (label > 0)
    box = crop_box(foreground, settings.multiple, settings.min_size)
    image = apply_box(np.stack(channels), box).astype(np.float32)
    if label is not None:
        label = apply_box(label[None], box)[0].astype(np.uint8)
    meta = {
        "subject": subject,
        "kind": kind,
        "modalities": list(files),
        "original_shape": [int(n) for n in original_shape],
        "affine": original_affine.tolist(),
        **box,
        **grid,
    }
    if settings.labels is not None:
        meta["labels"] = settings.labels.as_meta()
    return Preprocessed(image=image, label=label, meta=meta)
