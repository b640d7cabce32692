"""The paper's figures, drawn with matplotlib (Agg) from data prepared elsewhere in the report:

* Fig. 3 — one axial slice per method, predicted labels over the image
  (:func:`plot_examples`);
* Fig. 4 — per-subject Dice difference T-IMM − other, subjects sorted by T-IMM's Dice
  (:func:`plot_paired`);
* Fig. 5 — learned α per layer and source model (:func:`plot_alphas`);
* Fig. 5b — α of the first source per layer over the adaption epochs
  (:func:`plot_alpha_trajectory`).

A figure with nothing to show is still written, saying what is missing, so that the links of
the report's main page always resolve. Files are written atomically.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never a display

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

from tmerge.io import atomic_path  # noqa: E402

DPI = 120
#: BraTS labels and their usual colours (1 necrotic/non-enhancing core, 2 oedema, 4 enhancing).
BRATS_LABELS: dict[int, tuple[str, str]] = {
    1: ("NCR/NET", "#e41a1c"),
    2: ("oedema", "#4daf4a"),
    4: ("enhancing", "#ffd92f"),
}


def save_figure(fig: Figure, path: Path) -> Path:
    """Write ``fig`` as PNG atomically and close it."""
    with atomic_path(path) as tmp:
        # The temporary name does not end in .png: say the format.
        fig.savefig(tmp, format="png", dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return path


def _empty(fig: Figure, message: str) -> None:
    ax = fig.add_subplot(1, 1, 1)
    ax.axis("off")
    ax.text(0.5, 0.5, message, ha="center", va="center", wrap=True, fontsize=11)


# ---- Fig. 4 --------------------------------------------------------------------------------


@dataclass
class PairedPanel:
    """One panel of Fig. 4: the reference's per-subject scores and, per other initialisation,
    ``subject -> reference − other`` with a legend text (mean, CI, p)."""

    title: str
    reference: str
    reference_scores: Mapping[str, float]
    series: list[tuple[str, Mapping[str, float]]] = field(default_factory=list)


def plot_paired(panels: Sequence[PairedPanel], path: Path, empty: str = "no data") -> Path:
    """Fig. 4: one panel per portion (and sweep), subjects on x sorted by the reference's score."""
    panels = [p for p in panels if p.series]
    fig = plt.figure(figsize=(11, 3.4 * max(1, len(panels))))
    if not panels:
        _empty(fig, empty)
        return save_figure(fig, path)
    markers = "os^Dv<>pX*"
    colors = plt.get_cmap("tab10").colors
    for i, panel in enumerate(panels):
        ax = fig.add_subplot(len(panels), 1, i + 1)
        order = sorted(panel.reference_scores, key=lambda s: (panel.reference_scores[s], s))
        rank = {s: k for k, s in enumerate(order, start=1)}
        # The reference's own score, light and behind, shows what "sorted by" means.
        twin = ax.twinx()
        twin.bar(
            range(1, len(order) + 1),
            [panel.reference_scores[s] for s in order],
            color="0.85",
            width=0.8,
            zorder=0,
        )
        twin.set_ylim(0, 1)
        twin.set_ylabel(f"{panel.reference} Dice (grey bars)", color="0.45")
        twin.tick_params(axis="y", colors="0.45")
        ax.set_zorder(twin.get_zorder() + 1)
        ax.patch.set_visible(False)
        for j, (label, diffs) in enumerate(panel.series):
            xs = sorted((rank[s], d) for s, d in diffs.items() if s in rank)
            ax.plot(
                [x for x, _ in xs],
                [d for _, d in xs],
                marker=markers[j % len(markers)],
                color=colors[j % len(colors)],
                linestyle="-",
                linewidth=0.6,
                markersize=4.5,
                alpha=0.85,
                label=label,
            )
        ax.axhline(0.0, color="black", linewidth=0.8)
        ax.set_xlim(0.3, len(order) + 0.7)
        ax.set_title(panel.title, fontsize=11)
        ax.set_ylabel(f"Dice: {panel.reference} − other")
        ax.set_xlabel(f"test subject, sorted by {panel.reference} Dice (n = {len(order)})")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.08, 1.0), frameon=False)
    fig.tight_layout()
    return save_figure(fig, path)


