"""Catastrophic forgetting (paper §4.3, Table 4): how much of tasks 1 and 2 the fused
parameters P of each initialisation still hold.

For each candidate P — M1's, M2's, IMM's (uniform α) and T-IMM's (the α learned by the adaption
stage of ``runs/brats/p<portion>/timm``) — and each source task t, the network made of that P
and task t's own task-specific parameters S_t (instance norms and heads) is evaluated on the
shared HCP test split with task t's labels. Output: the table (JSON and Markdown) and one axial
slice of one test subject with each candidate's prediction per task, for the report's Fig. 3
(:func:`save_examples`), in ``runs/forgetting/p<portion>/`` (:mod:`tmerge.runs`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tmerge.data.hcp import HCPDataConfig, HCPDataModule
from tmerge.errors import RunError
from tmerge.fisher import NORMALIZE, normalize_fisher
from tmerge.io import atomic_path, read_json, write_json, write_text
from tmerge.merge import imm_merge
from tmerge.merge.imm import check_alpha, fisher_epsilon
from tmerge.metrics import dice_per_class
from tmerge.modules.segmentation import LossConfig, SegmentationModule
from tmerge.nets import layer_groups, partition
from tmerge.nets.config import NetConfig
from tmerge.paths import runs_dir
from tmerge.runs import (
    ALPHAS_FILE,
    FORGETTING_EXAMPLES,
    FORGETTING_MD,
    FORGETTING_TABLE,
    forgetting_dir,
    target_dir,
)
from tmerge.sources import load_source
from tmerge.stages.configs import MergeFisherConfig, check_net_data

log = logging.getLogger("tmerge")


@dataclass
class ForgettingConfig:
    """Config of ``tmerge forgetting``."""

    sources: list[str] = field(default_factory=lambda: ["task1", "task2"])  # M1, M2 run names
    portion: int = 4  # whose T-IMM α to evaluate (those of runs/brats/p<portion>/timm)
    # ε of the IMM row, relative to the mean Fisher entry, as in the merge stages. The T-IMM row
    # merges with the ε its adaption used (recorded in alphas.json); this one only for an
    # alphas.json written before ε was recorded there (with a warning).
    eps: float = 1e-8
    fisher: MergeFisherConfig = field(default_factory=MergeFisherConfig)  # as in the merge stages
    runs_dir: str | None = None
    data: HCPDataConfig = field(default_factory=HCPDataConfig)
    net: NetConfig = field(default_factory=NetConfig)
    loss: LossConfig = field(default_factory=LossConfig)

    def __post_init__(self) -> None:
        check_net_data(self.net, self.data, self.loss)


def candidate_parameters(cfg: ForgettingConfig) -> dict[str, dict[str, torch.Tensor]]:
    """The fused parameters P of M1, M2, IMM and T-IMM, keyed by the paper's row names."""
    root = runs_dir(cfg.runs_dir)
    expected = cfg.net.architecture()  # the network's name and sizes
    first = load_source(root, cfg.sources[0], expected=expected)
    template = cfg.net.build(first.meta.get("in_channels", 2), first.meta.get("n_classes", 8))
    fused, _ = partition(template)
    layers = layer_groups(template, fused)
    sources = [load_source(root, name, with_fisher=True, fused=fused, expected=expected) for name in cfg.sources]
    states = [s.state for s in sources]
    fishers = [normalize_fisher(s.fisher, cfg.fisher.normalize) for s in sources]
    eps = fisher_epsilon(fishers, cfg.eps)
    n = len(states)
    uniform = torch.full((n,), 1.0 / n)
    out = {f"M{i + 1}": {k: s[k] for k in fused} for i, s in enumerate(states)}
    out["IMM"] = imm_merge(states, fishers, uniform, layers=layers, eps=eps)
    alphas_path = timm_alphas(root, cfg.portion)
    if alphas_path.is_file():
        record = read_json(alphas_path)
        learned = record["alphas"]
        # The α were learned on Fishers normalised as that run did it: merge with the same.
        mode = record.get("fisher", cfg.fisher.normalize)
        timm_fishers = fishers
        if mode != cfg.fisher.normalize and mode in NORMALIZE:
            timm_fishers = [normalize_fisher(s.fisher, mode) for s in sources]
        log.info("forgetting: T-IMM row from the α of %s (Fishers normalised: %s)", alphas_path, mode)
        # Layers the adaption did not mix (the first convolution: 2 HCP vs 4 BraTS channels)
        # keep IMM's uniform ratios.
        per_layer = {layer: torch.tensor(learned.get(layer, uniform.tolist())) for layer in layers}
        for layer, alpha in per_layer.items():  # a user's file: one clear error, not a traceback
            try:
                check_alpha(alpha, n, f"{alphas_path}: alphas for layer {layer!r}")
            except ValueError as exc:
                raise RunError(str(exc)) from None
        timm_eps = fisher_epsilon(timm_fishers, recorded_eps(record, alphas_path, cfg.eps))
        out["T-IMM"] = imm_merge(states, timm_fishers, per_layer, layers=layers, eps=timm_eps)
    else:
        log.info(
            "forgetting: %s not found; the T-IMM row is left out (run `make timm PORTION=%d`)",
            alphas_path,
            cfg.portion,
        )
    return out


