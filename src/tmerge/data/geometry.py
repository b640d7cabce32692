"""A case's voxel grid through preprocessing and back: the crop to the brain and the symmetric
padding to the network's multiple (:func:`crop_box`), undone by :func:`uncrop`; reorientation and
resampling (MONAI ``Orientation``, ``Spacing``, ``SpatialResample``; images linearly, labels by
nearest neighbour).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np


def voxel_spacing(affine: np.ndarray) -> tuple[float, float, float]:
    """Voxel sizes (mm) along the three array axes of a ``(4, 4)`` affine."""
    return tuple(float(s) for s in np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0)))


def crop_box(mask: np.ndarray, multiple: int, min_size: int) -> dict[str, list[int]]:
    """Bounding box of ``mask`` and the symmetric padding that makes it a multiple of ``multiple``.

    Args:
        mask: ``(X, Y, Z)`` bool foreground.
        multiple: Output sizes are rounded up to a multiple of this.
        min_size: Smallest output size per axis.

    Returns:
        ``crop_start``, ``crop_end`` (voxel box in the original grid, end exclusive),
        ``pad_before``, ``pad_after`` and the output ``shape``.
    """
    from monai.transforms.utils import generate_spatial_bounding_box

    start, end = generate_spatial_bounding_box(mask[None])
    start, end = [int(s) for s in start], [int(e) for e in end]
    size = [e - s for s, e in zip(start, end, strict=True)]
    shape = [-(-max(n, min_size) // multiple) * multiple for n in size]
    before = [(t - n) // 2 for t, n in zip(shape, size, strict=True)]
    after = [t - n - b for t, n, b in zip(shape, size, before, strict=True)]
    return {"crop_start": start, "crop_end": end, "pad_before": before, "pad_after": after, "shape": shape}


def apply_box(array: np.ndarray, box: Mapping[str, list[int]]) -> np.ndarray:
    """Crop ``(C, X, Y, Z)`` to ``box`` and zero-pad to ``box["shape"]`` (MONAI crop + pad)."""
    from monai.transforms import BorderPad, SpatialCrop

    cropped = SpatialCrop(roi_start=box["crop_start"], roi_end=box["crop_end"])(array)
    border = [n for pair in zip(box["pad_before"], box["pad_after"], strict=True) for n in pair]
    return np.asarray(BorderPad(spatial_border=border, mode="constant")(cropped))


def uncrop(pred: np.ndarray, meta: Mapping[str, Any]) -> np.ndarray:
    """Put an array on the preprocessed grid back into the subject's original geometry.

    Args:
        pred: ``(..., D, H, W)`` on the preprocessed grid (``meta["shape"]``), any leading axes.
        meta: The subject's ``Preprocessed.meta``.

    Returns:
        ``(..., X, Y, Z)`` array of ``meta["original_shape"]``, same dtype, 0 outside the crop box.
        A resampled subject (``meta["grid_affine"]``) is resampled back onto its files' grid:
        integer and boolean arrays by nearest neighbour, floating ones linearly.
    """
    pred = np.asarray(pred)
    if list(pred.shape[-3:]) != list(meta["shape"]):
        raise ValueError(f"expected an array ending in {tuple(meta['shape'])}, got {pred.shape}")
    grid_shape = meta.get("grid_shape", meta["original_shape"])
    out = np.zeros((*pred.shape[:-3], *grid_shape), dtype=pred.dtype)
    start, end, before = meta["crop_start"], meta["crop_end"], meta["pad_before"]
    src = tuple(slice(b, b + e - s) for s, e, b in zip(start, end, before, strict=True))
    dst = tuple(slice(s, e) for s, e in zip(start, end, strict=True))
    out[(..., *dst)] = pred[(..., *src)]
    if "grid_affine" in meta:
        out = resample_to(out, meta["grid_affine"], meta["affine"], meta["original_shape"])
    return out


def _meta_tensor(array: np.ndarray, affine: Any) -> Any:
    """A channel-first float32 MONAI MetaTensor ``(N, X, Y, Z)`` with its affine."""
    import torch
    from monai.data import MetaTensor

    return MetaTensor(
        torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32)),
        affine=torch.as_tensor(np.asarray(affine, dtype=np.float64)),
    )


def _nearest(array: np.ndarray) -> bool:
    return array.dtype == bool or np.issubdtype(array.dtype, np.integer)


def resample_to(array: np.ndarray, affine: Any, dst_affine: Any, dst_shape: Any) -> np.ndarray:
    """Resample ``(..., X, Y, Z)`` from the grid of ``affine`` onto that of ``dst_affine`` and
    ``dst_shape`` (MONAI ``SpatialResample``; 0 outside the source grid).

    Integer and boolean arrays are resampled by nearest neighbour and keep their dtype; others
    linearly, as float32 (then cast back to their dtype).
    """
    import torch
    from monai.transforms import SpatialResample

    array = np.asarray(array)
    lead = array.shape[:-3]
    flat = array.reshape(-1, *array.shape[-3:])
    mode = "nearest" if _nearest(array) else "bilinear"
    out = SpatialResample(mode=mode, padding_mode="zeros")(
        _meta_tensor(flat, affine),
        dst_affine=torch.as_tensor(np.asarray(dst_affine, dtype=np.float64)),
        spatial_size=tuple(int(n) for n in dst_shape),
    )
    out = np.asarray(out.detach().cpu().numpy() if hasattr(out, "detach") else out)
    if _nearest(array):
        out = np.rint(out)
    return out.astype(array.dtype).reshape(*lead, *out.shape[-3:])


def resample_case(
    image: np.ndarray,
    label: np.ndarray | None,
    affine: np.ndarray,
    spacing: tuple[float, float, float] | None,
    orientation: str | None,
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """Reorient (MONAI ``Orientation``) and resample (``Spacing``) one case.

    Args:
        image: ``(C, X, Y, Z)`` float32 modalities; resampled linearly.
        label: ``(X, Y, Z)`` uint8 internal labels or ``None``; resampled by nearest neighbour.
        affine: The files' ``(4, 4)`` affine.
        spacing: Target voxel size per axis in mm, or ``None``.
        orientation: Target axis codes (e.g. ``"RAS"``), or ``None``.

    Returns:
        ``(image, label, affine)`` on the new grid (``image`` float32, ``label`` uint8).
    """
    from monai.transforms import Orientation, Spacing

    def apply(array: np.ndarray, mode: str) -> Any:
        x = _meta_tensor(array, affine)
        if orientation is not None:
            x = Orientation(axcodes=orientation, labels=(("L", "R"), ("P", "A"), ("I", "S")))(x)
        if spacing is not None:
            x = Spacing(pixdim=tuple(spacing), mode=mode, padding_mode="zeros")(x)
        return x

    img = apply(image, "bilinear")
    new_affine = np.asarray(img.affine, dtype=np.float64)
    image = np.asarray(img.as_tensor().numpy(), dtype=np.float32)
    if label is not None:
        lab = apply(label[None], "nearest")
        if lab.shape[1:] != img.shape[1:] or not np.allclose(np.asarray(lab.affine), new_affine):
            raise ValueError("labels and images were resampled onto different grids")
        label = np.rint(lab.as_tensor().numpy()[0]).astype(np.uint8)
    return image, label, new_affine

