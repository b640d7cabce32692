"""Dataset formats: one registry of the layouts a dataset root may have, detected from the root.

A format (:class:`Format`) is registered once (:func:`register`) and says

* ``detect(root)``: whether a root has its layout (folder listings only);
* ``open(root, task)``: the root as a :class:`Layout` for a task (``"brats"``, the tumour
  task; ``"hcp"``, a parcellation source): which cases it holds, labelled and unlabelled
  (``Layout.discover``, listings only), and how its label values map to the task's internal
  labels and back (``Layout.labels``, a :class:`~tmerge.data.labels.LabelMapping`; ``None``: the
  task's native convention — BraTS 0/1/2/4 checked as they are, FreeSurfer aseg → the paper's 14
  classes).

A case's files, in the task's channel order, come from its handle (:func:`case_files`): a case
folder (the BraTS and HCP layouts) or an :class:`IndexedCase` (nnU-Net).

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
  prediction set); for either task.

BraTS 2021/2023 case folders may sit in the root or one folder below it (e.g. the release's
``…TrainingData/`` and ``…ValidationData/`` side by side); a case folder with its ``seg`` file is
labelled, one without is in the prediction set. Subject ids are the case folder names (nnU-Net:
the case identifiers); splits are drawn from the sorted ids, so two copies of one dataset in
different layouts draw the same cases when their ids sort alike.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tmerge.data.labels import BRATS2023_LABELS, BRATS_SCHEME, LabelMapping, LabelScheme
from tmerge.data.nifti import NIFTI_SUFFIXES, find_modality
from tmerge.errors import DataError

log = logging.getLogger(__name__)

#: Input channels of each task, in channel order.
TASK_CHANNELS: dict[str, tuple[str, ...]] = {"brats": ("t1", "t1ce", "t2", "flair"), "hcp": ("T1", "T2")}
#: The task's name in messages.
TASK_TITLES = {"brats": "BraTS", "hcp": "HCP", "target": "target"}
#: The kind of a target dataset that is not BraTS: its channels and labels are its own.
GENERIC = "target"
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

NNUNET_FILE = "dataset.json"

# nnU-Net channel names (lower case, letters and digits only) accepted for each task channel.
_CHANNEL_ALIASES: dict[str, frozenset[str]] = {
    "t1": frozenset("t1 t1w t1n t1native nativet1 t1pre".split()),
    "t1ce": frozenset("t1ce t1c t1gd t1wce t1post t1contrast t1gad t1cegd".split()),
    "t2": frozenset("t2 t2w".split()),
    "flair": frozenset("flair t2f t2flair t2wflair".split()),
    "T1": frozenset("t1 t1w".split()),
    "T2": frozenset("t2 t2w".split()),
}
# nnU-Net label names accepted for each internal tumour label, for datasets that give plain
# labels (the Medical Segmentation Decathlon's Task01 converted: edema / non-enhancing tumor /
# enhancing tumour) instead of regions.
_TUMOUR_NAMES: dict[int, frozenset[str]] = {
    4: frozenset("et enhancing enhancingtumor enhancingtumour".split()),
    1: frozenset(
        "ncr net ncrnet netc necrosis necrotic necroticcore necrotictumorcore necrotictumourcore "
        "nonenhancing nonenhancingtumor nonenhancingtumour nonenhancingcore nonenhancingtumorcore "
        "nonenhancingtumourcore".split()
    ),
    2: frozenset("ed edema oedema peritumoraledema peritumouraloedema snfh".split()),
}


def _norm(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def canonical_channel(name: str) -> str:
    """The MR contrast a channel name stands for, so that names from different datasets compare:
    ``T1``, ``T1w``, ``t1n`` → ``t1``; ``T2w`` → ``t2``; ``FLAIR``, ``t2f`` → ``flair``; ``t1ce``,
    ``T1Gd`` → ``t1ce``; any other name → itself, lower case, letters and digits only."""
    key = _norm(name)
    for channel in TASK_CHANNELS["brats"]:
        if key in _CHANNEL_ALIASES[channel]:
            return channel
    return key


def match_channels(target: Sequence[str], source: Sequence[str]) -> list[int] | None:
    """For each target channel, the index of the source channel of the same contrast
    (:func:`canonical_channel`); ``None`` unless every target channel has one."""
    where = {canonical_channel(name): i for i, name in reversed(list(enumerate(source)))}
    found = [where.get(canonical_channel(name)) for name in target]
    return None if any(i is None for i in found) else [int(i) for i in found]  # type: ignore[arg-type]


# ---- cases and layouts ----------------------------------------------------------------------


@dataclass
class Discovery:
    """Cases found under a dataset root: ``id -> handle`` for labelled and unlabelled ones.

    A handle is a case folder (BraTS, HCP) or an :class:`IndexedCase` (nnU-Net); its files
    come from :func:`case_files`.
    """

    labelled: dict[str, Any]
    unlabelled: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclass(frozen=True)
class IndexedCase:
    """One case of an nnU-Net raw dataset: ``<folder>/<case>_<XXXX><ending>`` per channel."""

    folder: Path
    case: str
    channels: tuple[tuple[str, int], ...]  # task channel → nnU-Net channel index, in channel order
    ending: str
    label: Path | None = None

    def files(self, labelled: bool) -> tuple[dict[str, Path], Path | None]:
        images = {
            name: self.folder / f"{self.case}_{index:04d}{self.ending}" for name, index in self.channels
        }
        return images, self.label if labelled else None


@dataclass
class Layout:
    """A dataset root opened in one format for one task.

    Attributes:
        format: Its :class:`Format`.
        root: The dataset root.
        task: ``"brats"`` or ``"hcp"``.
        discover: Lists the cases (folder listings only; raises :class:`DataError`).
        labels: The label mapping, or ``None`` for the task's native convention.
        classes: A parcellation's class value → name (``None``: HCP's paper classes).
        record: What the split record notes about the layout (``{}`` for the legacy ones).
    """

    format: Format
    root: Path
    task: str
    discover: Callable[[], Discovery]
    labels: LabelMapping | None = None
    classes: dict[int, str] | None = None
    record: dict[str, Any] = dataclasses.field(default_factory=dict)
    channels: tuple[str, ...] = ()
    scheme: LabelScheme | None = None

    @property
    def input_channels(self) -> tuple[str, ...]:
        """The input channels in order: the dataset's own (a generic target) or the task's."""
        return self.channels or TASK_CHANNELS[self.task]


@dataclass(frozen=True)
class Format:
    """One dataset layout.

    Attributes:
        name: Registry key (``"brats2023"``).
        title: Name in messages (``"BraTS 2023"``).
        tasks: The tasks it can serve.
        hint: The layout in one line, for error messages.
        detect: ``root -> bool``, from folder listings only.
        open: ``(root, task) -> Layout``; raises :class:`DataError` on a malformed root.
        case_files: For folder layouts, ``(case folder, labelled) -> (files, label file)``.
        claims: For folder layouts, whether a case folder's name is this format's.
    """

    name: str
    title: str
    tasks: tuple[str, ...]
    hint: str
    detect: Callable[[Path], bool]
    open: Callable[[Path, str], Layout]
    case_files: Callable[[Path, bool], tuple[dict[str, Path], Path | None]] | None = None
    claims: Callable[[str], bool] | None = None


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


# ---- nnU-Net v2 raw -------------------------------------------------------------------------

_NNUNET_HINT = (
    "<root>/dataset.json (channel_names, labels, file_ending) with <root>/imagesTr/<case>_0000.nii.gz, "
    "<root>/labelsTr/<case>.nii.gz and optionally <root>/imagesTs/"
)


@dataclass(frozen=True)
class NnUNetSpec:
    """The parts of an nnU-Net v2 ``dataset.json`` a task uses.

    Attributes:
        path: The file.
        channels: ``(task channel, nnU-Net channel index)`` in the task's channel order.
        n_channels: How many channels each case has.
        ending: ``file_ending``.
        labels: The label mapping to the task's internal labels.
        classes: Parcellation: class value → name (``None`` for the tumour task).
    """

    path: Path
    channels: tuple[tuple[str, int], ...]
    n_channels: int
    ending: str
    labels: LabelMapping
    classes: dict[int, str] | None = None


def _json_error(path: Path, key: str, got: Any, expected: str) -> DataError:
    return DataError(f"{path}: {key!r}: got {got!r}; expected {expected}")


def _int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _channel_names(path: Path, raw: Any, expected: str) -> dict[int, str]:
    """dataset.json's ``channel_names`` as index → name, indices exactly 0..C-1."""
    if not isinstance(raw, Mapping) or not raw:
        raise _json_error(path, "channel_names", raw, expected)
    try:
        names = {int(k): str(v) for k, v in raw.items()}
    except (TypeError, ValueError):
        raise _json_error(path, "channel_names", raw, expected) from None
    if sorted(names) != list(range(len(names))):
        raise _json_error(path, "channel_names", raw, expected)
    return names


