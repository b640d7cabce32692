"""Finding and reading the run folders a report is made of.

The layout and every file name are those of :mod:`tmerge.runs`:

* BraTS runs, single-seed and sweeps over ``seeds=[…]`` (:func:`tmerge.runs.target_dir`);
  finished once their marker (:data:`tmerge.runs.TARGET_MARKER`, written last) exists, otherwise
  listed as unfinished and never used;
* source runs ``<runs>/<name>/`` (``task1``, ``task2``, ``all-hcp*``), finished once their
  marker (:data:`tmerge.runs.SOURCE_MARKER`) exists;
* forgetting tables and example slices (:func:`tmerge.runs.forgetting_dir`).

The per-subject CSV must have the columns of :func:`tmerge.evaluate.score_columns`; a file in
another format makes its run unusable, with the file and the expected columns named. The voxel
counts beside it (:data:`tmerge.runs.REGIONS_FILE`, ``subject,truth_<c>…,pred_<c>…``) are
optional: runs written before it existed have none, and an unreadable one is warned about and
left out, the run staying usable.

One file of ~480 lines on purpose: the readers of a run folder's scores, config and summaries
share one record (:class:`TargetRun`) and one index; splitting them would split that record.
"""

from __future__ import annotations

import csv
import functools
import json
import logging
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tmerge.data.labels import REGIONS
from tmerge.errors import RunError
from tmerge.evaluate import score_columns
from tmerge.runs import (
    ALPHAS_FILE,
    CONFIG_FILE,
    FORGETTING_DIR,
    FORGETTING_EXAMPLES,
    FORGETTING_TABLE,
    NOT_SOURCES,
    PER_SUBJECT_FILE,
    REGIONS_FILE,
    RUN_FILE,
    SOURCE_MARKER,
    STAGES_FILE,
    TARGET_MARKER,
    TARGETS_DIR,
    is_finished,
    target_root,
)

log = logging.getLogger("tmerge")

#: Per-subject CSV columns (after ``subject``): Dice and HD95 of the tumour regions.
SCORE_COLUMNS: tuple[str, ...] = tuple(score_columns(REGIONS))

#: The scoring of runs whose config predates ``metrics.*``: MONAI's directed HD95, brats2018 rules.
LEGACY_SCORING = ("directed", "brats2018")
UNKNOWN_SCORING = ("unknown", "unknown")

SINGLE = "single"  # target_dir(runs, portion, init)
SWEEP = "sweep"  # target_dir(runs, portion, init, seed)


@functools.cache
def init_order() -> tuple[str, ...]:
    """Initialisations in the order of the paper's Table 2 (columns): that of the registry
    :data:`tmerge.stages.inits.INITS`; others found on disk follow.

    Imported on first use: the registry pulls in Lightning, which reading run folders does not
    need.
    """
    from tmerge.stages.inits import INITS

    return tuple(INITS)


@dataclass
class TargetRun:
    """One BraTS run folder and what could be read from it.

    ``per_subject`` maps subject ID → column (``SCORE_COLUMNS``) → value; it is empty unless the
    run is finished. ``regions`` maps subject ID → ``truth_<c>``/``pred_<c>`` → voxel count, from
    :data:`tmerge.runs.REGIONS_FILE`; None where the run has no such file (or an unusable one).
    ``problem`` says why a run folder that looks finished could not be used.
    """

    path: Path
    portion: int
    init: str
    seed: int | None  # None: the single-seed layout
    finished: bool = False
    problem: str | None = None
    summary: dict[str, Any] = field(default_factory=dict)
    per_subject: dict[str, dict[str, float]] = field(default_factory=dict)
    regions: dict[str, dict[str, float]] | None = None
    stages: dict[str, Any] | None = None
    alphas: dict[str, Any] | None = None
    config: dict[str, Any] | None = None
    info: dict[str, Any] | None = None  # tmerge.runs.RUN_FILE
    warnings: list[str] = field(default_factory=list)

    @property
    def group(self) -> str:
        return SINGLE if self.seed is None else SWEEP

    @property
    def usable(self) -> bool:
        return self.finished and self.problem is None

    def status(self) -> str:
        if not self.finished:
            return f"unfinished (no {TARGET_MARKER})"
        return f"unusable: {self.problem}" if self.problem else "finished"

    def subject_values(self, column: str) -> dict[str, float]:
        """``subject -> value`` of one per-subject column."""
        return {s: row[column] for s, row in self.per_subject.items()}

    def records(self) -> list[dict[str, Any]]:
        """One record per subject, sorted by ID: ``subject``, the per-subject scores and, where
        ``regions`` was read, the voxel counts (the records of
        :func:`tmerge.report.endpoints.endpoints`)."""
        regions = self.regions or {}
        return [{"subject": s, **self.per_subject[s], **regions.get(s, {})} for s in sorted(self.per_subject)]

    def scoring(self) -> tuple[str, str]:
        """``(HD95 definition, empty-region convention)`` of the run's test scores, from its
        ``metrics.*`` config. A config without ``metrics`` was written before those keys existed,
        when HD95 was MONAI's directed one under the brats2018 rules (:data:`LEGACY_SCORING`);
        without a config: ``("unknown", "unknown")``."""
        if self.config is None:
            return UNKNOWN_SCORING
        hd95 = config_value(self.config, "metrics.hd95")
        convention = config_value(self.config, "metrics.convention")
        return (str(hd95 or LEGACY_SCORING[0]), str(convention or LEGACY_SCORING[1]))