# ---- Fig. 5 --------------------------------------------------------------------------------


@dataclass
class AlphaPanel:
    """One panel of Fig. 5: α per layer (rows, network order) and source (columns), with the
    std across seeds for a sweep."""

    title: str
    layers: list[str]
    sources: list[str]
    mean: np.ndarray  # (layers, sources)
    std: np.ndarray | None = None


def short_layer(name: str) -> str:
    """``encoder.1.context.block2.conv`` → ``encoder.1.context.block2``: the suffix is the same
    for every mixed layer."""
    return name.removesuffix(".conv")


def plot_alphas(panels: Sequence[AlphaPanel], path: Path, empty: str = "no data") -> Path:
    """Fig. 5: grouped bars of α per layer, one colour per source model, one panel per portion."""
    fig = plt.figure(
        figsize=(max(10, 0.42 * max((len(p.layers) for p in panels), default=0)), 3.8 * max(1, len(panels)))
    )
    if not panels:
        _empty(fig, empty)
        return save_figure(fig, path)
    colors = plt.get_cmap("tab10").colors
    for i, panel in enumerate(panels):
        ax = fig.add_subplot(len(panels), 1, i + 1)
        n_layers, n_sources = panel.mean.shape
        width = 0.8 / n_sources
        x = np.arange(n_layers)
        for t, source in enumerate(panel.sources):
            ax.bar(
                x - 0.4 + width * (t + 0.5),
                panel.mean[:, t],
                width=width,
                yerr=None if panel.std is None else panel.std[:, t],
                capsize=2,
                color=colors[t % len(colors)],
                label=source,
            )
        ax.axhline(1.0 / n_sources, color="black", linestyle="--", linewidth=0.8, label="uniform (IMM)")
        ax.set_xticks(x, [short_layer(n) for n in panel.layers], rotation=90, fontsize=7)
        ax.set_xlim(-0.6, n_layers - 0.4)
        ax.set_ylim(0, 1)
        ax.set_ylabel("α")
        ax.set_title(panel.title, fontsize=11)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.005, 1.0), frameon=False)
    fig.tight_layout()
    return save_figure(fig, path)


# ---- Fig. 5b -------------------------------------------------------------------------------


@dataclass
class TrajectoryPanel:
    """One panel of Fig. 5b: the first source's α per layer (columns of ``values``, network
    order) after each of ``epochs`` (rows)."""

    title: str
    source: str
    n_sources: int
    epochs: list[int]
    layers: list[str]
    values: np.ndarray  # (epochs, layers)
    best_epoch: int | None = None


