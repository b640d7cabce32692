"""The base of the HCP and target DataModules, and the config fields they share.

A dataset kind (``hcp.py``, ``target.py``) only says how subjects are split and how a label map
becomes a training target; where a dataset's files are and what its labels mean is its root's
format (:mod:`tmerge.data.formats`, detected from the root); everything else (default data,
geometry, caching, in-memory volumes, patch sampling, loaders, the split record) lives here once,
over the datasets of :mod:`tmerge.data.datasets`. A little over 400 lines: the base class's
Lightning lifecycle is one piece.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from tmerge.data.cache import is_cached, preprocess_cached
from tmerge.data.datasets import (
    CentreCropDataset,
    PatchDataset,
    Subject,
    VolumeDataset,
    collate_volumes,
    loader_kwargs,
)
from tmerge.data.formats import case_files, detect, expected_layouts, open_default
from tmerge.data.layout import Discovery, Layout
from tmerge.data.preprocess import Kind, PreprocessSettings
from tmerge.data.splits import save_splits
from tmerge.errors import ConfigError, DataError
from tmerge.paths import default_cache, default_dataset
from tmerge.runs import SPLITS_FILE

log = logging.getLogger(__name__)


@dataclass
class DataConfig:
    """Fields shared by every dataset's config (see :class:`HCPDataConfig`, :class:`TargetDataConfig`)."""

    # None: the embedded default data, generated on first use under <data_dir>/default/<kind>,
    # so the framework runs out of the box; set it to a real dataset's folder otherwise.
    root: str | None = None
    # Grid of the generated default data: 64³ (3 mm) trains in minutes on a CPU.
    generate_size: int = 64
    # Fixes the splits; the same seed gives the same subjects to every initialisation method.
    seed: int = 0
    # Edge of the cubic training patch: a multiple of the network's divisor (net.divisor, 16 for
    # the default network; checked where the run's config is composed). 48 = 3 × 16 covers most
    # of a 64³ brain while keeping a batch small.
    patch_size: int = 48
    # Two patches per step: instance norm does not need large batches, memory does.
    batch_size: int = 2
    # Patches drawn per training subject per epoch, so tiny portions still make an epoch.
    samples_per_volume: int = 4
    # 0: volumes are in memory and patching is cheap; raise it for real-size data.
    num_workers: int = 0
    # None: <data_dir>/cache, outside the dataset root, which may be read-only.
    cache_dir: str | None = None
    # Random flips and intensity scale/shift on training patches.
    augment: bool = True
    # Array axes flipped at random when augmenting; axis 0 is left-right in HCP and BraTS files
    # (RAS/LAS/LPS), the one flip that keeps a brain anatomically plausible.
    flip_axes: list[int] = dataclasses.field(default_factory=lambda: [0, 1, 2])
    # N4 bias-field correction; each dataset sets the paper's choice (BraTS only, §4.2).
    n4: bool = False
    # Voxel size in mm per array axis that every case is resampled to (images linearly, labels
    # by nearest neighbour; predictions go back to each case's own grid), e.g. [1, 1, 1] for
    # data of mixed or anisotropic spacing. None: each case keeps its own grid.
    spacing: list[float] | None = None
    # Axis codes every case is reoriented to first, e.g. RAS. None: as the files store it.
    orientation: str | None = None
    # A modality that is all zero or constant within the brain (voxels where any modality is
    # non-zero) is refused, naming its file: it is almost always a conversion error. true: accept
    # it, for datasets that zero-fill missing sequences.
    allow_blank_modality: bool = False

    def __post_init__(self) -> None:
        for name in ("patch_size", "batch_size", "samples_per_volume", "generate_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: got {getattr(self, name)}; expected a positive integer")
        if any(axis not in (0, 1, 2) for axis in self.flip_axes):
            raise ConfigError(f"flip_axes: got {list(self.flip_axes)}; expected axes among 0, 1, 2")
        if self.num_workers < 0:
            raise ConfigError(f"num_workers: got {self.num_workers}; expected >= 0")
        if self.spacing is not None:
            spacing = list(self.spacing)
            if len(spacing) != 3 or not all(isinstance(v, (int, float)) and v > 0 for v in spacing):
                raise ConfigError(
                    f"spacing: got {spacing}; expected null or three positive voxel sizes in mm, e.g. [1, 1, 1]"
                )
        if self.orientation is not None:
            axis_of = {"L": 0, "R": 0, "A": 1, "P": 1, "S": 2, "I": 2}
            codes = str(self.orientation).upper()
            if len(codes) != 3 or sorted(axis_of.get(c, -1) for c in codes) != [0, 1, 2]:
                raise ConfigError(
                    f"orientation: got {self.orientation!r}; expected null or three axis codes, one of L/R, "
                    "A/P and S/I each, e.g. RAS"
                )

    @property
    def patch_sizes(self) -> tuple[int, int, int]:
        """The patch size per spatial axis ``(P, P, P)``."""
        return (self.patch_size,) * 3