@dataclass
class SourceRun:
    """A source-model run folder (``task1``, ``task2``, ``all-hcp*``)."""

    path: Path
    name: str
    finished: bool
    metrics: dict[str, Any] | None = None
    config: dict[str, Any] | None = None
    info: dict[str, Any] | None = None


@dataclass
class ForgettingRun:
    """A forgetting folder (:func:`tmerge.runs.forgetting_dir`): Table 4 and, if written, the
    example slices."""

    path: Path
    portion: int
    table: dict[str, dict[str, float]] | None
    examples: Path | None


@dataclass
class RunIndex:
    """Every run folder found under a runs root."""

    root: Path
    targets: list[TargetRun] = field(default_factory=list)
    target: str = TARGETS_DIR  # whose runs: "brats" or another target's name (tmerge.runs.target_root)
    classes: tuple[str, ...] = REGIONS  # the scored classes / regions of its per-subject files
    sources: list[SourceRun] = field(default_factory=list)
    forgetting: list[ForgettingRun] = field(default_factory=list)

    def usable(self) -> list[TargetRun]:
        return [r for r in self.targets if r.usable]

    def portions(self) -> list[int]:
        return sorted({r.portion for r in self.targets})

    def find(self, portion: int, init: str, seed: int | None) -> TargetRun | None:
        for r in self.targets:
            if (r.portion, r.init, r.seed) == (portion, init, seed):
                return r
        return None

    def seeds(self, portion: int) -> list[int]:
        """Seeds of the sweep folders of ``portion`` (any init, finished or not)."""
        return sorted({r.seed for r in self.targets if r.portion == portion and r.seed is not None})


def init_sort_key(init: str) -> tuple[int, str]:
    """Order initialisations as in the paper's Table 2, unknown ones last and alphabetically."""
    order = init_order()
    return (order.index(init), "") if init in order else (len(order), init)


def ordered_inits(inits: Iterable[str]) -> list[str]:
    return sorted(set(inits), key=init_sort_key)


def _number(text: str | None) -> float:
    """A CSV cell as float: empty → NaN; ``nan``/``inf`` as written by Python."""
    if text is None or text.strip() == "":
        return math.nan
    return float(text)


def csv_classes(path: Path) -> tuple[str, ...] | None:
    """The scored classes of a per-subject CSV, from its header (``dice_<c>`` columns, in order);
    None if the file cannot be read."""
    try:
        header = path.read_text().splitlines()[0].split(",")
    except (OSError, IndexError):
        return None
    return tuple(c.removeprefix("dice_") for c in header if c.startswith("dice_") and c != "dice_mean")


def read_per_subject(
    path: Path, columns: tuple[str, ...] = SCORE_COLUMNS
) -> dict[str, dict[str, float]]:
    """Read a run's per-subject CSV (:data:`tmerge.runs.PER_SUBJECT_FILE`).

    Returns:
        ``subject -> column -> value``; ``columns``: :data:`SCORE_COLUMNS` (BraTS) or another
        target's :func:`tmerge.evaluate.score_columns`.

    Raises:
        RunError: missing file, a header without the expected columns, a non-numeric value or a
            repeated subject.
    """
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise RunError(f"{path}: file not found") from None
    reader = csv.DictReader(text.splitlines())
    if not {"subject", *columns} <= set(reader.fieldnames or []):
        raise RunError(
            f"{path}: expected columns subject,{','.join(columns)}, got {','.join(reader.fieldnames or [])}"
        )
    return _subject_rows(path, reader, columns)