def recorded_eps(record: dict[str, Any], path: Path, fallback: float) -> float:
    """The relative ε of eq. 2 that the adaption of ``record`` (an α record read from ``path``)
    merged with; ``fallback`` (with a warning) for a record written before ε was recorded.

    Raises:
        RunError: the recorded ε is not a positive number.
    """
    if "eps" not in record:
        log.warning(
            "forgetting: %s records no eps (written before ε was recorded there); the T-IMM row merges "
            "with forgetting's eps=%s: set it to the adaption.eps that run used if that differs",
            path,
            fallback,
        )
        return fallback
    eps = record["eps"]
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
        raise RunError(f"{path}: eps: expected a positive number, got {eps!r}")
    return float(eps)


def timm_alphas(root: Path, portion: int) -> Path:
    """The α file whose α make the T-IMM row: that of ``brats/p<portion>/timm`` or, after a sweep
    over seeds, the lowest seed's ``brats/p<portion>/seed<k>/timm`` (the path of the single-seed
    layout when neither exists)."""
    single = target_dir(root, portion, "timm") / ALPHAS_FILE
    if single.is_file():
        return single
    seeded = sorted(
        (p for p in single.parent.parent.glob(f"seed*/timm/{ALPHAS_FILE}") if p.parent.parent.name[4:].isdigit()),
        key=lambda p: int(p.parent.parent.name[4:]),
    )
    return seeded[0] if seeded else single


@torch.no_grad()
def mean_test_dice(
    net: torch.nn.Module, dm: HCPDataModule, loss: LossConfig, patch_size: int, keep: str | None = None
) -> tuple[float, dict[str, np.ndarray] | None]:
    """Mean over test subjects of the mean foreground Dice, and for subject ``keep`` (if given
    and in the test split) its first image channel, ground truth and predicted class indices,
    each ``(D, H, W)``."""
    module = SegmentationModule(
        net, output_mode=dm.output_mode, class_names=dm.class_names, patch_size=patch_size, loss=loss
    ).eval()
    scores, kept = [], None
    for b in dm.test_dataloader():
        logits = module.infer(b["image"])
        scores.append(dice_per_class(logits, b["label"], dm.output_mode).mean())
        if keep is not None and b["subject"][0] == keep:
            kept = {
                "image": b["image"][0, 0].float().numpy(),
                "truth": b["label"][0, 0].numpy().astype(np.uint8),
                "pred": logits[0].argmax(0).numpy().astype(np.uint8),
            }
    return float(torch.stack(scores).mean()), kept


def busiest_slice(label: np.ndarray) -> int:
    """Index along the last (axial) axis of the slice with the most labelled voxels."""
    return int(np.count_nonzero(label, axis=(0, 1)).argmax())