def _channels(path: Path, raw: Any, task: str) -> tuple[tuple[tuple[str, int], ...], int]:
    wanted = TASK_CHANNELS[task]
    expected = (
        f"a mapping of channel indices 0..C-1 to names, naming each of the task's channels "
        f'{", ".join(wanted)} once (e.g. {{"0": "{wanted[0].upper()}", …}})'
    )
    names = _channel_names(path, raw, expected)
    channels = []
    for channel in wanted:
        hits = [i for i, name in names.items() if _norm(name) in _CHANNEL_ALIASES[channel]]
        if len(hits) != 1:
            aliases = ", ".join(sorted(_CHANNEL_ALIASES[channel]))
            raise DataError(
                f"{path}: 'channel_names' {dict(raw)} names the task's channel {channel!r} "
                f"{len(hits)} times; expected it once, as one of: {aliases} (any case)"
            )
        channels.append((channel, hits[0]))
    return tuple(channels), len(names)


def _label_entries(path: Path, raw: Any) -> tuple[dict[str, tuple[int, ...]], bool]:
    """``name -> values`` of the foreground labels, and whether they are regions."""
    expected = 'a mapping of names to label values, {"background": 0, "<name>": 1, …} or regions {"<name>": [1, 2], …}'
    if not isinstance(raw, Mapping) or not raw:
        raise _json_error(path, "labels", raw, expected)
    entries: dict[str, tuple[int, ...]] = {}
    for name, value in raw.items():
        values = tuple(value) if isinstance(value, (list, tuple)) else (value,)
        if not values or not all(_int(v) and 0 <= v <= 255 for v in values):
            raise DataError(
                f"{path}: 'labels' entry {name!r}: got {value!r}; expected a label value 0..255 or a list of them"
            )
        entries[str(name)] = values
    background = [n for n, v in entries.items() if v == (0,)]
    if len(background) != 1:
        raise DataError(
            f"{path}: 'labels': got {dict(raw)}; expected exactly one entry of value 0 (the background)"
        )
    del entries[background[0]]
    if not entries:
        raise DataError(
            f"{path}: 'labels': got {dict(raw)}; expected foreground labels besides the background"
        )
    if any(0 in v for v in entries.values()):
        raise DataError(f"{path}: 'labels': got {dict(raw)}; expected 0 only for the background")
    regions = any(len(v) > 1 for v in entries.values())
    return entries, regions


