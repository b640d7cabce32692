"""Slices for Fig. 3: the parcellation example the forgetting stage saved, and one tumour slice
per portion from the BraTS runs' predicted label maps (:data:`tmerge.runs.PREDICTIONS_DIR`) with
the input image read from the dataset.

Everything that can be absent (an old run without predictions, a dataset moved away) becomes a
note shown in the figure and on the report's main page rather than an error: the report is made from
whatever exists.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from tmerge.data.formats import BRATS2018_GRADES, BRATS2018_TRAINING
from tmerge.errors import DataError
from tmerge.paths import default_dataset
from tmerge.report.figures import ExampleRow
from tmerge.report.paired import SCORE
from tmerge.report.runs import ForgettingRun, RunIndex, TargetRun, config_value
from tmerge.report.tables import Row, row_runs
from tmerge.runs import FORGETTING_EXAMPLES, PREDICTIONS_DIR, SPLITS_FILE

log = logging.getLogger("tmerge")

#: The modality drawn under the tumour labels: FLAIR shows the whole tumour best.
MODALITY = "flair"


def parcellation_rows(forgetting: Sequence[ForgettingRun]) -> tuple[list[ExampleRow], list[str]]:
    """One row per portion and source task from each forgetting folder's example slices
    (:data:`tmerge.runs.FORGETTING_EXAMPLES`)."""
    rows: list[ExampleRow] = []
    notes: list[str] = []
    for run in sorted(forgetting, key=lambda f: f.portion):
        if run.examples is None:
            notes.append(
                f"{run.path}: no {FORGETTING_EXAMPLES} (made by an older `tmerge forgetting`; rerun it)"
            )
            continue
        try:
            with np.load(run.examples, allow_pickle=False) as data:
                meta = json.loads(str(data["meta"]))
                for task in meta["tasks"]:
                    name = task["name"]
                    panels = [(r, data[f"{name}/{r}"]) for r in meta["rows"] if f"{name}/{r}" in data.files]
                    panels.append(("ground truth", data[f"{name}/truth"]))
                    rows.append(
                        ExampleRow(
                            title=f"{run.portion} %: {name}, labels {task['labels']}\n"
                            f"{meta['subject']}, slice {meta['slice']}",
                            image=data[f"{name}/image"],
                            panels=panels,
                            kind="parcellation",
                            class_names=list(task.get("class_names", [])),
                        )
                    )
        except (OSError, KeyError, ValueError) as exc:
            notes.append(f"{run.examples}: unreadable ({type(exc).__name__}: {exc})")
    return rows, notes


def brats_roots(run: TargetRun) -> list[Path]:
    """Where the run's BraTS data may be: its ``data.root``, the root its splits file
    (:data:`tmerge.runs.SPLITS_FILE`) recorded, the embedded default."""
    roots = []
    configured = config_value(run.config, "data.root")
    if configured:
        roots.append(Path(str(configured)).expanduser())
    splits = run.path / SPLITS_FILE
    if splits.is_file():
        try:
            recorded = json.loads(splits.read_text()).get("root")
        except (OSError, json.JSONDecodeError):
            recorded = None
        if recorded:
            roots.append(Path(recorded))
    roots.append(default_dataset("brats"))
    return list(dict.fromkeys(roots))


def subject_folder(run: TargetRun, subject: str) -> Path | None:
    for root in brats_roots(run):
        for grade in BRATS2018_GRADES:  # the BraTS 2018 training layout
            folder = root / BRATS2018_TRAINING / grade / subject
            if folder.is_dir():
                return folder
    return None


def _prediction(run: TargetRun, subject: str) -> Path | None:
    for suffix in (".nii.gz", ".nii"):
        path = run.path / PREDICTIONS_DIR / f"{subject}{suffix}"
        if path.is_file():
            return path
    return None


def median_subject(scores: dict[str, float]) -> str:
    """The subject whose score is the (lower) median: typical, not the best case."""
    ordered = sorted(scores, key=lambda s: (scores[s], s))
    return ordered[(len(ordered) - 1) // 2]


def tumour_row(
    index: RunIndex, row: Row, inits: Sequence[str], reference: str
) -> tuple[ExampleRow | None, list[str]]:
    """One axial slice of one test subject with every initialisation's predicted labels.

    The subject is the one with the median ``reference`` Dice among those every run predicted;
    the slice is the one with the largest tumour area in the ground truth (in the reference's
    prediction if the ground truth is not found). A sweep row shows its first seed.
    """
    from tmerge.data.nifti import find_modality, load_labels, load_volume

    seed = row.seeds[:1] if row.seeds else ()
    runs: dict[str, TargetRun] = {}
    for init in inits:
        found = [r for r in row_runs(index, row, init) if r.seed in (seed or (None,))]
        if found:
            runs[init] = found[0]
    if not runs:
        return None, []
    with_preds = {i: r for i, r in runs.items() if (r.path / PREDICTIONS_DIR).is_dir()}
    label = row.label() + (f" (seed {seed[0]})" if seed else "")
    if not with_preds:
        return None, [
            f"{label}: no {PREDICTIONS_DIR}/ in the runs ({', '.join(runs)}); rerun them to draw tumours"
        ]
    notes = []
    if len(with_preds) < len(runs):
        notes.append(f"{label}: no {PREDICTIONS_DIR}/ in {', '.join(i for i in runs if i not in with_preds)}")
    first = with_preds.get(reference) or next(iter(with_preds.values()))
    candidates = {
        s: v
        for s, v in first.subject_values(SCORE).items()
        if all(_prediction(r, s) for r in with_preds.values())
    }
    if not candidates:
        return None, [*notes, f"{label}: no test subject was predicted by every run"]
    subject = median_subject(candidates)
    try:
        folder = subject_folder(first, subject)
        if folder is None:
            raise DataError(f"{subject}: not found under {', '.join(map(str, brats_roots(first)))}")
        image, _ = load_volume(find_modality(folder, f"{subject}_{MODALITY}"))
        try:
            truth = load_labels(find_modality(folder, f"{subject}_seg"))[0]
        except DataError:
            truth = None
        preds = {i: load_labels(_prediction(r, subject))[0] for i, r in with_preds.items()}  # type: ignore[arg-type]
    except DataError as exc:
        return None, [*notes, f"{label}: {exc}"]
    shapes = {i: p.shape for i, p in preds.items() if p.shape != image.shape}
    if shapes:
        return None, [*notes, f"{label}: prediction shapes {shapes} differ from the image's {image.shape}"]
    guide = truth if truth is not None else preds.get(reference, next(iter(preds.values())))
    k = int(np.count_nonzero(guide, axis=(0, 1)).argmax())
    panels = [(i, p[..., k]) for i, p in preds.items()]
    if truth is not None:
        panels.append(("ground truth", truth[..., k]))
    else:
        notes.append(f"{label}: no {subject}_seg file; ground truth not shown")
    title = f"{label}\n{subject}, slice {k}\n{first.init} Dice {candidates[subject]:.2f}"
    return ExampleRow(title, image[..., k], panels, "brats"), notes


def tumour_rows(
    index: RunIndex, rows: Sequence[Row], inits: Sequence[str], reference: str
) -> tuple[list[ExampleRow], list[str]]:
    """A tumour example per table row with finished runs."""
    out: list[ExampleRow] = []
    notes: list[str] = []
    for row in rows:
        example, row_notes = tumour_row(index, row, inits, reference)
        notes += row_notes
        if example is not None:
            out.append(example)
    return out, notes
