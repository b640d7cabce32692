"""The in-memory subjects and the torch datasets the DataModules load them through: random
training patches, whole volumes, centre crops for the Fisher; their collate and loader settings.

Batch formats (``B`` batch, ``C`` modalities, ``P`` patch size, ``L`` = 1 for class indices or 3
for BraTS regions):

* training: ``{"image": (B, C, P, P, P) float32, "label": (B, L, P, P, P)}``;
* validation / test: one whole preprocessed volume, ``{"image": (1, C, D, H, W), "label":
  (1, L, D, H, W), "subject": [id], "meta": [dict]}`` (``meta`` feeds
  :func:`tmerge.data.geometry.uncrop`);
* predict: as validation, without ``"label"``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

# Multiplier that spreads consecutive item indices over the seed space (Knuth's hash).
_INDEX_MIX = 2654435761


@dataclass
class Subject:
    """One subject held in memory after setup.

    Attributes:
        id: Subject id.
        image: ``(C, D, H, W)`` float32 preprocessed image.
        target: ``(L, D, H, W)`` uint8 training target (class indices or region masks), or
            ``None`` for unlabelled subjects.
        meta: Geometry for :func:`tmerge.data.geometry.uncrop`.
    """

    id: str
    image: np.ndarray
    target: np.ndarray | None
    meta: dict[str, Any]

    @functools.cached_property
    def fg_bg(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Flat indices of the target's foreground and background voxels (int32), computed once.

        Finding them is most of the cost of a patch, and they never change; computed in the
        main process, they are shared with forked loader workers instead of rebuilt in each.
        """
        from monai.transforms.utils import map_binary_to_indices

        if self.target is None:
            raise ValueError(f"subject {self.id} has no label")
        fg, bg = map_binary_to_indices(torch.from_numpy(self.target))
        # int32 halves the memory; a volume has far fewer than 2^31 voxels.
        return torch.as_tensor(fg).to(torch.int32), torch.as_tensor(bg).to(torch.int32)


def _to_tensor(x: Any, dtype: torch.dtype) -> torch.Tensor:
    """MONAI outputs (MetaTensor, tensor or array) → a plain tensor of ``dtype``."""
    if hasattr(x, "as_tensor"):
        x = x.as_tensor()
    return torch.as_tensor(x).to(dtype)


def train_transform(
    patch: Sequence[int], augment: bool, flip_axes: Sequence[int] = (0, 1, 2)
) -> Callable[[dict[str, Any]], Any]:
    """MONAI pipeline: a patch centred on foreground or background with equal odds, then light
    augmentation.

    Half the patches centre on labelled voxels so small structures (tumours) are seen often;
    for multi-channel region targets MONAI takes the union of channels 1.. (TC ∪ WT = WT).
    """
    from monai.transforms import (
        Compose,
        RandCropByPosNegLabeld,
        RandFlipd,
        RandScaleIntensityd,
        RandShiftIntensityd,
    )

    keys = ["image", "label"]
    crop = RandCropByPosNegLabeld(
        keys,
        label_key="label",
        spatial_size=list(patch),
        pos=1,
        neg=1,
        fg_indices_key="fg",
        bg_indices_key="bg",
    )
    steps: list[Any] = [crop]
    if augment:
        # Flips are label-safe (the paper's classes and the tumour regions are not lateralised).
        steps += [RandFlipd(keys, prob=0.5, spatial_axis=axis) for axis in flip_axes]
        steps += [
            RandScaleIntensityd("image", factors=0.1, prob=0.5),
            RandShiftIntensityd("image", offsets=0.1, prob=0.5),
        ]
    return Compose(steps)