def save_examples(path: Path, subject: str, examples: dict[str, dict[str, Any]], rows: list[str]) -> Path:
    """Write Fig. 3's parcellation example: one axial slice per source task, atomically.

    Args:
        path: the ``.npz`` file.
        subject: the test subject shown.
        examples: task name → ``{"labels", "class_names", "image", "truth", "pred": {row: (D, H, W)}}``
            (volumes of :func:`mean_test_dice`'s ``keep``).
        rows: candidate names (``M1``, …) in table order.

    The file holds ``<task>/image`` (float32), ``<task>/truth`` and ``<task>/<row>`` (uint8) of
    the slice with the most labelled voxels of the first task's ground truth (the same slice for
    every task, so the rows are comparable), and ``meta``, a JSON string with the subject, the
    slice index, the rows and each task's labels and class names.
    """
    first = next(iter(examples.values()))
    k = busiest_slice(first["truth"])
    arrays: dict[str, np.ndarray] = {}
    for task, ex in examples.items():
        arrays[f"{task}/image"] = ex["image"][..., k].astype(np.float32)
        arrays[f"{task}/truth"] = ex["truth"][..., k].astype(np.uint8)
        for row, pred in ex["pred"].items():
            arrays[f"{task}/{row}"] = pred[..., k].astype(np.uint8)
    meta = {
        "subject": subject,
        "slice": k,
        "axis": "last (axial) axis of the preprocessed volume",
        "rows": rows,
        "tasks": [
            {"name": t, "labels": ex["labels"], "class_names": ex["class_names"]}
            for t, ex in examples.items()
        ],
    }
    with atomic_path(path) as tmp, open(tmp, "wb") as f:  # a file object: savez would append .npz
        np.savez_compressed(f, meta=np.array(json.dumps(meta)), **arrays)
    return path


def run_forgetting(cfg: ForgettingConfig) -> Path:
    """Evaluate every candidate P with every source task's S; write Table 4."""
    root = runs_dir(cfg.runs_dir)
    candidates = candidate_parameters(cfg)
    table: dict[str, dict[str, float]] = {row: {} for row in candidates}
    subject: str | None = None  # the example of Fig. 3: the first task's first test subject
    examples: dict[str, dict[str, Any]] = {}
    for name in cfg.sources:
        source = load_source(root, name)
        state, meta = source.state, source.meta
        labels = meta.get("labels")
        if labels is None:
            raise RunError(f"{source.folder}: no label set in the weights' metadata; retrain {name} with this version")
        data = dataclasses.replace(cfg.data, split=meta.get("split", name), labels=labels)
        dm = HCPDataModule(divisor=cfg.net.divisor, **dataclasses.asdict(data))
        dm.prepare_data()
        dm.setup("test")
        subject = subject or dm.subjects["test"][0]
        example: dict[str, Any] = {"labels": labels, "class_names": list(dm.class_names), "pred": {}}
        for row, fused in candidates.items():
            net = cfg.net.build(dm.in_channels, dm.n_outputs)
            net.load_state_dict({**state, **fused})
            dice, kept = mean_test_dice(net.eval(), dm, cfg.loss, data.patch_size, keep=subject)
            table[row][f"labels {labels}"] = dice
            if kept is not None:
                example.update(image=kept["image"], truth=kept["truth"])
                example["pred"][row] = kept["pred"]
            log.info(
                "forgetting: P of %-5s with S of %s on labels %s: Dice %.3f",
                row,
                name,
                labels,
                table[row][f"labels {labels}"],
            )
        if example["pred"]:
            examples[name] = example
        else:
            log.info("forgetting: %s is not in %s's test split; no example slice for it", subject, name)
    out = forgetting_dir(root, cfg.portion)
    write_json(out / FORGETTING_TABLE, table)
    if examples and subject is not None:
        save_examples(out / FORGETTING_EXAMPLES, subject, examples, list(candidates))
    columns = list(next(iter(table.values())))
    lines = ["| P from | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    lines += [f"| {row} | " + " | ".join(f"{v[c]:.2f}" for c in columns) + " |" for row, v in table.items()]
    write_text(
        out / FORGETTING_MD,
        "Mean test Dice of each initialisation's P with the source tasks' S (paper Table 4).\n\n"
        + "\n".join(lines)
        + "\n",
    )
    log.info("forgetting: wrote %s", out / FORGETTING_MD)
    return out
