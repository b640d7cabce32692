"""Dataset formats: one registry of the layouts a dataset root may have, detected from the root.

A format (:class:`~tmerge.data.layout.Format`) is registered once (:func:`register`) and says

* ``detect(root)``: whether a root has its layout (folder listings only);
* ``open(root, task)``: the root as a :class:`~tmerge.data.layout.Layout` for a task (``"brats"``, the tumour
  task; ``"hcp"``, a parcellation source): which cases it holds, labelled and unlabelled
  (``Layout.discover``, listings only), and how its label values map to the task's internal
  labels and back (``Layout.labels``, a :class:`~tmerge.data.labels.LabelMapping`; ``None``: the
  task's native convention — BraTS 0/1/2/4 checked as they are, FreeSurfer aseg → the paper's 14
  classes).

A case's files, in the task's channel order, come from its handle (:func:`case_files`): a case
folder (the BraTS and HCP layouts) or an :class:`~tmerge.data.nnunet.IndexedCase` (nnU-Net).

Internal labels: the tumour task keeps BraTS 2018's values 0/1/2/4 (1 necrosis/non-enhancing
core, 2 oedema, 4 enhancing), trained as the regions ET = 4, TC = 1 ∪ 4, WT = 1 ∪ 2 ∪ 4; a
parcellation keeps its class values (HCP: the paper's classes 1..14; nnU-Net: the dataset.json
label values). Predictions are written back in the dataset's own values (``LabelMapping.write``).

Registered, in detection order:

* ``brats2018`` — ``MICCAI_BraTS_2018_Data_Training/{HGG,LGG}/Brats18_<ID>/Brats18_<ID>_{t1,t1ce,t2,flair,seg}``;
* ``brats2021`` — ``BraTS2021_<ID>/BraTS2021_<ID>_{t1,t1ce,t2,flair,seg}``, labels 0/1/2/4;
* ``brats2023`` — ``BraTS-GLI-<ID>-<TP>/BraTS-GLI-<ID>-<TP>-{t1n,t1c,t2w,t2f,seg}``, labels
  0/1/2/3 with 3 = enhancing;
* ``hcp`` — ``<subject>/T1w/{T1w,T2w}_acpc_dc_restore_brain``, ``aparc+aseg``;
* ``nnunet`` — nnU-Net v2 raw: ``dataset.json`` (``channel_names``, ``labels``,
  ``file_ending``), ``imagesTr/<case>_<XXXX>``, ``labelsTr/<case>``, ``imagesTs/`` (the
  prediction set); for either task (:mod:`tmerge.data.nnunet`).

BraTS 2021/2023 case folders may sit in the root or one folder below it (e.g. the release's
``…TrainingData/`` and ``…ValidationData/`` side by side); a case folder with its ``seg`` file is
labelled, one without is in the prediction set. Subject ids are the case folder names (nnU-Net:
the case identifiers); splits are drawn from the sorted ids, so two copies of one dataset in
different layouts draw the same cases when their ids sort alike.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from tmerge.data.channels import TASK_CHANNELS
from tmerge.data.labels import BRATS2023_LABELS
from tmerge.data.layout import GENERIC, Discovery, Format, Layout
from tmerge.data.nifti import NIFTI_SUFFIXES, find_modality
from tmerge.data.nnunet import (
    NNUNET,
    NNUNET_FILE,
    IndexedCase,
    brats_spec,
    load_dataset_json,
    nnunet_layout,
    open_generic,
)
from tmerge.data.schemes import BRATS_SCHEME
from tmerge.errors import DataError

log = logging.getLogger(__name__)

#: The task's name in messages.
TASK_TITLES = {"brats": "BraTS", "hcp": "HCP", "target": "target"}
#: Output modes a target config may ask for; "auto" follows the dataset (regions → sigmoid).
TARGET_OUTPUT_MODES = ("auto", "softmax", "sigmoid")

BRATS2018_TRAINING = "MICCAI_BraTS_2018_Data_Training"
BRATS2018_VALIDATION = "MICCAI_BraTS_2018_Data_Validation"
BRATS2018_GRADES = ("HGG", "LGG")
#: HCP channel → file stem, and the label file's stem.
HCP_FILES: dict[str, str] = {"T1": "T1w_acpc_dc_restore_brain", "T2": "T2w_acpc_dc_restore_brain"}
HCP_LABEL_FILE = "aparc+aseg"
#: BraTS 2023 file suffix of each task channel.
BRATS2023_FILES: dict[str, str] = {"t1": "t1n", "t1ce": "t1c", "t2": "t2w", "flair": "t2f"}


#: The registry, in detection order.
FORMATS: dict[str, Format] = {}
#: The layout of each task's embedded default data.
DEFAULT_FORMAT = {"brats": "brats2018", "hcp": "hcp"}


def register(fmt: Format) -> Format:
    """Add a format to the registry (detected after those registered before it)."""
    if fmt.name in FORMATS:
        raise ValueError(f"format {fmt.name!r} is registered already")
    FORMATS[fmt.name] = fmt
    return fmt


def formats_for(task: str) -> list[Format]:
    """The formats serving ``task``, in detection order."""
    if task == GENERIC:
        return [f for f in FORMATS.values() if "brats" in f.tasks]
    if task not in TASK_CHANNELS:
        raise ValueError(f"task: expected one of {list(TASK_CHANNELS)}, got {task!r}")
    return [f for f in FORMATS.values() if task in f.tasks]


def expected_layouts(task: str) -> str:
    """Every layout ``task`` accepts, in one line for an error message."""
    return "; or ".join(f"{f.hint} ({f.title})" for f in formats_for(task))


def detect(root: Path, task: str) -> Layout:
    """Open ``root`` in the first format of ``task`` that recognises it.

    Raises:
        DataError: naming the root and every layout expected, if none matches; or what the
            matching format finds malformed.
    """
    root = Path(root)
    for fmt in formats_for(task):
        if fmt.detect(root):
            return fmt.open(root, task)
    raise DataError(f"{root}: no {TASK_TITLES[task]} dataset layout found; expected {expected_layouts(task)}")


def open_default(root: Path, task: str) -> Layout:
    """The embedded default data of ``task`` (no detection: it may not be generated yet)."""
    return FORMATS[DEFAULT_FORMAT[task]].open(Path(root), task)


def case_files(handle: Any, labelled: bool, task: str) -> tuple[dict[str, Path], Path | None]:
    """A case's ``(channel -> file in channel order, label file or None)``.

    ``handle`` is an :class:`IndexedCase` or a case folder of any folder layout of ``task``: the
    formats whose case names it has are tried first, and the first format's error is raised
    if no format finds its files.

    Raises:
        DataError: a file is missing (naming it and the names expected).
    """
    if isinstance(handle, IndexedCase):
        return handle.files(labelled)
    folder = Path(handle)
    folder_formats = [f for f in formats_for(task) if f.case_files is not None]
    ordered = sorted(folder_formats, key=lambda f: not (f.claims is not None and f.claims(folder.name)))
    first: DataError | None = None
    for fmt in ordered:
        assert fmt.case_files is not None
        try:
            return fmt.case_files(folder, labelled)
        except DataError as exc:
            first = first or exc
    assert first is not None
    raise first


def _dirs(parent: Path) -> list[Path]:
    if not parent.is_dir():
        return []
    return [d for d in sorted(parent.iterdir()) if d.is_dir() and not d.name.startswith(".")]


def _has_nifti(folder: Path, stem: str) -> bool:
    return any((folder / f"{stem}{suffix}").is_file() for suffix in NIFTI_SUFFIXES)


# ---- BraTS 2018 -----------------------------------------------------------------------------


def _brats18_files(folder: Path, labelled: bool) -> tuple[dict[str, Path], Path | None]:
    files = {m: find_modality(folder, f"{folder.name}_{m}") for m in TASK_CHANNELS["brats"]}
    return files, find_modality(folder, f"{folder.name}_seg") if labelled else None


_BRATS18_HINT = (
    f"<root>/{BRATS2018_TRAINING}/{{HGG,LGG}}/Brats18_<ID>/Brats18_<ID>_t1.nii.gz "
    "(and _t1ce, _t2, _flair, _seg; .nii too)"
)


def _open_brats18(root: Path, task: str) -> Layout:
    def discover() -> Discovery:
        labelled: dict[str, Any] = {}
        for grade in BRATS2018_GRADES:
            labelled.update({d.name: d for d in _dirs(root / BRATS2018_TRAINING / grade)})
        if not labelled:
            raise DataError(f"{root}: no BraTS training subjects found; expected {_BRATS18_HINT}")
        return Discovery(
            labelled=labelled, unlabelled={d.name: d for d in _dirs(root / BRATS2018_VALIDATION)}
        )

    return Layout(FORMATS["brats2018"], root, task, discover)


register(
    Format(
        name="brats2018",
        title="BraTS 2018",
        tasks=("brats",),
        hint=_BRATS18_HINT,
        detect=lambda root: (root / BRATS2018_TRAINING).is_dir(),
        open=_open_brats18,
        case_files=_brats18_files,
    )
)


# ---- BraTS 2021 and 2023: case folders in the root (or one folder below) ---------------------


def _case_folders(root: Path, pattern: re.Pattern[str]) -> list[Path]:
    """Case folders matching ``pattern`` in ``root`` and in its folders that are no case folders
    (e.g. ``…TrainingData/``), by name."""
    found: list[Path] = []
    for d in _dirs(root):
        if pattern.match(d.name):
            found.append(d)
        elif not _ANY_CASE.match(d.name):
            found.extend(c for c in _dirs(d) if pattern.match(c.name))
    return found


def _open_case_folders(
    root: Path, fmt_name: str, pattern: re.Pattern[str], seg_stem: Callable[[str], str]
) -> Layout:
    fmt = FORMATS[fmt_name]

    def discover() -> Discovery:
        labelled: dict[str, Any] = {}
        unlabelled: dict[str, Any] = {}
        seen: dict[str, Path] = {}
        for folder in _case_folders(root, pattern):
            if folder.name in seen:
                raise DataError(
                    f"{folder}: case {folder.name} is also in {seen[folder.name].parent}; expected each case once"
                )
            seen[folder.name] = folder
            part = labelled if _has_nifti(folder, seg_stem(folder.name)) else unlabelled
            part[folder.name] = folder
        if not labelled:
            raise DataError(f"{root}: no labelled {fmt.title} cases found; expected {fmt.hint}")
        return Discovery(labelled=dict(sorted(labelled.items())), unlabelled=dict(sorted(unlabelled.items())))

    labels = BRATS2023_LABELS if fmt_name == "brats2023" else None
    return Layout(fmt, root, "brats", discover, labels=labels, record={"format": fmt_name})


_BRATS21 = re.compile(r"^BraTS2021_\d+$")
_BRATS23 = re.compile(r"^BraTS-GLI-\d+-\d+$")
# Case folders (of either release) are not searched for cases; wrappers such as Kaggle's
# BraTS2021_Training_Data/ or the 2023 release's …-TrainingData/ are.
_ANY_CASE = re.compile(r"^(BraTS2021_\d+|BraTS-[A-Z]+-\d+-\d+)$")


def _brats21_files(folder: Path, labelled: bool) -> tuple[dict[str, Path], Path | None]:
    return _brats18_files(folder, labelled)  # the same naming: <case>_<modality>


def _brats23_files(folder: Path, labelled: bool) -> tuple[dict[str, Path], Path | None]:
    files = {m: find_modality(folder, f"{folder.name}-{s}") for m, s in BRATS2023_FILES.items()}
    return files, find_modality(folder, f"{folder.name}-seg") if labelled else None


register(
    Format(
        name="brats2021",
        title="BraTS 2021",
        tasks=("brats",),
        hint="<root>/BraTS2021_<ID>/BraTS2021_<ID>_t1.nii.gz (and _t1ce, _t2, _flair, _seg; labels 0/1/2/4)",
        detect=lambda root: bool(_case_folders(root, _BRATS21)),
        open=lambda root, task: _open_case_folders(root, "brats2021", _BRATS21, lambda c: f"{c}_seg"),
        case_files=_brats21_files,
        claims=lambda name: bool(_BRATS21.match(name)),
    )
)
register(
    Format(
        name="brats2023",
        title="BraTS 2023",
        tasks=("brats",),
        hint="<root>/BraTS-GLI-<ID>-<TP>/BraTS-GLI-<ID>-<TP>-t1n.nii.gz (and -t1c, -t2w, -t2f, -seg; labels 0/1/2/3)",
        detect=lambda root: bool(_case_folders(root, _BRATS23)),
        open=lambda root, task: _open_case_folders(root, "brats2023", _BRATS23, lambda c: f"{c}-seg"),
        case_files=_brats23_files,
        claims=lambda name: bool(_BRATS23.match(name)),
    )
)


# ---- HCP ------------------------------------------------------------------------------------

_HCP_HINT = (
    f"<root>/<subject>/T1w/{HCP_FILES['T1']}.nii.gz (and {HCP_FILES['T2']}, {HCP_LABEL_FILE}; .nii too)"
)


def _hcp_files(folder: Path, labelled: bool) -> tuple[dict[str, Path], Path | None]:
    files = {name: find_modality(folder, stem) for name, stem in HCP_FILES.items()}
    return files, find_modality(folder, HCP_LABEL_FILE) if labelled else None


def _open_hcp(root: Path, task: str) -> Layout:
    def discover() -> Discovery:
        subjects = {d.name: d / "T1w" for d in sorted(root.iterdir()) if (d / "T1w").is_dir()}
        if not subjects:
            raise DataError(f"{root}: no HCP subjects found; expected {_HCP_HINT}")
        return Discovery(labelled=subjects)

    return Layout(FORMATS["hcp"], root, task, discover)


register(
    Format(
        name="hcp",
        title="HCP",
        tasks=("hcp",),
        hint=_HCP_HINT,
        detect=lambda root: root.is_dir() and any((d / "T1w").is_dir() for d in root.iterdir()),
        open=_open_hcp,
        case_files=_hcp_files,
    )
)


# ---- nnU-Net v2 raw (tmerge.data.nnunet) ----------------------------------------------------

register(NNUNET)


# ---- any labelled target --------------------------------------------------------------------


def open_target(root: Path, layout: str | None = None, output_mode: str = "auto") -> Layout:
    """Open a target dataset: a BraTS layout (the tumour regions, exactly as the ``brats`` task)
    or an nnU-Net v2 raw dataset with its own channels and labels.

    Args:
        root: The dataset root.
        layout: A format name to use instead of detecting it (``brats2018``, ``nnunet``, …).
        output_mode: ``"auto"`` (regions → sigmoid, plain labels → softmax; an nnU-Net dataset
            of BraTS' channels and tumour labels is BraTS), ``"softmax"`` or ``"sigmoid"``.

    Raises:
        DataError: no layout found, or a malformed dataset.
        ConfigError: the output mode does not fit the dataset (a region dataset forced to
            softmax, plain labels forced to sigmoid, BraTS regions forced to softmax).
    """
    from tmerge.errors import ConfigError

    root = Path(root)
    if output_mode not in TARGET_OUTPUT_MODES:
        raise ConfigError(f"data.output_mode: expected one of {', '.join(TARGET_OUTPUT_MODES)}, got {output_mode!r}")
    if layout is not None:
        if layout not in FORMATS or "brats" not in FORMATS[layout].tasks:
            names = ", ".join(f.name for f in formats_for(GENERIC))
            raise ConfigError(f"data.layout: expected null or one of {names}, got {layout!r}")
        fmt = FORMATS[layout]
        if not fmt.detect(root):
            raise DataError(f"{root}: not a {fmt.title} dataset (data.layout={layout}); expected {fmt.hint}")
    else:
        found = [f for f in formats_for(GENERIC) if f.detect(root)]
        if not found:
            raise DataError(f"{root}: no target dataset layout found; expected {expected_layouts('brats')}")
        fmt = found[0]
    if fmt.name != "nnunet":
        if output_mode == "softmax":
            raise ConfigError(
                f"data.output_mode=softmax: {root} is a {fmt.title} dataset, scored as the nested tumour "
                "regions ET/TC/WT (sigmoid); expected auto or sigmoid"
            )
        return dataclasses.replace(fmt.open(root, "brats"), scheme=BRATS_SCHEME)
    path = root / NNUNET_FILE
    data = load_dataset_json(path)
    regions = isinstance(data.get("labels"), Mapping) and any(
        isinstance(v, (list, tuple)) for v in data["labels"].values()
    )
    if output_mode == "softmax" and regions:
        raise ConfigError(
            f"data.output_mode=softmax: {path} declares regions (lists of label values), which overlap and "
            "need one sigmoid output each; expected auto or sigmoid"
        )
    brats = brats_spec(path, data) if output_mode != "softmax" else None
    if brats is not None:
        return dataclasses.replace(nnunet_layout(root, "brats", brats), scheme=BRATS_SCHEME)
    if output_mode == "sigmoid" and not regions:
        raise ConfigError(
            f"data.output_mode=sigmoid: {path} declares plain labels (one value per class), not regions; "
            "expected auto or softmax"
        )
    return open_generic(root, data)
