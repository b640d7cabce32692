"""Finding and reading the run folders a report is made of.

Layout (see :mod:`tmerge.stages.target` and :mod:`tmerge.stages.source`):

* BraTS runs ``<runs>/brats/p<portion>/<init>/`` (single seed) and
  ``<runs>/brats/p<portion>/seed<k>/<init>/`` (sweeps over ``seeds=[…]``); finished once
  ``test_summary.json`` exists (it is written last), otherwise listed as unfinished and never used;
* source runs ``<runs>/<name>/`` (``task1``, ``task2``, ``all-hcp*``), finished once
  ``metrics.json`` exists;
* forgetting tables ``<runs>/forgetting/p<portion>/table4.json`` (and ``examples.npz``).

Runs written before the per-subject CSV gained HD95 (columns ``subject,ET,TC,WT``, summary
``{"ET", "TC", "WT", "mean", "n"}``) are read too, with their Dice mapped to the current names
and HD95 left missing.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tmerge.errors import RunError

log = logging.getLogger("tmerge")

#: Tumour regions, in the paper's order.
REGIONS: tuple[str, ...] = ("ET", "TC", "WT")
#: Initialisations in the order of the paper's Table 2 (columns); others found on disk follow.
INIT_ORDER: tuple[str, ...] = (
    "none",
    "m1",
    "m2",
    "imm",
    "mean-imm",
    "mean-timm",
    "timm",
    "task-arithmetic",
    "ties",
    "dare",
    "dare-ties",
    "slerp",
    "all-hcp",
    "all-hcp-1-7",
    "all-hcp-8-14",
)
#: Per-subject CSV columns of the current format (after ``subject``).
SCORE_COLUMNS: tuple[str, ...] = (
    *(f"dice_{r}" for r in REGIONS),
    "dice_mean",
    *(f"hd95_{r}" for r in REGIONS),
)
#: The file a BraTS run writes last (``tmerge.stages.target.MARKER``); without it a run is unfinished.
TARGET_MARKER = "test_summary.json"
#: The file a source run writes last.
SOURCE_MARKER = "metrics.json"
# Top-level folders of the runs root that are not source runs.
_NOT_SOURCES = {"brats", "forgetting", "report", "wandb", "lightning_logs"}

SINGLE = "single"  # runs/brats/p<portion>/<init>
SWEEP = "sweep"  # runs/brats/p<portion>/seed<k>/<init>


@dataclass
class TargetRun:
    """One BraTS run folder and what could be read from it.

    ``per_subject`` maps subject ID → column (``SCORE_COLUMNS``) → value; it is empty unless the
    run is finished. ``problem`` says why a run folder that looks finished could not be used.
    """

    path: Path
    portion: int
    init: str
    seed: int | None  # None: the single-seed layout
    finished: bool = False
    problem: str | None = None
    legacy: bool = False  # the pre-HD95 CSV format
    summary: dict[str, Any] = field(default_factory=dict)
    per_subject: dict[str, dict[str, float]] = field(default_factory=dict)
    stages: dict[str, Any] | None = None
    alphas: dict[str, Any] | None = None
    config: dict[str, Any] | None = None
    info: dict[str, Any] | None = None  # run.json
    warnings: list[str] = field(default_factory=list)

    @property
    def group(self) -> str:
        return SINGLE if self.seed is None else SWEEP

    @property
    def usable(self) -> bool:
        return self.finished and self.problem is None

    def status(self) -> str:
        if not self.finished:
            return "unfinished (no test_summary.json)"
        return f"unusable: {self.problem}" if self.problem else "finished"

    def subject_values(self, column: str) -> dict[str, float]:
        """``subject -> value`` of one per-subject column."""
        return {s: row[column] for s, row in self.per_subject.items()}


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
    """``runs/forgetting/p<portion>/``: Table 4 and, if written, the example slices."""

    path: Path
    portion: int
    table: dict[str, dict[str, float]] | None
    examples: Path | None


@dataclass
class RunIndex:
    """Every run folder found under a runs root."""

    root: Path
    targets: list[TargetRun] = field(default_factory=list)
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
    return (INIT_ORDER.index(init), "") if init in INIT_ORDER else (len(INIT_ORDER), init)


def ordered_inits(inits: Iterable[str]) -> list[str]:
    return sorted(set(inits), key=init_sort_key)


def _number(text: str | None) -> float:
    """A CSV cell as float: empty → NaN; ``nan``/``inf`` as written by Python."""
    if text is None or text.strip() == "":
        return math.nan
    return float(text)


def read_per_subject(path: Path) -> tuple[dict[str, dict[str, float]], bool]:
    """Read ``test_per_subject.csv``.

    Returns:
        ``(subject -> column -> value, legacy)``: columns are :data:`SCORE_COLUMNS`; a legacy
        file (``subject,ET,TC,WT``) gets ``dice_mean`` as the mean of its three Dice and NaN HD95.

    Raises:
        RunError: missing file, unknown header, a non-numeric value or a repeated subject.
    """
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise RunError(f"{path}: file not found") from None
    reader = csv.DictReader(text.splitlines())
    header = set(reader.fieldnames or [])
    legacy = "dice_mean" not in header
    needed = {"subject", *REGIONS} if legacy else {"subject", *SCORE_COLUMNS}
    if not needed <= header:
        raise RunError(
            f"{path}: expected columns subject,{','.join(SCORE_COLUMNS)}, got {','.join(reader.fieldnames or [])}"
        )
    rows: dict[str, dict[str, float]] = {}
    for line, row in enumerate(reader, start=2):
        subject = row["subject"]
        if subject in rows:
            raise RunError(f"{path}: subject {subject} appears twice (line {line})")
        try:
            if legacy:
                dice = {f"dice_{r}": _number(row[r]) for r in REGIONS}
                values = {
                    **dice,
                    "dice_mean": sum(dice.values()) / len(REGIONS),
                    **{f"hd95_{r}": math.nan for r in REGIONS},
                }
            else:
                values = {c: _number(row[c]) for c in SCORE_COLUMNS}
        except ValueError as exc:
            raise RunError(f"{path}: line {line}: not a number ({exc})") from None
        rows[subject] = values
    return rows, legacy


def normalise_summary(summary: dict[str, Any]) -> dict[str, Any]:
    """``test_summary.json`` in the current form ``{"n", "dice": {…}, "hd95": {…}}``."""
    if "dice" in summary:
        return summary
    return {
        "n": summary.get("n"),
        "dice": {k: summary[k] for k in (*REGIONS, "mean") if k in summary},
        "hd95": {},
    }


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
    """The resolved ``config.yaml`` of a run as a plain dict (None if absent or unreadable)."""
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


def read_target(path: Path, portion: int, init: str, seed: int | None) -> TargetRun:
    """Read one BraTS run folder; an unfinished or unreadable run is returned marked as such."""
    run = TargetRun(path=path, portion=portion, init=init, seed=seed)
    run.config = read_config(path / "config.yaml")
    run.info = _read_optional_json(path / "run.json", run)
    run.finished = (path / TARGET_MARKER).is_file()
    if not run.finished:
        return run
    try:
        summary = json.loads((path / TARGET_MARKER).read_text())
        run.summary = normalise_summary(summary)
        run.per_subject, run.legacy = read_per_subject(path / "test_per_subject.csv")
    except (OSError, json.JSONDecodeError) as exc:
        run.problem = f"{TARGET_MARKER} unreadable ({exc})"
    except RunError as exc:
        run.problem = str(exc)
    if run.problem is None and not run.per_subject:
        run.problem = f"{path / 'test_per_subject.csv'}: no subjects"
    run.stages = _read_optional_json(path / "stages.json", run)
    run.alphas = _read_optional_json(path / "alphas.json", run)
    if run.problem is None:
        _check_summary(run)
    else:
        log.warning("report: %s is not used: %s", path, run.problem)
    return run


def _check_summary(run: TargetRun) -> None:
    """Note where ``test_summary.json`` disagrees with the per-subject CSV (the CSV is used)."""
    n = run.summary.get("n")
    if n is not None and n != len(run.per_subject):
        run.warnings.append(f"test_summary.json says n={n}, test_per_subject.csv has {len(run.per_subject)}")
    for region, value in run.summary.get("dice", {}).items():
        column = f"dice_{region}"
        values = [v for v in run.subject_values(column).values() if math.isfinite(v)]
        if value is None or not values:
            continue
        mean = sum(values) / len(values)
        if abs(mean - value) > _SUMMARY_TOLERANCE:
            run.warnings.append(
                f"test_summary.json Dice {region} {value:.4f} ≠ per-subject mean {mean:.4f} (the CSV is used)"
            )


def _portion(name: str) -> int | None:
    match = re.fullmatch(r"p(\d+)", name)
    return int(match.group(1)) if match else None


def _seed(name: str) -> int | None:
    match = re.fullmatch(r"seed(\d+)", name)
    return int(match.group(1)) if match else None


def _subdirs(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.is_dir()) if path.is_dir() else []


def discover(root: Path) -> RunIndex:
    """Every BraTS, source and forgetting run folder under ``root``."""
    index = RunIndex(root=root)
    for pdir in _subdirs(root / "brats"):
        portion = _portion(pdir.name)
        if portion is None:
            log.info("report: %s is not a p<portion> folder; skipped", pdir)
            continue
        for child in _subdirs(pdir):
            seed = _seed(child.name)
            folders = [(child, None)] if seed is None else [(d, seed) for d in _subdirs(child)]
            for folder, s in folders:
                # A run writes config.yaml first; a folder without it is no run (and shows as missing).
                if (folder / "config.yaml").is_file() or (folder / TARGET_MARKER).is_file():
                    index.targets.append(read_target(folder, portion, folder.name, s))
    index.targets.sort(key=lambda r: (r.portion, r.seed is not None, r.seed or 0, init_sort_key(r.init)))
    for folder in _subdirs(root):
        if folder.name in _NOT_SOURCES or folder.name.startswith("."):
            continue
        if not any((folder / f).is_file() for f in (SOURCE_MARKER, "config.yaml")):
            continue  # not a run folder
        index.sources.append(
            SourceRun(
                path=folder,
                name=folder.name,
                finished=(folder / SOURCE_MARKER).is_file(),
                metrics=_read_optional_json(folder / SOURCE_MARKER),
                config=read_config(folder / "config.yaml"),
                info=_read_optional_json(folder / "run.json"),
            )
        )
    for fdir in _subdirs(root / "forgetting"):
        portion = _portion(fdir.name)
        if portion is None:
            continue
        examples = fdir / "examples.npz"
        index.forgetting.append(
            ForgettingRun(
                path=fdir,
                portion=portion,
                table=_read_optional_json(fdir / "table4.json"),
                examples=examples if examples.is_file() else None,
            )
        )
    return index
