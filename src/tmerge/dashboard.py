"""W&B dashboard content beyond Lightning's scalars: the per-subject test table, a few prediction
slices, and the T-IMM mixing ratios α per layer (the paper's Fig. 5).

Every function takes a stage's Lightning loggers and logs through their ``WandbLogger`` (offline
by default, see :mod:`tmerge.loggers`). Without one (``logger.wandb.mode=disabled``),
and on every DDP rank but 0, nothing happens, and ``wandb`` is not even imported. Offline, tables
and images are written into the run folder under ``runs/wandb/`` and uploaded by ``wandb sync``;
no network is touched.

Logged keys: ``test/per_subject`` (table: ``subject``, ``dice_<c>``…, ``dice_mean``,
``hd95_<c>``…), ``test/predictions`` (images with the true and the predicted label map as
switchable overlays), ``adaption/alphas`` (table: ``index``, ``layer``, ``alpha_<source>``…) and
``adaption/alphas_per_layer`` (line chart of α per source over the layers).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from lightning.pytorch.loggers import Logger

from tmerge.evaluate import N_PREVIEWS, per_subject_rows, score_columns
from tmerge.loggers import wandb_loggers


def log_test_results(
    loggers: Sequence[Logger],
    records: Sequence[Mapping[str, Any]],
    class_names: Sequence[str],
    previews: Sequence[Mapping[str, Any]] = (),
    label_names: Mapping[int, str] | None = None,
    step: int | None = None,
) -> None:
    """Log the per-subject test scores as a table and up to :data:`N_PREVIEWS` prediction slices.

    Args:
        loggers: The stage's loggers.
        records: Per-subject scores (``subject``, ``dice_<c>``, ``hd95_<c>``), as
            :func:`tmerge.stages.results.test_subjects` returns them.
        class_names: The scored classes.
        previews: Slices from :func:`tmerge.evaluate.preview`.
        label_names: Label value → name for the overlays (:func:`tmerge.evaluate.label_names`).
        step: The trainer's global step (the x-axis of the W&B run).
    """
    targets = wandb_loggers(loggers)
    if not targets:
        return
    import wandb

    columns = ["subject", *score_columns(class_names)]
    rows = [[row[c] for c in columns] for row in per_subject_rows(records, class_names)]
    payload: dict[str, Any] = {"test/per_subject": wandb.Table(columns=columns, data=rows)}
    images = [_image(p, label_names or {}) for p in list(previews)[:N_PREVIEWS]]
    if images:
        payload["test/predictions"] = images
    for logger in targets:
        logger.log_metrics(payload, step=step)


def log_alphas(
    loggers: Sequence[Logger],
    alphas: Mapping[str, Sequence[float]],
    sources: Sequence[str],
    step: int | None = None,
    trajectory: Sequence[Mapping[str, Any]] = (),
) -> None:
    """Log the learned mixing ratios: a table (one row per layer), α per source over the layers
    (paper Fig. 5) and, with a ``trajectory``, α of the first source per layer over the epochs.

    Args:
        loggers: The adaption stage's loggers.
        alphas: Layer name → α per source (``(T,)``, summing to 1), in network order.
        sources: The T source names.
        step: The trainer's global step.
        trajectory: :attr:`tmerge.callbacks.AlphaTrajectory.trajectory` entries
            (``{"epoch", "alphas": {layer: [α…]}}``).
    """
    targets = wandb_loggers(loggers)
    if not targets or not alphas:
        return
    import wandb

    layers = list(alphas)
    columns = ["index", "layer", *(f"alpha_{s}" for s in sources)]
    data = [[i, name, *map(float, alphas[name])] for i, name in enumerate(layers)]
    per_source = [[float(alphas[name][t]) for name in layers] for t in range(len(sources))]
    chart = wandb.plot.line_series(
        xs=list(range(len(layers))),
        ys=per_source,
        keys=list(sources),
        title="T-IMM α per layer",
        xname="layer (network order)",
    )
    payload = {"adaption/alphas": wandb.Table(columns=columns, data=data), "adaption/alphas_per_layer": chart}
    if trajectory:
        payload["adaption/alpha_trajectory"] = wandb.plot.line_series(
            xs=[int(e["epoch"]) for e in trajectory],
            ys=[[float(e["alphas"][name][0]) for e in trajectory] for name in layers],
            keys=layers,
            title=f"T-IMM α of {sources[0]} per layer over the adaption epochs",
            xname="epoch",
        )
    for logger in targets:
        logger.log_metrics(payload, step=step)


def _image(preview: Mapping[str, Any], names: Mapping[int, str]) -> Any:
    """A ``wandb.Image`` of one slice with the true and predicted label maps as switchable overlays,
    the first array axis horizontal and the second pointing up."""
    import wandb

    def view(a: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(np.rot90(a))

    class_labels = {int(k): str(v) for k, v in names.items()}
    masks = {
        "prediction": {
            "mask_data": view(preview["prediction"]).astype(np.int64),
            "class_labels": class_labels,
        }
    }
    if preview.get("truth") is not None:
        masks["ground_truth"] = {
            "mask_data": view(preview["truth"]).astype(np.int64),
            "class_labels": class_labels,
        }
    pixels = (view(preview["image"]) * 255).clip(0, 255).astype(np.uint8)
    return wandb.Image(pixels, masks=masks, caption=f"{preview['subject']} (slice {preview['slice']})")