def _tumour_regions(path: Path, entries: dict[str, tuple[int, ...]], order: Any) -> LabelMapping:
    """nnU-Net region labels (e.g. whole tumor [1, 2, 3] ⊃ tumor core [2, 3] ⊃ enhancing 3) →
    the internal 0/1/2/4, and back through ``regions_class_order``."""
    described = {n: list(v) for n, v in entries.items()}
    if len(entries) != 3:
        raise DataError(
            f"{path}: 'labels' regions {described}: expected three nested tumour regions "
            "(whole tumour ⊃ tumour core ⊃ enhancing, e.g. [1, 2, 3], [2, 3], [3])"
        )
    sets = {n: frozenset(v) for n, v in entries.items()}
    wt, tc, et = sorted(sets, key=lambda n: -len(sets[n]))
    if not (sets[et] < sets[tc] < sets[wt]):
        raise DataError(
            f"{path}: 'labels' regions {described}: expected three nested tumour regions "
            "(whole tumour ⊃ tumour core ⊃ enhancing, e.g. [1, 2, 3], [2, 3], [3])"
        )
    names = list(entries)
    if not (isinstance(order, list) and len(order) == 3 and all(_int(v) for v in order)):
        raise _json_error(
            path, "regions_class_order", order, f"one label value per region {names}, e.g. [1, 2, 3]"
        )
    written = dict(zip(names, order, strict=True))
    for n in names:
        if written[n] not in sets[n]:
            raise _json_error(
                path, "regions_class_order", order, f"for each region {names} one of its own label values"
            )
    read = [(0, 0)]
    for v in sorted(sets[wt]):
        read.append((v, 4 if v in sets[et] else 1 if v in sets[tc] else 2))
    write = ((0, 0), (4, written[et]), (1, written[tc]), (2, written[wt]))
    return LabelMapping(f"nnU-Net {path}", tuple(read), write)


