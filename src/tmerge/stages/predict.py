"""``tmerge predict run=<run folder> input=<case folder | file | dataset root> output=<folder>``.

Runs a finished run's network on new cases outside the run folder, the way the run itself
predicted its test subjects: the run's own preprocessing (its config's N4, normalisation and
crop), sliding-window inference with the run's window settings, optional mirroring test-time
augmentation (``tta=true``: the mean of the probabilities over all 8 flips of the three spatial
axes), and label maps in each case's original geometry (shape and affine of its input files),
named ``<case>.nii.gz`` in the dataset's label convention.

The weights come from the run's best checkpoint (loaded with ``weights_only=True``) or, for a
folder without one, its ``net`` weights. A case that cannot be read, or one with a blank
modality (all zero or constant within the brain; ``allow_blank_modality=true`` accepts it, by
default the run's ``data.allow_blank_modality``), is named in one line and skipped; the other
cases go on, and the command exits with status 2 at the end.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path
from typing import Any

import torch

from tmerge.config import compose
from tmerge.data.datasets import Subject, VolumeDataset, collate_volumes
from tmerge.data.nnunet import IndexedCase
from tmerge.data.preprocess import BlankModality, preprocess_subject
from tmerge.errors import ConfigError, DataError, RunError, TmergeError
from tmerge.evaluate import evaluate_subject, save_prediction
from tmerge.io import read_json
from tmerge.modules.segmentation import SegmentationModule
from tmerge.runs import (
    BEST_CKPT,
    CONFIG_FILE,
    NET_FILE,
    SOURCE_MARKER,
    TARGET_FILE,
    TARGET_MARKER,
    best_state_dict,
    is_finished,
    load_net,
)
from tmerge.stages.module import segmentation_module

log = logging.getLogger("tmerge")


@dataclass
class PredictConfig:
    """Config of ``tmerge predict``."""

    run: str | None = None  # a finished run folder (target or source)
    input: str | None = None  # a case folder, one of its image files, or a dataset root
    output: str | None = None  # folder for <case>.nii.gz (created)
    tta: bool = False  # mirroring test-time augmentation: mean over the 8 flips of the 3 axes
    device: str = "auto"  # "auto" (CUDA if available), "cpu", "cuda", "cuda:1", …
    # Accept a case with a blank modality (all zero or constant within the brain, e.g. a
    # zero-filled missing sequence). None: as the run's data.allow_blank_modality.
    allow_blank_modality: bool | None = None

    def require_paths(self) -> None:
        """Refuse a missing path (checked when the command runs, so that --show-config works)."""
        for key in ("run", "input", "output"):
            if not getattr(self, key):
                raise ConfigError(f"{key}: expected a path, e.g. tmerge predict run=… input=… output=…")


def load_run(run_dir: Path) -> tuple[Any, Any, SegmentationModule]:
    """A finished run's config, its DataModule (for the preprocessing and label convention; no
    I/O) and its module holding the best weights, in eval mode.

    Raises:
        RunError: the folder is not a finished run, or its weights cannot be read.
    """
    from tmerge.data.hcp import HCPDataModule
    from tmerge.data.target import TargetDataModule
    from tmerge.stages.configs import TargetStageConfig
    from tmerge.stages.source import SourceStageConfig

    if is_finished(run_dir, TARGET_MARKER):
        schema, datamodule = TargetStageConfig, TargetDataModule
    elif is_finished(run_dir, SOURCE_MARKER):
        schema, datamodule = SourceStageConfig, HCPDataModule
    else:
        raise RunError(
            f"run: {run_dir} is not a finished run (no {TARGET_MARKER} or {SOURCE_MARKER}); "
            "finish it first or name another folder"
        )
    cfg = compose(schema, None, files=[run_dir / CONFIG_FILE])
    recorded = run_dir / TARGET_FILE
    described = {"described": read_json(recorded)} if schema is TargetStageConfig and recorded.is_file() else {}
    dm = datamodule(**described, **dataclasses.asdict(cfg.data), divisor=cfg.net.divisor)
    net = cfg.net.build(dm.in_channels, dm.n_outputs)
    ckpt = run_dir / BEST_CKPT
    state = best_state_dict(ckpt) if ckpt.is_file() else load_net(run_dir / NET_FILE)[0]
    try:
        net.load_state_dict(state)
    except RuntimeError as exc:
        raise RunError(f"{ckpt if ckpt.is_file() else run_dir / NET_FILE}: not this run's network ({exc})") from None
    module = segmentation_module(net, dm, cfg, cfg.data.patch_size)
    return cfg, dm, module.eval()


def find_cases(dm: Any, given: Path) -> dict[str, Path]:
    """Case id → folder: ``given`` itself (a case folder, or the folder of a given image file),
    every subject of the dataset rooted there, every case folder directly under it, or the
    nnU-Net-named images in it (``<root>/imagesTs``, or loose ``<case>_0000.nii.gz`` …).

    Raises:
        DataError: nothing there holds the images the run's network takes.
    """
    if not given.exists():
        raise DataError(f"input: {given} does not exist")
    folder = given.parent if given.is_file() else given
    if _is_case(dm, folder):
        return {folder.name: folder}
    try:
        found = dm.discover(folder)
        cases = {**found.labelled, **found.unlabelled}
    except DataError:
        cases = {d.name: d for d in sorted(folder.iterdir()) if d.is_dir() and _is_case(dm, d)}
    if not cases:  # a folder of nnU-Net-named images (<root>/imagesTs, or loose files)
        cases = indexed_cases(folder, tuple(dm.modalities))
    if not cases:
        raise DataError(
            f"input: {folder} holds no case with the images this run takes ({', '.join(dm.modalities)}); "
            f"expected a case folder, one of its files, or a dataset root ({dm.layout_hint()})"
        )
    return cases


def indexed_cases(folder: Path, channels: tuple[str, ...]) -> dict[str, IndexedCase]:
    """The cases of a folder of nnU-Net-named images ``<case>_<XXXX>.nii[.gz]`` that have every
    one of the run's channels (0000 … C-1), in the run's channel order."""
    pattern = re.compile(r"^(.+)_(\d{4})(\.nii(?:\.gz)?)$")
    found: dict[tuple[str, str], set[int]] = {}
    for f in sorted(folder.iterdir()):
        m = pattern.match(f.name)
        if m and f.is_file():
            found.setdefault((m.group(1), m.group(3)), set()).add(int(m.group(2)))
    order = tuple((name, i) for i, name in enumerate(channels))
    return {
        case: IndexedCase(folder, case, order, ending)
        for (case, ending), indices in sorted(found.items())
        if indices >= set(range(len(channels)))
    }


def input_convention(dm: Any, given: Path) -> tuple[bool, Any]:
    """The label convention of the input's own layout, so that predictions come out in the
    values of the dataset they are for: ``(True, mapping)`` where the input is a dataset root,
    lies in one, or is a case folder whose name a layout claims (``mapping`` None: the task's
    native values, e.g. BraTS 2018's 0/1/2/4); ``(False, None)`` where nothing tells."""
    from tmerge.data import formats

    folder = given.parent if given.is_file() else given
    for root in (folder, folder.parent):
        with contextlib.suppress(DataError):
            return True, formats.detect(root, dm.kind).labels
    for fmt in formats.formats_for(dm.kind):
        if fmt.claims is not None and fmt.claims(folder.name):
            with contextlib.suppress(DataError):
                return True, fmt.open(folder.parent, dm.kind).labels
    return False, None


def _is_case(dm: Any, folder: Path) -> bool:
    try:
        dm.subject_files(folder, labelled=False)
    except DataError:
        return False
    return True


def _flips(n_dims: int = 3) -> Iterator[tuple[int, ...]]:
    """Every subset of the spatial axes of a ``(B, C, D, H, W)`` tensor: no flip first."""
    axes = tuple(range(2, 2 + n_dims))
    for k in range(len(axes) + 1):
        yield from combinations(axes, k)


@torch.no_grad()
def predict_logits(module: SegmentationModule, image: torch.Tensor, tta: bool) -> torch.Tensor:
    """Logits ``(B, C, D, H, W)`` for a batch of whole volumes; with ``tta`` the logits of the
    mean probability over the 8 mirrored copies (sigmoid: per channel; softmax: over channels)."""
    if not tta:
        return module.infer(image)
    sigmoid = module.output_mode == "sigmoid"
    total = None
    for axes in _flips():
        logits = module.infer(image.flip(axes) if axes else image)
        logits = logits.flip(axes) if axes else logits
        p = torch.sigmoid(logits) if sigmoid else torch.softmax(logits, dim=1)
        total = p if total is None else total + p
    mean = (total / 8).clamp(1e-7, 1 - 1e-7)
    return torch.logit(mean) if sigmoid else mean.log()


def run_predict(cfg: PredictConfig) -> Path:
    """Predict every case of ``cfg.input`` with the run ``cfg.run``; return the output folder.

    Raises:
        RunError: the run folder is not usable, or some cases failed (each was named already).
    """
    from tqdm.auto import tqdm

    cfg.require_paths()
    run_dir, out = Path(str(cfg.run)).expanduser(), Path(str(cfg.output)).expanduser()
    run_cfg, dm, module = load_run(run_dir)
    cases = find_cases(dm, Path(str(cfg.input)).expanduser())
    auto = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(auto if cfg.device == "auto" else cfg.device)
    module.to(device)
    settings = dm.preprocess_settings()
    if cfg.allow_blank_modality is not None:
        settings = dataclasses.replace(settings, allow_blank_modality=bool(cfg.allow_blank_modality))
    known, labels = input_convention(dm, Path(str(cfg.input)).expanduser())
    if known:  # else: the values of the dataset the run was trained on
        settings = dataclasses.replace(settings, labels=labels)
    log.info("predict: %d case(s) with %s (%s%s) into %s", len(cases), run_dir, device, ", TTA" if cfg.tta else "", out)
    failed: list[str] = []
    for case, folder in tqdm(cases.items(), desc="tmerge predict", unit="case", file=sys.stderr):
        try:
            files, _ = dm.subject_files(folder, labelled=False)
            pre = preprocess_subject(files, None, dm.kind, settings, case)
        except TmergeError as exc:  # a truncated, missing or blank file: name it, go on with the others
            if isinstance(exc, BlankModality):  # the key that accepts it here is predict's own
                exc = exc.with_option("allow_blank_modality")
            log.error("predict: %s skipped: %s", case, exc)
            failed.append(case)
            continue
        batch = collate_volumes([VolumeDataset([Subject(case, pre.image, None, pre.meta)], dm.label_dtype)[0]])
        logits = predict_logits(module, batch["image"].to(device), cfg.tta)
        result = evaluate_subject(logits[0], None, pre.meta, module.scheme)
        save_prediction(out, case, result.labels, pre.meta)
    if failed:
        raise RunError(
            f"predict: {len(failed)} of {len(cases)} case(s) could not be read and were skipped "
            f"({', '.join(failed)}); the other predictions are in {out}"
        )
    log.info("predict: %d label map(s) in %s", len(cases), out)
    return out
