"""What a dataset layout is: the cases found under a root (:class:`Discovery`), a root opened in
one format for one task (:class:`Layout`) and a format itself (:class:`Format`); the registry of
formats is :mod:`tmerge.data.formats`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tmerge.data.channels import TASK_CHANNELS
from tmerge.data.labels import LabelMapping
from tmerge.data.schemes import LabelScheme

#: The kind of a target dataset that is not BraTS: its channels and labels are its own.
GENERIC = "target"


@dataclass
class Discovery:
    """Cases found under a dataset root: ``id -> handle`` for labelled and unlabelled ones.

    A handle is a case folder (BraTS, HCP) or an :class:`~tmerge.data.nnunet.IndexedCase`
    (nnU-Net); its files come from :func:`tmerge.data.formats.case_files`.
    """

    labelled: dict[str, Any]
    unlabelled: dict[str, Any] = dataclasses.field(default_factory=dict)


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