def _tumour_classes(path: Path, entries: dict[str, tuple[int, ...]]) -> LabelMapping:
    """Plain nnU-Net labels named as BraTS's (edema, non-enhancing/necrosis, enhancing) → the
    internal 0/1/2/4 and back."""
    internal: dict[int, int] = {}
    unknown = []
    for name, (value,) in entries.items():
        hits = [k for k, aliases in _TUMOUR_NAMES.items() if _norm(name) in aliases]
        if hits:
            internal[value] = hits[0]
        else:
            unknown.append(name)
    missing = sorted(set(_TUMOUR_NAMES) - set(internal.values()))
    if unknown or missing:
        raise DataError(
            f"{path}: 'labels' {dict((n, v[0]) for n, v in entries.items())}: cannot tell the tumour regions "
            f"({'unknown names ' + str(unknown) if unknown else 'no label for ' + str(missing)}); expected "
            'regions {"whole tumor": [1, 2, 3], "tumor core": [2, 3], "enhancing tumor": [3]} with '
            '"regions_class_order", or labels named edema, non-enhancing tumor (or necrosis) and enhancing tumor'
        )
    read = ((0, 0), *sorted(internal.items()))
    write = [(0, 0)]
    for k in (1, 2, 4):
        write.append((k, min(v for v, i in internal.items() if i == k)))
    return LabelMapping(f"nnU-Net {path}", read, tuple(write))


def _parcellation(
    path: Path, entries: dict[str, tuple[int, ...]], regions: bool
) -> tuple[LabelMapping, dict[int, str]]:
    if regions:
        raise DataError(
            f"{path}: 'labels' holds regions (lists of values); a parcellation source expects one value per class"
        )
    classes = {v[0]: n for n, v in entries.items()}
    if len(classes) != len(entries):
        raise DataError(f"{path}: 'labels': a label value is named twice; expected one name per class value")
    classes = dict(sorted(classes.items()))
    read = ((0, 0), *((v, v) for v in classes))
    return LabelMapping(f"nnU-Net {path}", read), classes


def read_dataset_json(root: Path, task: str) -> NnUNetSpec:
    """Parse and check ``<root>/dataset.json`` for ``task``.

    Raises:
        DataError: naming the file and the key that is missing or malformed, and what was expected.
    """
    path = Path(root) / NNUNET_FILE
    return _task_spec(path, _load_dataset_json(path), task)


def _file_ending(path: Path, data: dict[str, Any]) -> str:
    """The dataset.json's ``file_ending``, once its three required keys are checked there."""
    for key in ("channel_names", "labels", "file_ending"):
        if key not in data:
            hint = (
                " (nnU-Net v1's 'modality' is v2's 'channel_names')"
                if key == "channel_names" and "modality" in data
                else ""
            )
            raise DataError(
                f"{path}: missing key {key!r}; expected an nnU-Net v2 dataset.json with channel_names, labels and file_ending{hint}"
            )
    ending = data["file_ending"]
    if ending not in NIFTI_SUFFIXES:
        raise _json_error(
            path, "file_ending", ending, f"one of {', '.join(NIFTI_SUFFIXES)} (tmerge reads NIfTI)"
        )
    return ending