class PatchDataset(Dataset):
    """Random training patches: ``samples_per_volume`` items per subject, drawn afresh each time.

    Each item seeds its transforms from torch's RNG (seeded per worker by the DataLoader and by
    ``seed_everything``) mixed with the index, so workers do not repeat each other's patches.

    Items: ``{"image": (C, P, P, P) float32, "label": (L, P, P, P) label_dtype, "subject": id}``.
    """

    def __init__(
        self,
        subjects: Sequence[Subject],
        patch: Sequence[int],
        samples_per_volume: int,
        label_dtype: torch.dtype,
        augment: bool = True,
        flip_axes: Sequence[int] = (0, 1, 2),
    ) -> None:
        self.subjects = list(subjects)
        self.samples_per_volume = samples_per_volume
        self.label_dtype = label_dtype
        self.transform = train_transform(patch, augment, flip_axes)
        # Compute the voxel indices now, in the main process, so forked workers share them.
        for subject in self.subjects:
            _ = subject.fg_bg

    def __len__(self) -> int:
        return len(self.subjects) * self.samples_per_volume

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        subject = self.subjects[index // self.samples_per_volume]
        fg, bg = subject.fg_bg
        seed = (int(torch.randint(0, 2**31, ())) + index * _INDEX_MIX) % 2**32
        self.transform.set_random_state(seed=seed)
        data = {
            "image": torch.from_numpy(subject.image),
            "label": torch.from_numpy(subject.target),
            "fg": fg,
            "bg": bg,
        }
        out = self.transform(data)
        # RandCropByPosNegLabeld returns a list of num_samples (= 1) dicts.
        out = out[0] if isinstance(out, list) else out
        return {
            "image": _to_tensor(out["image"], torch.float32),
            "label": _to_tensor(out["label"], self.label_dtype),
            "subject": subject.id,  # named by the non-finite-loss guard
        }


class VolumeDataset(Dataset):
    """Whole preprocessed volumes for validation, test and prediction (no augmentation).

    Items: ``{"image": (C, D, H, W) float32, "label": (L, D, H, W), "subject": id, "meta": dict}``
    (``"label"`` only for labelled subjects).
    """

    def __init__(self, subjects: Sequence[Subject], label_dtype: torch.dtype) -> None:
        self.subjects = list(subjects)
        self.label_dtype = label_dtype

    def __len__(self) -> int:
        return len(self.subjects)

    def __getitem__(self, index: int) -> dict[str, Any]:
        s = self.subjects[index]
        item: dict[str, Any] = {"image": torch.from_numpy(s.image), "subject": s.id, "meta": s.meta}
        if s.target is not None:
            item["label"] = torch.from_numpy(s.target).to(self.label_dtype)
        return item


class CentreCropDataset(Dataset):
    """Deterministic centre crops of patch size, for the Fisher information (no augmentation).

    The Fisher must see inputs of the training size; the volumes are cropped to the brain, so
    the centre crop covers the middle of the brain.

    Items: ``{"image": (C, P, P, P) float32, "label": (L, P, P, P)}``.
    """

    def __init__(self, subjects: Sequence[Subject], patch: Sequence[int], label_dtype: torch.dtype) -> None:
        from monai.transforms import CenterSpatialCropd

        self.subjects = list(subjects)
        self.label_dtype = label_dtype
        self.crop = CenterSpatialCropd(["image", "label"], roi_size=list(patch))

    def __len__(self) -> int:
        return len(self.subjects)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        s = self.subjects[index]
        out = self.crop({"image": torch.from_numpy(s.image), "label": torch.from_numpy(s.target)})
        return {
            "image": _to_tensor(out["image"], torch.float32),
            "label": _to_tensor(out["label"], self.label_dtype),
        }


def collate_volumes(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stack images/labels; keep ``subject`` and ``meta`` as lists (default collate would mangle meta)."""
    batch: dict[str, Any] = {
        "image": torch.stack([i["image"] for i in items]),
        "subject": [i["subject"] for i in items],
        "meta": [i["meta"] for i in items],
    }
    if all("label" in i for i in items):
        batch["label"] = torch.stack([i["label"] for i in items])
    return batch


def loader_kwargs(num_workers: int, *, cuda: bool) -> dict[str, Any]:
    """``DataLoader`` settings that keep an accelerator fed.

    Args:
        num_workers: Loader worker processes (0: load in the main process).
        cuda: Whether the batches go to a CUDA device.

    Pinned (page-locked) host memory lets the copy to the GPU run asynchronously, overlapped
    with the step; on a CPU-only run it would only cost. Persistent workers keep their forked
    copy of the in-memory volumes between epochs instead of being started again for each.
    """
    return {"num_workers": num_workers, "persistent_workers": num_workers > 0, "pin_memory": cuda}