def plot_alpha_trajectory(panels: Sequence[TrajectoryPanel], path: Path, empty: str = "no data") -> Path:
    """Fig. 5b: one line per layer, coloured from shallow to deep, one panel per portion."""
    fig = plt.figure(figsize=(10, 3.8 * max(1, len(panels))))
    if not panels:
        _empty(fig, empty)
        return save_figure(fig, path)
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.ticker import MaxNLocator

    cmap = plt.get_cmap("viridis")
    for i, panel in enumerate(panels):
        ax = fig.add_subplot(len(panels), 1, i + 1)
        n_layers = len(panel.layers)
        # Dozens of layers make a legend unreadable: colour by depth and show a colour bar.
        norm = Normalize(vmin=0, vmax=max(1, n_layers - 1))
        for k in range(n_layers):
            ax.plot(
                panel.epochs,
                panel.values[:, k],
                color=cmap(norm(k)),
                linewidth=1.0,
                marker="o" if len(panel.epochs) < 15 else None,
                markersize=2.5,
            )
        if panel.n_sources > 0:
            ax.axhline(
                1.0 / panel.n_sources, color="black", linestyle="--", linewidth=0.8, label="uniform (IMM)"
            )
        if panel.best_epoch is not None:
            ax.axvline(panel.best_epoch, color="0.3", linestyle=":", linewidth=1.0, label="epoch kept")
        ax.set_ylim(0, 1)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers
        ax.set_xlabel("adaption epoch")
        ax.set_ylabel(f"α of {panel.source}")
        ax.set_title(panel.title, fontsize=11)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8, loc="upper right", frameon=False)
        bar = fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=ax, pad=0.01)
        ticks = sorted({0, n_layers - 1, *range(0, n_layers, max(1, n_layers // 6))})
        bar.set_ticks(ticks)
        bar.set_ticklabels([short_layer(panel.layers[t]) for t in ticks], fontsize=6)
        bar.set_label("layer (network order)", fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)


# ---- Fig. 3 --------------------------------------------------------------------------------


@dataclass
class ExampleRow:
    """One row of Fig. 3: an axial image slice and labelled slices drawn over it.

    ``kind`` is ``"brats"`` (labels 0/1/2/4) or ``"parcellation"`` (class indices 1…K named by
    ``class_names``). ``panels`` holds (title, label slice); the arrays are (X, Y) of one axial
    slice, drawn with anterior up.
    """

    title: str
    image: np.ndarray
    panels: list[tuple[str, np.ndarray]]
    kind: str
    class_names: list[str] = field(default_factory=list)


def _overlay_colors(row: ExampleRow) -> tuple[ListedColormap, list[Patch], int]:
    if row.kind == "brats":
        top = max(BRATS_LABELS)
        colours = ["none"] * (top + 1)
        for value, (_, colour) in BRATS_LABELS.items():
            colours[value] = colour
        handles = [Patch(color=c, label=f"{v} {n}") for v, (n, c) in BRATS_LABELS.items()]
        return ListedColormap(colours[1:]), handles, top
    k = max(len(row.class_names), max((int(p.max()) for _, p in row.panels), default=0), 1)
    base = plt.get_cmap("tab10" if k <= 10 else "tab20").colors
    colours = [base[i % len(base)] for i in range(k)]
    names = row.class_names or [str(i) for i in range(1, k + 1)]
    handles = [Patch(color=colours[i], label=names[i] if i < len(names) else str(i + 1)) for i in range(k)]
    return ListedColormap(colours), handles, k


def _show(a: np.ndarray) -> np.ndarray:
    # Arrays are (X, Y); rot90 puts Y (anterior) up and X across, as radiological viewers do.
    return np.rot90(a)


def plot_examples(sections: Sequence[tuple[str, Sequence[ExampleRow], Sequence[str]]], path: Path) -> Path:
    """Fig. 3: one block per section (title, rows, notes); in it one image row per example and
    one column per method, labels drawn half-transparent over the image. Notes (e.g. "no
    predictions in …") are printed under the section's title; a section without rows shows only
    them."""
    n_cols = max([len(r.panels) for _, rows, _ in sections for r in rows] or [1])
    # A section without rows holds only its title and notes: a few lines of height.
    heights = [len(rows) * 2.5 + 0.3 * (1 + len(notes)) for _, rows, notes in sections] or [1.0]
    fig = plt.figure(figsize=(2.3 * n_cols + 2.4, sum(heights)), layout="constrained")
    subfigs = np.atleast_1d(fig.subfigures(len(heights), 1, height_ratios=heights))
    for sub, (title, rows, notes) in zip(subfigs, sections, strict=False):
        sub.suptitle(title + "".join(f"\n{n}" for n in notes), fontsize=10, ha="left", x=0.01)
        if not rows:
            continue
        axes = sub.subplots(len(rows), n_cols + 1, squeeze=False, width_ratios=[1] * n_cols + [0.9])
        for k, row in enumerate(rows):
            cmap, handles, top = _overlay_colors(row)
            for c in range(n_cols + 1):
                axes[k, c].axis("off")
            for c, (name, labels) in enumerate(row.panels):
                ax = axes[k, c]
                ax.axis("on")
                ax.imshow(_show(row.image), cmap="gray", interpolation="nearest")
                masked = np.ma.masked_equal(_show(labels).astype(np.int64), 0)
                ax.imshow(masked, cmap=cmap, vmin=0.5, vmax=top + 0.5, alpha=0.6, interpolation="nearest")
                ax.set_xticks([])
                ax.set_yticks([])
                ax.set_title(name, fontsize=9)
                if c == 0:
                    ax.set_ylabel(row.title, fontsize=8)
            # The legend right after the row's last panel (rows may have fewer panels than others).
            axes[k, len(row.panels)].legend(handles=handles, loc="center left", fontsize=7, frameon=False)
    return save_figure(fig, path)