def _task_spec(path: Path, data: dict[str, Any], task: str) -> NnUNetSpec:
    """A parsed dataset.json (``path``'s ``data``) checked for the task ``task``."""
    ending = _file_ending(path, data)
    channels, n_channels = _channels(path, data["channel_names"], task)
    entries, regions = _label_entries(path, data["labels"])
    if task == "brats":
        if regions:
            labels = _tumour_regions(path, entries, data.get("regions_class_order"))
        else:
            labels = _tumour_classes(path, entries)
        return NnUNetSpec(path, channels, n_channels, ending, labels)
    labels, classes = _parcellation(path, entries, regions)
    return NnUNetSpec(path, channels, n_channels, ending, labels, classes)


def _indexed_cases(folder: Path, spec: NnUNetSpec) -> dict[str, dict[int, Path]]:
    pattern = re.compile(rf"^(.+)_(\d{{4}}){re.escape(spec.ending)}$")
    cases: dict[str, dict[int, Path]] = {}
    for f in sorted(folder.iterdir()):
        m = pattern.match(f.name)
        if m and f.is_file():
            cases.setdefault(m.group(1), {})[int(m.group(2))] = f
    for case, found in cases.items():
        for index in range(spec.n_channels):
            if index not in found:
                name = f"{case}_{index:04d}{spec.ending}"
                raise DataError(
                    f"{folder / name}: file not found; expected every case to have channels "
                    f"0000..{spec.n_channels - 1:04d} ({NNUNET_FILE} 'channel_names')"
                )
    return cases


def _open_nnunet(root: Path, task: str) -> Layout:
    if task == GENERIC:
        return _open_generic(root, _load_dataset_json(root / NNUNET_FILE))
    return _nnunet_layout(root, task, read_dataset_json(root, task))


def _nnunet_layout(root: Path, task: str, spec: NnUNetSpec) -> Layout:
    def discover() -> Discovery:
        images, labels, test = root / "imagesTr", root / "labelsTr", root / "imagesTs"
        if not images.is_dir():
            raise DataError(f"{images}: folder not found; expected {_NNUNET_HINT}")
        labelled_files = _indexed_cases(images, spec)
        if not labelled_files:
            raise DataError(f"{images}: no <case>_0000{spec.ending} files found; expected {_NNUNET_HINT}")
        label_names = {f.name for f in labels.iterdir()} if labels.is_dir() else set()
        labelled: dict[str, Any] = {}
        for case in labelled_files:
            name = f"{case}{spec.ending}"
            if name not in label_names:
                raise DataError(
                    f"{labels / name}: file not found; expected a label map for each case of {images}"
                )
            labelled[case] = IndexedCase(images, case, spec.channels, spec.ending, labels / name)
        unlabelled: dict[str, Any] = {}
        if test.is_dir():
            for case in _indexed_cases(test, spec):
                if case in labelled:
                    raise DataError(f"{test}: case {case} is also in {images}; expected each case once")
                unlabelled[case] = IndexedCase(test, case, spec.channels, spec.ending)
        return Discovery(labelled=labelled, unlabelled=unlabelled)

    record = {"format": "nnunet", "dataset_json": str(spec.path)}
    return Layout(
        FORMATS["nnunet"], root, task, discover, labels=spec.labels, classes=spec.classes, record=record
    )


register(
    Format(
        name="nnunet",
        title="nnU-Net v2 raw",
        tasks=("brats", "hcp"),
        hint=_NNUNET_HINT,
        detect=lambda root: (root / NNUNET_FILE).is_file(),
        open=_open_nnunet,
    )
)


# ---- any labelled target --------------------------------------------------------------------


def _generic_channels(path: Path, raw: Any) -> tuple[tuple[tuple[str, int], ...], int]:
    """Every channel of a dataset.json, by its own name, in index order."""
    names = _channel_names(path, raw, 'a mapping of channel indices 0..C-1 to names, e.g. {"0": "CT", "1": "PET"}')
    ordered = [names[i] for i in range(len(names))]
    if len({_norm(n) for n in ordered}) != len(ordered):
        raise _json_error(path, "channel_names", raw, "distinct channel names")
    return tuple((name, i) for i, name in enumerate(ordered)), len(ordered)