def _subject_rows(
    path: Path, reader: csv.DictReader, columns: Sequence[str], check: Any = None
) -> dict[str, dict[str, float]]:
    """``subject -> column -> value`` of a per-subject CSV's rows; ``check(line, values)`` may
    refuse a row. Raises :class:`RunError` on a repeated subject or a cell that is no number."""
    rows: dict[str, dict[str, float]] = {}
    for line, row in enumerate(reader, start=2):
        subject = row["subject"]
        if subject in rows:
            raise RunError(f"{path}: subject {subject} appears twice (line {line})")
        try:
            values = {c: _number(row[c]) for c in columns}
        except ValueError as exc:
            raise RunError(f"{path}: line {line}: not a number ({exc})") from None
        if check is not None:
            check(line, values)
        rows[subject] = values
    return rows


def read_regions(path: Path) -> dict[str, dict[str, float]]:
    """Read a run's voxel counts (:data:`tmerge.runs.REGIONS_FILE`).

    Returns:
        ``subject -> {"truth_<c>": count, "pred_<c>": count}`` for the classes c of its header.

    Raises:
        RunError: missing file, a header without ``subject`` or whose ``truth_<c>`` and
            ``pred_<c>`` columns do not pair up, a count that is not a number ≥ 0, a repeated
            subject.
    """
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise RunError(f"{path}: file not found") from None
    reader = csv.DictReader(text.splitlines())
    fields = list(reader.fieldnames or [])
    truth = [f[len("truth_") :] for f in fields if f.startswith("truth_")]
    pred = [f[len("pred_") :] for f in fields if f.startswith("pred_")]
    if "subject" not in fields or not truth or truth != pred:
        raise RunError(
            f"{path}: expected columns subject,truth_<c>…,pred_<c>… for the same classes, got {','.join(fields)}"
        )
    columns = [*(f"truth_{c}" for c in truth), *(f"pred_{c}" for c in pred)]

    def counts(line: int, values: dict[str, float]) -> None:
        bad = [c for c, v in values.items() if not (math.isfinite(v) and v >= 0)]
        if bad:
            raise RunError(f"{path}: line {line}: {bad[0]} must be a voxel count >= 0, got {values[bad[0]]}")

    return _subject_rows(path, reader, columns, counts)


def _read_regions(run: TargetRun) -> None:
    """Set ``run.regions`` from its optional counts file; a file that cannot be used is a warning."""
    path = run.path / REGIONS_FILE
    if not path.is_file():
        return
    try:
        regions = read_regions(path)
    except RunError as exc:
        run.warnings.append(f"{REGIONS_FILE} not used: {exc}")
        return
    columns = next(iter(run.per_subject.values()), {})
    classes = {k[len("dice_") :] for k in columns if k.startswith("dice_") and k != "dice_mean"}
    counted = {k[len("truth_") :] for row in regions.values() for k in row if k.startswith("truth_")}
    if set(regions) != set(run.per_subject) or not classes <= counted:
        run.warnings.append(
            f"{REGIONS_FILE} not used: its subjects or classes ({len(regions)} subjects, "
            f"{','.join(sorted(counted))}) are not those of {PER_SUBJECT_FILE} ({len(run.per_subject)} "
            f"subjects, {','.join(sorted(classes))})"
        )
        return
    run.regions = regions


def _read_optional_json(path: Path, run: TargetRun | None = None) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        if run is not None:
            run.warnings.append(f"{path.name} unreadable ({exc})")
        log.warning("report: %s is not readable JSON (%s); ignored", path, exc)
        return None


def read_config(path: Path) -> dict[str, Any] | None:
    """The resolved config of a run (:data:`tmerge.runs.CONFIG_FILE`) as a plain dict (None if
    absent or unreadable)."""
    if not path.is_file():
        return None
    from omegaconf import OmegaConf

    try:
        return OmegaConf.to_container(OmegaConf.load(path), resolve=False)  # type: ignore[return-value]
    except Exception as exc:  # YAML errors come in several types; a report should go on
        log.warning("report: %s is not readable YAML (%s); ignored", path, exc)
        return None


def config_value(config: dict[str, Any] | None, key: str) -> Any:
    """``config["a"]["b"]`` for ``key="a.b"``; None where any part is missing."""
    node: Any = config
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


# Per-subject means may differ from the summary's by float rounding only.
_SUMMARY_TOLERANCE = 1e-6


