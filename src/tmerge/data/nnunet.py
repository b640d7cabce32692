"""nnU-Net v2 raw datasets: ``dataset.json`` parsed and checked for a task (its ``channel_names``
mapped to the task's channels, its ``labels`` to the task's internal labels) or read as a target
of its own channels and labels, and the ``imagesTr``/``labelsTr``/``imagesTs`` cases listed.

The layout registers in :mod:`tmerge.data.formats` as ``nnunet`` (:data:`NNUNET`), detected by its
``dataset.json``. A little over 400 lines: every check of the one file, for each of its readings,
stays together.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tmerge.data.channels import CHANNEL_ALIASES, TASK_CHANNELS, name_key
from tmerge.data.labels import LabelMapping
from tmerge.data.layout import GENERIC, Discovery, Format, Layout
from tmerge.data.nifti import NIFTI_SUFFIXES
from tmerge.data.schemes import LabelScheme
from tmerge.errors import DataError

NNUNET_FILE = "dataset.json"

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
        hits = [i for i, name in names.items() if name_key(name) in CHANNEL_ALIASES[channel]]
        if len(hits) != 1:
            aliases = ", ".join(sorted(CHANNEL_ALIASES[channel]))
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
        hits = [k for k, aliases in _TUMOUR_NAMES.items() if name_key(name) in aliases]
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
    return _task_spec(path, load_dataset_json(path), task)


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
        return open_generic(root, load_dataset_json(root / NNUNET_FILE))
    return nnunet_layout(root, task, read_dataset_json(root, task))


def nnunet_layout(root: Path, task: str, spec: NnUNetSpec) -> Layout:
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
        NNUNET, root, task, discover, labels=spec.labels, classes=spec.classes, record=record
    )


NNUNET = Format(
    name="nnunet",
    title="nnU-Net v2 raw",
    tasks=("brats", "hcp"),
    hint=_NNUNET_HINT,
    detect=lambda root: (root / NNUNET_FILE).is_file(),
    open=_open_nnunet,
)


# ---- any labelled target --------------------------------------------------------------------


def _generic_channels(path: Path, raw: Any) -> tuple[tuple[tuple[str, int], ...], int]:
    """Every channel of a dataset.json, by its own name, in index order."""
    names = _channel_names(path, raw, 'a mapping of channel indices 0..C-1 to names, e.g. {"0": "CT", "1": "PET"}')
    ordered = [names[i] for i in range(len(names))]
    if len({name_key(n) for n in ordered}) != len(ordered):
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


def load_dataset_json(path: Path) -> dict[str, Any]:
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


def brats_spec(path: Path, data: dict[str, Any]) -> NnUNetSpec | None:
    """The BraTS task's reading of a parsed dataset.json — the four tumour MR channels and
    tumour labels (regions or named labels) — or None where it does not describe BraTS."""
    try:
        return _task_spec(path, data, "brats")
    except DataError:
        return None


def open_generic(root: Path, data: dict[str, Any]) -> Layout:
    path = root / NNUNET_FILE
    ending = _file_ending(path, data)
    channels, n_channels = _generic_channels(path, data["channel_names"])
    entries, regions = _label_entries(path, data["labels"])
    labels, scheme = _generic_labels(path, entries, regions, data.get("regions_class_order"))
    spec = NnUNetSpec(path, channels, n_channels, ending, labels)
    layout = nnunet_layout(root, GENERIC, spec)
    return dataclasses.replace(layout, channels=tuple(n for n, _ in channels), scheme=scheme)
