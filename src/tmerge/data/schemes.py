"""Label schemes: what a target network predicts (softmax classes or sigmoid regions) and how
label maps become masks, training targets and back (:class:`LabelScheme`), with the BraTS
regions' scheme (:data:`BRATS_SCHEME`).

All functions here are pure and work on arrays of any spatial shape.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from tmerge.data.labels import REGIONS, values_text


@dataclass(frozen=True)
class LabelScheme:
    """What a target network predicts and how label maps become masks, targets and back.

    Two output conventions (:data:`tmerge.metrics.OUTPUT_MODES`):

    * ``"softmax"`` — plain classes: internal labels are class indices 0..K (0 background),
      one softmax channel per index; class k is scored on ``labels == k``;
    * ``"sigmoid"`` — regions: each region is a set of internal label values (e.g. BraTS' TC =
      {1, 4}), one sigmoid channel per region; a region is scored on ``isin(labels, region)``.
      Predicted region masks become a label map by painting each region's ``paint`` value, the
      largest region first, so the innermost wins (nnU-Net's order for nested regions and,
      for BraTS, exactly :func:`~tmerge.data.labels.regions_to_brats`).

    Attributes:
        mode: ``"softmax"`` or ``"sigmoid"``.
        classes: Names of the scored classes / regions, in output-channel order.
        values: The internal label values of each class / region (softmax: ``((1,), (2,), …)``).
        paint: Sigmoid: the internal value written where each region is predicted.
        names: Internal label value → name, for the values a label map may hold (background
            excluded): exported JSON, dashboard overlays.
    """

    mode: str
    classes: tuple[str, ...]
    values: tuple[tuple[int, ...], ...]
    paint: tuple[int, ...] = ()
    names: tuple[tuple[int, str], ...] = ()

    def __post_init__(self) -> None:
        if self.mode not in ("softmax", "sigmoid"):
            raise ValueError(f"label scheme: mode must be softmax or sigmoid, got {self.mode!r}")
        if not self.classes or len(self.values) != len(self.classes):
            raise ValueError(
                f"label scheme: {len(self.classes)} class names for {len(self.values)} value sets"
            )
        if self.mode == "softmax" and self.values != tuple((k,) for k in range(1, len(self.classes) + 1)):
            raise ValueError(f"label scheme: softmax classes are the indices 1..K, got {self.values}")
        if self.mode == "sigmoid" and len(self.paint) != len(self.classes):
            raise ValueError(f"label scheme: {len(self.paint)} paint values for {len(self.classes)} regions")

    @classmethod
    def plain(cls, classes: Sequence[str]) -> LabelScheme:
        """Softmax over plain classes named ``classes`` (indices 1..K)."""
        names = tuple(str(c) for c in classes)
        return cls("softmax", names, tuple((k,) for k in range(1, len(names) + 1)),
                   names=tuple(enumerate(names, start=1)))

    @classmethod
    def of(cls, mode: str, classes: Sequence[str]) -> LabelScheme:
        """The built-in scheme of an output mode: softmax classes, or the BraTS regions."""
        if mode == "sigmoid":
            if tuple(classes) != REGIONS:
                raise ValueError(f"sigmoid outputs are the BraTS regions {REGIONS}, got classes {list(classes)}")
            return BRATS_SCHEME
        return cls.plain(classes)

    @property
    def n_outputs(self) -> int:
        """Network output channels: K + 1 (softmax, background included) or one per region."""
        return len(self.classes) + (1 if self.mode == "softmax" else 0)

    def masks(self, labels: np.ndarray) -> np.ndarray:
        """Label map ``(...)`` → ``(K, ...)`` bool masks of the scored classes / regions."""
        labels = np.asarray(labels)
        if self.mode == "softmax":
            return np.stack([labels == k for k in range(1, len(self.classes) + 1)])
        return np.stack([np.isin(labels, v) for v in self.values])

    def to_target(self, labels: np.ndarray) -> np.ndarray:
        """Internal label map ``(D, H, W)`` → training target ``(L, D, H, W)`` uint8: the class
        indices (``L = 1``) or the region masks (``L = K``)."""
        labels = np.asarray(labels)
        if self.mode == "softmax":
            return labels[None].astype(np.uint8)
        return self.masks(labels).astype(np.uint8)

    def label_map(self, hard: np.ndarray) -> np.ndarray:
        """Hard prediction ``(C, ...)`` (one-hot for softmax, region masks for sigmoid) → label
        map ``(...)`` uint8."""
        hard = np.asarray(hard)
        if self.mode == "softmax":
            return np.argmax(hard, axis=0).astype(np.uint8)
        if hard.ndim < 1 or hard.shape[0] != len(self.classes):
            raise ValueError(f"expected {len(self.classes)} region masks (R, ...), got {hard.shape}")
        regions = hard > 0
        out = np.zeros(regions.shape[1:], dtype=np.uint8)
        # Largest region first (stable: listed order among equals), so inner regions overwrite.
        for k in sorted(range(len(self.classes)), key=lambda k: -len(self.values[k])):
            out[regions[k]] = self.paint[k]
        return out

    def target_label_map(self, target: np.ndarray) -> np.ndarray:
        """Training target ``(L, ...)`` → its label map ``(...)`` uint8."""
        target = np.asarray(target)
        if self.mode == "softmax":
            return target.reshape(target.shape[-3:]).astype(np.uint8)
        return self.label_map(target > 0.5)

    def label_names(self) -> dict[int, str]:
        """Label value → name for the values of a predicted label map (background included)."""
        return {0: "background", **dict(self.names)}

    def as_meta(self) -> dict[str, object]:
        """JSON form; :meth:`from_meta` reads it back."""
        return {
            "mode": self.mode,
            "classes": list(self.classes),
            "values": [list(v) for v in self.values],
            "paint": list(self.paint),
            "names": [[k, n] for k, n in self.names],
        }

    @classmethod
    def from_meta(cls, meta: Mapping[str, object]) -> LabelScheme:
        """The scheme written by :meth:`as_meta`."""
        return cls(
            str(meta["mode"]),
            tuple(str(c) for c in meta["classes"]),  # type: ignore[union-attr]
            tuple(tuple(int(v) for v in vs) for vs in meta["values"]),  # type: ignore[union-attr]
            tuple(int(v) for v in meta.get("paint", ())),  # type: ignore[union-attr]
            tuple((int(k), str(n)) for k, n in meta.get("names", ())),  # type: ignore[union-attr]
        )

    def describe(self) -> str:
        """One line: mode and classes, e.g. ``softmax over 2 classes: thalamus, caudate``."""
        if self.mode == "softmax":
            return f"softmax over {len(self.classes)} classes: {', '.join(self.classes)}"
        parts = [f"{c} = {{{values_text(v)}}}" for c, v in zip(self.classes, self.values, strict=True)]
        return f"sigmoid regions: {'; '.join(parts)}"


#: The BraTS tumour regions ET = {4}, TC = {1, 4}, WT = {1, 2, 4}, painted back as 0/1/2/4.
BRATS_SCHEME = LabelScheme(
    "sigmoid",
    REGIONS,
    ((4,), (1, 4), (1, 2, 4)),
    paint=(4, 1, 2),
    names=((1, "necrosis/non-enhancing"), (2, "oedema"), (4, "enhancing")),
)
