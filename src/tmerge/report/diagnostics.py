"""What the runs say about why a merge works or not: the mixing ratios α that ``timm`` and
``mean-timm`` learned (:data:`tmerge.runs.ALPHAS_FILE`) and how far the second source model moved
from the first (``distance_from_init`` in the source's metrics, :data:`tmerge.runs.SOURCE_MARKER`).

The α file holds ``{"sources": [...], "layers": [...], "alphas": {layer: [α per source]}}``
and, from newer runs, ``"trajectory": [{"epoch", "val_loss", "alphas": {layer: [...]}}, ...]``,
α after each adaption epoch. Files without a trajectory are read too. Only the first source's α
is summarised: with two sources the second is 1 − α.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from tmerge.errors import RunError
from tmerge.report.runs import RunIndex, SourceRun, TargetRun
from tmerge.runs import ALPHAS_FILE, SOURCE_MARKER

#: The initialisations that learn α (and so write :data:`tmerge.runs.ALPHAS_FILE`).
ALPHA_INITS: tuple[str, ...] = ("mean-timm", "timm")


@dataclass(frozen=True)
class AlphaSummary:
    """The first source's α over the mixed layers of one run.

    Attributes:
        source: the first source's name ("source 1" where ``sources`` is not recorded).
        n_sources: how many sources were mixed (IMM's uniform α is ``1 / n_sources``).
        n_layers: mixed layers.
        low, high, mean: min, max and mean over layers of the first source's α.
        epochs: adaption epochs in the trajectory; None for an α file without one.
        best_epoch: the trajectory's epoch with the lowest validation loss (None without losses).
    """

    source: str
    n_sources: int
    n_layers: int
    low: float
    high: float
    mean: float
    epochs: int | None
    best_epoch: int | None = None


@dataclass(frozen=True)
class Trajectory:
    """The first source's α per layer after each adaption epoch (``values``: epochs × layers)."""

    source: str
    n_sources: int
    epochs: list[int]
    layers: list[str]
    values: np.ndarray
    val_loss: list[float | None]

    def best_epoch(self) -> int | None:
        """The epoch with the lowest validation loss (the α kept); None without any loss."""
        scored = [
            (loss, e)
            for e, loss in zip(self.epochs, self.val_loss, strict=True)
            if loss is not None and math.isfinite(loss)
        ]
        return min(scored)[1] if scored else None


def _layers(alphas: Mapping[str, Any], where: str) -> list[str]:
    table = alphas.get("alphas") if isinstance(alphas, Mapping) else None
    if not isinstance(table, Mapping) or not table:
        raise RunError(f'{where}: no "alphas" table of layer → [α per source]')
    layers = alphas.get("layers") or list(table)
    missing = [layer for layer in layers if layer not in table]
    if missing:
        raise RunError(f'{where}: "layers" names {missing[0]}, which "alphas" lacks')
    return list(layers)


def _first(values: Any, where: str) -> float:
    """The first source's α of one layer, checked to be a finite number."""
    if not isinstance(values, Sequence) or isinstance(values, str) or not values:
        raise RunError(f"{where}: expected a list of α per source, got {values!r}")
    try:
        alpha = float(values[0])
    except (TypeError, ValueError):
        raise RunError(f"{where}: α {values[0]!r} is not a number") from None
    if not math.isfinite(alpha):
        raise RunError(f"{where}: α is {alpha}")
    return alpha


def first_source_alphas(alphas: Mapping[str, Any], where: str = ALPHAS_FILE) -> dict[str, float]:
    """``layer -> α of the first source`` after the adaption stage, in network order.

    Args:
        alphas: the content of the α file.
        where: the file, for error messages.

    Raises:
        RunError: no ``alphas`` table, a layer named in ``layers`` but not in it, or an entry
            that is not a list of numbers.
    """
    table = (
        alphas["alphas"] if isinstance(alphas, Mapping) and isinstance(alphas.get("alphas"), Mapping) else {}
    )
    return {layer: _first(table[layer], f'{where}: "alphas"["{layer}"]') for layer in _layers(alphas, where)}


def _source(alphas: Mapping[str, Any]) -> tuple[str, int]:
    table = alphas.get("alphas") or {}
    first = next(iter(table.values()), [])
    n_sources = len(first) if isinstance(first, Sequence) else 0
    sources = alphas.get("sources") or []
    return (str(sources[0]) if sources else "source 1"), len(sources) or n_sources


def trajectory(alphas: Mapping[str, Any], where: str = ALPHAS_FILE) -> Trajectory | None:
    """α of the first source per layer over the adaption epochs; None for an older α file
    without ``trajectory`` (or with an empty one).

    Layers are those of the final ``alphas`` table; an epoch lacking one of them gets NaN there.

    Raises:
        RunError: a trajectory entry that is not ``{"epoch", "alphas": {...}}`` (the message
            names ``where``, the file).
    """
    entries = alphas.get("trajectory")
    if not entries:
        return None
    if not isinstance(entries, Sequence) or isinstance(entries, str):
        raise RunError(f'{where}: "trajectory": expected a list of epochs, got {type(entries).__name__}')
    layers = _layers(alphas, where)
    epochs, losses, rows = [], [], []
    for k, entry in enumerate(entries):
        if not isinstance(entry, Mapping) or not isinstance(entry.get("alphas"), Mapping):
            raise RunError(f'{where}: "trajectory"[{k}]: expected {{"epoch", "val_loss", "alphas"}}')
        epoch = entry.get("epoch", k)
        table = entry["alphas"]
        rows.append(
            [
                _first(table[layer], f'{where}: "trajectory"[{k}]["alphas"]["{layer}"]')
                if layer in table
                else math.nan
                for layer in layers
            ]
        )
        loss = entry.get("val_loss")
        try:
            epochs.append(int(epoch))
            losses.append(float(loss) if loss is not None else None)
        except (TypeError, ValueError):
            raise RunError(
                f'{where}: "trajectory"[{k}]: epoch {epoch!r} or val_loss {loss!r} is not a number'
            ) from None
    source, n_sources = _source(alphas)
    return Trajectory(source, n_sources, epochs, layers, np.array(rows, dtype=np.float64), losses)


def summarise_alphas(alphas: Mapping[str, Any], where: str = ALPHAS_FILE) -> AlphaSummary:
    """Min, max and mean over layers of the first source's α, and the trajectory's length.

    Raises:
        RunError: the α file (``where``) not in the expected form (see
            :func:`first_source_alphas` and :func:`trajectory`).
    """
    first = list(first_source_alphas(alphas, where).values())
    path = trajectory(alphas, where)
    source, n_sources = _source(alphas)
    return AlphaSummary(
        source=source,
        n_sources=n_sources,
        n_layers=len(first),
        low=min(first),
        high=max(first),
        mean=statistics.fmean(first),
        epochs=None if path is None else len(path.epochs),
        best_epoch=None if path is None else path.best_epoch(),
    )


def alpha_runs(index: RunIndex) -> list[TargetRun]:
    """The finished runs of :data:`ALPHA_INITS`, by portion, seed (single layout first) and init."""
    return [r for r in index.usable() if r.init in ALPHA_INITS]


def trajectory_run(index: RunIndex, portion: int, init: str) -> TargetRun | None:
    """The run whose trajectory Fig. 5b draws for ``portion``: the single-seed run, else the
    lowest seed of the sweep, among finished runs with an α file that has a trajectory."""
    candidates = [
        r
        for r in index.usable()
        if r.portion == portion
        and r.init == init
        and isinstance(r.alphas, Mapping)
        and r.alphas.get("trajectory")
    ]
    candidates.sort(key=lambda r: (r.seed is not None, r.seed or 0))
    return candidates[0] if candidates else None


# ---- sources -------------------------------------------------------------------------------

#: The summary keys of ``distance_from_init`` (``tmerge.merge.distance.summarise_distances``).
DISTANCE_KEYS: tuple[str, ...] = tuple(
    f"{key}_{stat}" for key in ("rel_distance", "cosine") for stat in ("min", "median", "max")
)


@dataclass(frozen=True)
class DistanceSummary:
    """``distance_from_init`` of one source run: per-layer ‖θ − θ_from‖/‖θ_from‖ and cosine."""

    source: str
    start: str  # the run it was trained from ("task1")
    n_layers: int
    rel_distance: tuple[float, float, float]  # min, median, max over layers
    cosine: tuple[float, float, float]


def distance_summary(run: SourceRun) -> DistanceSummary | None:
    """The run's ``distance_from_init``; None when absent or null (a run trained from scratch, or
    metrics written before it was recorded).

    Where a summary key is missing it is computed from ``per_layer`` (median: the middle value,
    or the mean of the two middle ones).

    Raises:
        RunError: ``distance_from_init`` present but neither summarised nor with ``per_layer``
            (the message names the run's metrics file).
    """
    where = run.path / SOURCE_MARKER
    block = (run.metrics or {}).get("distance_from_init")
    if not block:
        return None
    if not isinstance(block, Mapping):
        raise RunError(f"{where}: distance_from_init: expected an object, got {block!r}")
    per_layer = block.get("per_layer") or {}
    values = {}
    for key in ("rel_distance", "cosine"):
        given = [block.get(f"{key}_{stat}") for stat in ("min", "median", "max")]
        try:
            if all(v is not None for v in given):
                values[key] = tuple(float(v) for v in given)  # type: ignore[arg-type]
                continue
            column = [float(v[key]) for v in per_layer.values() if isinstance(v, Mapping) and key in v]
        except (TypeError, ValueError) as exc:
            raise RunError(f"{where}: distance_from_init: {key} is not a number ({exc})") from None
        if not column:
            raise RunError(f"{where}: distance_from_init: no {key}_min/median/max and no per_layer {key}")
        values[key] = (min(column), statistics.median(column), max(column))
    return DistanceSummary(
        source=run.name,
        start=str(block.get("from") or "?"),
        n_layers=len(per_layer),
        rel_distance=values["rel_distance"],  # type: ignore[arg-type]
        cosine=values["cosine"],  # type: ignore[arg-type]
    )


def per_source_alphas(alphas: Mapping[str, Any]) -> dict[str, tuple[float, float]] | None:
    """Per source: ``(mean α over the layers, share of layers where its α is the largest)``, from
    an α file's ``sources`` and ``alphas`` (layer → one α per source); None where the file does
    not have that form. The reading of the negative control (``sources=[…, noise]``): a source
    that knows nothing should get a small mean and few layers."""
    names, table = alphas.get("sources"), alphas.get("alphas")
    if not isinstance(names, list) or not isinstance(table, Mapping) or not table:
        return None
    rows = [list(v) for v in table.values()]
    if any(len(r) != len(names) for r in rows):
        return None
    out = {}
    for t, name in enumerate(names):
        mean = statistics.fmean(float(r[t]) for r in rows)
        top = sum(1 for r in rows if max(range(len(r)), key=lambda k: r[k]) == t) / len(rows)
        out[str(name)] = (mean, top)
    return out