def make_config(config_class: type[DataConfig], fields: Mapping[str, Any]) -> DataConfig:
    """Build ``config_class`` from keyword fields, rejecting unknown keys with a clear message."""
    known = {f.name for f in dataclasses.fields(config_class)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ConfigError(
            f"{config_class.__name__}: unknown key(s) {unknown}; expected some of {sorted(known)}"
        )
    return config_class(**fields)


class SegmentationDataModule(L.LightningDataModule):
    """Base of the dataset DataModules; subclasses fill in the dataset-specific hooks.

    Lifecycle (Lightning): ``__init__`` validates the config and does no I/O; ``prepare_data``
    (one process per node) generates the embedded default if needed and fills the preprocessing
    cache; ``setup`` (every rank) computes the seeded splits, writes the split record and loads the
    cached volumes into memory, so the training loop never touches disk.

    Attributes:
        in_channels: Number of input modalities ``C``.
        n_outputs: Network output channels.
        output_mode: ``"softmax"`` (class indices, background included) or ``"sigmoid"`` (regions).
        class_names: Names of the foreground classes / regions.
        subjects: After setup, ``{"train", "val", "test", "predict"}`` subject id lists.
        splits: After setup, the full split dictionary (what the split record holds).
        divisor: The preprocessed volumes are zero-padded to multiples of it: the network's
            (:attr:`tmerge.nets.config.NetConfig.divisor`), which every stage passes; 1 where
            no network is involved.
    """

    kind: ClassVar[Kind]
    modalities: ClassVar[tuple[str, ...]]
    config_class: ClassVar[type[DataConfig]]
    label_dtype: ClassVar[torch.dtype]
    output_mode: str
    n_outputs: int
    class_names: list[str]

    def __init__(self, run_dir: str | None = None, divisor: int = 1, **fields: Any) -> None:
        super().__init__()
        self.config = make_config(self.config_class, fields)
        self.run_dir = run_dir
        if isinstance(divisor, bool) or not isinstance(divisor, int) or divisor < 1:
            raise ValueError(f"divisor: expected a positive integer (the network's), got {divisor!r}")
        self.divisor = divisor
        self.in_channels = len(self.modalities)
        self.save_hyperparameters({**dataclasses.asdict(self.config), "run_dir": run_dir})
        self.splits: dict[str, Any] | None = None
        self.subjects: dict[str, list[str]] = {}
        self._discovery: Discovery | None = None
        self._layout: Layout | None = None
        self._loaded: dict[str, Subject] = {}

    @classmethod
    def from_config(
        cls, config: DataConfig, run_dir: str | None = None, divisor: int = 1
    ) -> SegmentationDataModule:
        """Build the module from its config dataclass (``divisor``: the network's)."""
        return cls(run_dir=run_dir, divisor=divisor, **dataclasses.asdict(config))

    # ---- dataset-specific hooks -------------------------------------------------------------

    def discover(self, root: Path) -> Discovery:
        """List the subjects under ``root`` in its detected format (folder listings only).

        Raises:
            DataError: ``root`` has no layout of this kind, or a malformed one.
        """
        root = Path(root)
        if self._layout is not None and root == self._layout.root:
            return self._layout.discover()
        return detect(root, self.kind).discover()

    def subject_files(self, handle: Any, labelled: bool) -> tuple[dict[str, Path], Path | None]:
        """``(modality -> file in channel order, label file or None)`` of one subject: a handle
        of :meth:`discover` or a case folder (:func:`tmerge.data.formats.case_files`)."""
        return case_files(handle, labelled, self.kind)

    def make_splits(self, discovery: Discovery, source: str) -> tuple[dict[str, Any], dict[str, list[str]]]:
        """``(full splits to record, {"train", "val", "test", "predict"} of this experiment)``."""
        raise NotImplementedError

    def to_target(self, label: np.ndarray) -> np.ndarray:
        """Preprocessed label map ``(D, H, W)`` → training target ``(L, D, H, W)`` uint8."""
        raise NotImplementedError

    def layout_hint(self) -> str:
        """One line describing the expected folder layout (the root's format's, or every layout
        this kind accepts while the root is not opened), for error messages."""
        if self._layout is not None:
            return self._layout.format.hint
        return expected_layouts(self.kind)

    def preprocess_settings(self) -> PreprocessSettings:
        """Settings of the cached preprocessing: volumes at least one patch wide and padded to
        multiples of the network's divisor, the geometry of the config, and the label mapping of the root's format (none where the root is not
        there to tell it, e.g. a run's data predicted on another machine)."""
        c = self.config
        labels = None
        if self._layout is not None or c.root is None or self.root.is_dir():
            labels = self.layout.labels
        return PreprocessSettings(
            n4=c.n4,
            multiple=self.divisor,
            min_size=max(c.patch_sizes),
            spacing=None if c.spacing is None else tuple(float(v) for v in c.spacing),  # type: ignore[arg-type]
            orientation=None if c.orientation is None else str(c.orientation).upper(),
            labels=labels,
            allow_blank_modality=bool(c.allow_blank_modality),
        )

    def subject_meta(self, meta: dict[str, Any]) -> dict[str, Any]:
        """A loaded subject's ``meta`` as the module sees it (hook; the cached meta as is)."""
        return meta

    # ---- paths ------------------------------------------------------------------------------

    @property
    def root(self) -> Path:
        """The dataset root (the embedded default's folder if ``root`` is None)."""
        if self.config.root is None:
            return default_dataset(self.kind)
        return Path(self.config.root).expanduser()

    @property
    def layout(self) -> Layout:
        """The root opened in its format (:mod:`tmerge.data.formats`), detected once; the
        embedded default's is known without looking.

        Raises:
            DataError: the root does not exist, has no layout of this kind or a malformed one.
        """
        if self._layout is None:
            if self.config.root is None:
                self._layout = open_default(self.root, self.kind)
            elif not self.root.is_dir():
                raise DataError(f"{self.root}: dataset folder not found; expected {self.layout_hint()}")
            else:
                self._layout = detect(self.root, self.kind)
        return self._layout

    @property
    def cache_dir(self) -> Path:
        """The preprocessing cache folder."""
        return Path(self.config.cache_dir).expanduser() if self.config.cache_dir else default_cache()

    # ---- Lightning hooks --------------------------------------------------------------------

    def prepare_data(self) -> None:
        """Generate the default data if needed, then preprocess and cache every needed subject."""
        if self.config.root is None:
            self._ensure_default()
        self._resolve_splits()
        needed = dict.fromkeys(s for part in ("train", "val", "test", "predict") for s in self.subjects[part])
        stale = [s for s in needed if not is_cached(*self._cache_args(s))]
        if stale:
            log.info(
                "%s: preprocessing %d of %d subjects into %s (once)",
                self.kind,
                len(stale),
                len(needed),
                self.cache_dir,
            )
        start = time.perf_counter()
        for i, subject in enumerate(stale, start=1):
            preprocess_cached(*self._cache_args(subject))
            if i % 25 == 0 or i == len(stale):
                log.info("%s: preprocessed %d/%d (%.0f s)", self.kind, i, len(stale), time.perf_counter() - start)

    def setup(self, stage: str | None = None) -> None:
        """Compute the splits, write their record (rank 0) and load the stage's volumes."""
        self._resolve_splits()
        if self.run_dir is not None and (self.trainer is None or self.trainer.is_global_zero):
            save_splits(Path(self.run_dir) / SPLITS_FILE, self._split_record())
        parts = {
            "fit": ("train", "val"),
            "validate": ("val",),
            "test": ("test",),
            "predict": (self._predict_part(),),
        }.get(stage or "", ("train", "val", "test"))
        for part in parts:
            self.loaded_subjects(part)

    def train_dataloader(self) -> DataLoader:
        """Random patches, shuffled, ``batch_size`` per batch."""
        dataset = PatchDataset(
            self.loaded_subjects("train"),
            self.config.patch_sizes,
            self.config.samples_per_volume,
            self.label_dtype,
            augment=self.config.augment,
            flip_axes=self.config.flip_axes,
        )
        return DataLoader(
            dataset, batch_size=self.config.batch_size, shuffle=True, drop_last=False, **self._loader_kwargs()
        )

    def val_dataloader(self) -> DataLoader:
        """Whole validation volumes, one per batch."""
        return self._volume_loader("val")

    def test_dataloader(self) -> DataLoader:
        """Whole test volumes, one per batch."""
        return self._volume_loader("test")

    def predict_dataloader(self) -> DataLoader:
        """Whole volumes to predict (without labels): the unlabelled set where the split has one,
        else the test subjects."""
        return self._volume_loader(self._predict_part(), with_labels=False)

    def fisher_dataset(self) -> Dataset:
        """The training subjects as deterministic centre crops of patch size (un-batched items)."""
        return CentreCropDataset(self.loaded_subjects("train"), self.config.patch_sizes, self.label_dtype)

    def check_layout(self) -> None:
        """Fail early, listing folders only, if a user-given ``root`` lacks the expected layout or
        the subjects the splits need (the embedded default is generated by ``prepare_data``).

        Raises:
            DataError: naming the folder and the expected layout, or the missing counts.
        """
        if self.config.root is not None:
            self._resolve_splits()

    def meta(self, subject: str) -> dict[str, Any]:
        """Geometry of a loaded subject, for :func:`tmerge.data.geometry.uncrop`."""
        return self._loaded[subject].meta

    # ---- internals --------------------------------------------------------------------------

    def _predict_part(self) -> str:
        return "predict" if self._resolve_splits()["predict"] else "test"

    def _loader_kwargs(self) -> dict[str, Any]:
        trainer = getattr(self, "trainer", None)
        cuda = trainer is not None and trainer.strategy.root_device.type == "cuda"
        return loader_kwargs(self.config.num_workers, cuda=cuda)

    def _volume_loader(self, part: str, with_labels: bool = True) -> DataLoader:
        subjects = self.loaded_subjects(part)
        if not with_labels:
            subjects = [dataclasses.replace(s, target=None) for s in subjects]
        dataset = VolumeDataset(subjects, self.label_dtype)
        return DataLoader(
            dataset, batch_size=1, shuffle=False, collate_fn=collate_volumes, **self._loader_kwargs()
        )

    def _ensure_default(self) -> None:
        """Generate the embedded default data; the generator only writes what is missing, so a
        complete copy costs a few file checks and an interrupted one is resumed."""
        from tmerge.data.synthetic.generate import generate_default

        generate_default(self.root.parent, kinds=(self.kind,), size=self.config.generate_size)
        self._discovery = None  # re-list the subjects the generator may have added

    def _resolve_splits(self) -> dict[str, list[str]]:
        """Discover subjects and compute the splits once (pure: identical on every rank)."""
        if self._discovery is None:
            if not self.root.is_dir():
                hint = (
                    " (the default data is generated by prepare_data())" if self.config.root is None else ""
                )
                raise DataError(f"{self.root}: dataset folder not found{hint}; expected {self.layout_hint()}")
            discovery = self.layout.discover()
            self.splits, self.subjects = self.make_splits(discovery, str(self.root))
            self._discovery = discovery
        return self.subjects

    def _split_record(self) -> dict[str, Any]:
        record = {"kind": self.kind, "root": str(self.root), **self.layout.record}
        return {**record, **self.subjects, "splits": self.splits}

    def _cache_args(self, subject: str) -> tuple[Any, ...]:
        """Arguments of :func:`preprocess_cached` / :func:`is_cached` for one subject."""
        assert self._discovery is not None
        labelled = subject in self._discovery.labelled
        folder = self._discovery.labelled[subject] if labelled else self._discovery.unlabelled[subject]
        files, label_file = self.subject_files(folder, labelled)  # a case folder or an IndexedCase
        source = str(self.root.resolve())
        return subject, files, label_file, self.kind, self.preprocess_settings(), self.cache_dir, source

    def loaded_subjects(self, part: str) -> list[Subject]:
        """The subjects of one split part (``"train"``, ``"val"``, ``"test"``, …) in memory, on the
        preprocessed grid (image ``(C, D, H, W)``, target, meta), loading (or preprocessing)
        missing ones: for code that works on whole subjects outside a DataLoader (the shallow
        baseline)."""
        names = self._resolve_splits()[part]
        if not names:
            raise DataError(f"{self.root}: the {part!r} set of this split is empty")
        for name in names:
            if name not in self._loaded:
                result = preprocess_cached(*self._cache_args(name))
                target = None if result.label is None else self.to_target(result.label)
                self._loaded[name] = Subject(name, result.image, target, self.subject_meta(result.meta))
        return [self._loaded[n] for n in names]