def _generic_labels(
    path: Path, entries: dict[str, tuple[int, ...]], regions: bool, order: Any
) -> tuple[LabelMapping, LabelScheme]:
    """A dataset's own labels: plain classes → indices 1..K (written back as its values), or
    regions (sets of its values, painted back through ``regions_class_order``)."""
    if not regions:
        classes = {v[0]: n for n, v in entries.items()}
        if len(classes) != len(entries):
            raise DataError(f"{path}: 'labels': a label value is named twice; expected one name per class value")
        ordered = sorted(classes.items())
        read = ((0, 0), *((v, k) for k, (v, _) in enumerate(ordered, start=1)))
        write = tuple((k, v) for k, (v, _) in enumerate(ordered, start=1))
        return LabelMapping(f"nnU-Net {path}", read, write), LabelScheme.plain([n for _, n in ordered])
    names = list(entries)
    if not (isinstance(order, list) and len(order) == len(names) and all(_int(v) for v in order)):
        raise _json_error(
            path, "regions_class_order", order, f"one label value per region {names} (nnU-Net v2's rule for regions)"
        )
    for name, value in zip(names, order, strict=True):
        if value not in entries[name]:
            raise _json_error(path, "regions_class_order", order, f"for each region {names} one of its own label values")
    values = sorted({v for vs in entries.values() for v in vs})
    read = ((0, 0), *((v, v) for v in values))
    scheme = LabelScheme(
        "sigmoid",
        tuple(names),
        tuple(tuple(sorted(entries[n])) for n in names),
        paint=tuple(int(v) for v in order),
        names=tuple((v, f"label {v}") for v in values),
    )
    return LabelMapping(f"nnU-Net {path}", read), scheme


def _load_dataset_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except OSError as exc:
        raise DataError(
            f"{path}: cannot be read ({exc.strerror or exc}); expected an nnU-Net v2 dataset.json"
        ) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not valid JSON ({exc}); expected an nnU-Net v2 dataset.json") from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: got a JSON {type(data).__name__}; expected an object (nnU-Net v2 dataset.json)")
    return data


def _brats_spec(path: Path, data: dict[str, Any]) -> NnUNetSpec | None:
    """The BraTS task's reading of a parsed dataset.json — the four tumour MR channels and
    tumour labels (regions or named labels) — or None where it does not describe BraTS."""
    try:
        return _task_spec(path, data, "brats")
    except DataError:
        return None


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
    data = _load_dataset_json(path)
    regions = isinstance(data.get("labels"), Mapping) and any(
        isinstance(v, (list, tuple)) for v in data["labels"].values()
    )
    if output_mode == "softmax" and regions:
        raise ConfigError(
            f"data.output_mode=softmax: {path} declares regions (lists of label values), which overlap and "
            "need one sigmoid output each; expected auto or sigmoid"
        )
    brats = _brats_spec(path, data) if output_mode != "softmax" else None
    if brats is not None:
        return dataclasses.replace(_nnunet_layout(root, "brats", brats), scheme=BRATS_SCHEME)
    if output_mode == "sigmoid" and not regions:
        raise ConfigError(
            f"data.output_mode=sigmoid: {path} declares plain labels (one value per class), not regions; "
            "expected auto or softmax"
        )
    return _open_generic(root, data)


def _open_generic(root: Path, data: dict[str, Any]) -> Layout:
    path = root / NNUNET_FILE
    ending = _file_ending(path, data)
    channels, n_channels = _generic_channels(path, data["channel_names"])
    entries, regions = _label_entries(path, data["labels"])
    labels, scheme = _generic_labels(path, entries, regions, data.get("regions_class_order"))
    spec = NnUNetSpec(path, channels, n_channels, ending, labels)
    layout = _nnunet_layout(root, GENERIC, spec)
    return dataclasses.replace(layout, channels=tuple(n for n, _ in channels), scheme=scheme)