def read_target(
    path: Path, portion: int, init: str, seed: int | None, columns: tuple[str, ...] = SCORE_COLUMNS
) -> TargetRun:
    """Read one target run folder (``columns``: its per-subject columns); an unfinished or
    unreadable run is returned marked as such."""
    run = TargetRun(path=path, portion=portion, init=init, seed=seed)
    run.config = read_config(path / CONFIG_FILE)
    run.info = _read_optional_json(path / RUN_FILE, run)
    run.finished = is_finished(path, TARGET_MARKER)
    if not run.finished:
        return run
    try:
        run.summary = json.loads((path / TARGET_MARKER).read_text())
        run.per_subject = read_per_subject(path / PER_SUBJECT_FILE, columns)
    except (OSError, json.JSONDecodeError) as exc:
        run.problem = f"{TARGET_MARKER} unreadable ({exc})"
    except RunError as exc:
        run.problem = str(exc)
    if run.problem is None and not run.per_subject:
        run.problem = f"{path / PER_SUBJECT_FILE}: no subjects"
    run.stages = _read_optional_json(path / STAGES_FILE, run)
    run.alphas = _read_optional_json(path / ALPHAS_FILE, run)
    if run.problem is None:
        _check_summary(run)
        _read_regions(run)
    else:
        log.warning("report: %s is not used: %s", path, run.problem)
    return run


def _check_summary(run: TargetRun) -> None:
    """Note where the summary (the marker) disagrees with the per-subject CSV (the CSV is used)."""
    n = run.summary.get("n")
    if n is not None and n != len(run.per_subject):
        run.warnings.append(f"{TARGET_MARKER} says n={n}, {PER_SUBJECT_FILE} has {len(run.per_subject)}")
    for region, value in run.summary.get("dice", {}).items():
        column = f"dice_{region}"
        values = [v for v in run.subject_values(column).values() if math.isfinite(v)]
        if value is None or not values:
            continue
        mean = sum(values) / len(values)
        if abs(mean - value) > _SUMMARY_TOLERANCE:
            run.warnings.append(
                f"{TARGET_MARKER} Dice {region} {value:.4f} ≠ per-subject mean {mean:.4f} (the CSV is used)"
            )


def _portion(name: str) -> int | None:
    match = re.fullmatch(r"p(\d+)", name)
    return int(match.group(1)) if match else None


def _seed(name: str) -> int | None:
    match = re.fullmatch(r"seed(\d+)", name)
    return int(match.group(1)) if match else None


def _subdirs(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.is_dir()) if path.is_dir() else []


def _target_classes(base: Path, target: str) -> tuple[str, ...]:
    """A target's scored classes: BraTS' regions, else those of its first finished run's CSV."""
    if target == TARGETS_DIR:
        return REGIONS
    for marker in sorted(base.rglob(TARGET_MARKER)):
        found = csv_classes(marker.parent / PER_SUBJECT_FILE)
        if found:
            return found
    return ()


def discover(root: Path, target: str = TARGETS_DIR) -> RunIndex:
    """Every run folder of ``target`` (BraTS by default; :func:`tmerge.runs.target_root`), every
    source run folder under ``root`` and, for BraTS, every forgetting folder."""
    base = target_root(root, target)
    classes = _target_classes(base, target)
    columns = tuple(score_columns(classes)) if classes else SCORE_COLUMNS
    index = RunIndex(root=root, target=target, classes=classes or REGIONS)
    for pdir in _subdirs(base):
        portion = _portion(pdir.name)
        if portion is None:
            log.info("report: %s is not a p<portion> folder; skipped", pdir)
            continue
        for child in _subdirs(pdir):
            seed = _seed(child.name)
            folders = [(child, None)] if seed is None else [(d, seed) for d in _subdirs(child)]
            for folder, s in folders:
                # A run writes its config first; a folder without it is no run (and shows as missing).
                if (folder / CONFIG_FILE).is_file() or is_finished(folder, TARGET_MARKER):
                    index.targets.append(read_target(folder, portion, folder.name, s, columns))
    index.targets.sort(key=lambda r: (r.portion, r.seed is not None, r.seed or 0, init_sort_key(r.init)))
    for folder in _subdirs(root):
        if folder.name in NOT_SOURCES or folder.name.startswith("."):
            continue
        if not any((folder / f).is_file() for f in (SOURCE_MARKER, CONFIG_FILE)):
            continue  # not a run folder
        index.sources.append(
            SourceRun(
                path=folder,
                name=folder.name,
                finished=is_finished(folder, SOURCE_MARKER),
                metrics=_read_optional_json(folder / SOURCE_MARKER),
                config=read_config(folder / CONFIG_FILE),
                info=_read_optional_json(folder / RUN_FILE),
            )
        )
    # Table 4 is of the BraTS runs' T-IMM α: another target's report has no forgetting.
    for fdir in _subdirs(root / FORGETTING_DIR) if target == TARGETS_DIR else []:
        portion = _portion(fdir.name)
        if portion is None:
            continue
        examples = fdir / FORGETTING_EXAMPLES
        index.forgetting.append(
            ForgettingRun(
                path=fdir,
                portion=portion,
                table=_read_optional_json(fdir / FORGETTING_TABLE),
                examples=examples if examples.is_file() else None,
            )
        )
    return index
