"""``tmerge export run=<run folder> out=<folder> [format=torchscript]``: a finished run's network
for use outside tmerge.

Writes into ``out``: ``model.pt`` (TorchScript, traced in eval mode: ``(B, C, D, H, W)`` float32
images → ``(B, K, D, H, W)`` logits), ``model.safetensors`` (the same weights with their
architecture record) and ``model.json``: the channel order, the output mode and classes, the
label map a prediction is written in, the preprocessing the network was trained with, the
sliding-window settings, and the files' sha256. ONNX is not offered: its exporter needs packages
this project does not install; the TorchScript file loads with ``torch.jit.load`` alone.
"""

from __future__ import annotations

import dataclasses
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tmerge.errors import ConfigError
from tmerge.evaluate import label_names
from tmerge.io import atomic_path, file_sha256, write_json
from tmerge.runs import save_net
from tmerge.stages.module import architecture_meta
from tmerge.stages.predict import load_run

log = logging.getLogger("tmerge")

FORMATS = ("torchscript",)
MODEL_FILE = "model.pt"
WEIGHTS_FILE = "model.safetensors"
SPEC_FILE = "model.json"


@dataclass
class ExportConfig:
    """Config of ``tmerge export``."""

    run: str | None = None  # a finished run folder
    out: str | None = None  # folder for model.pt, model.safetensors, model.json
    format: str = "torchscript"

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ConfigError(f"format: expected one of {', '.join(FORMATS)}, got {self.format!r}")


def _dataset_label_names(dm: Any, mapping: Any) -> dict[int, str]:
    """Label value → name of the predicted label maps, in the dataset's values (``mapping``: its
    :class:`~tmerge.data.labels.LabelMapping`, None: the internal values)."""
    names = label_names(getattr(dm, "scheme", None) or dm.output_mode, dm.class_names)
    if mapping is None:
        return names
    return {int(mapping.to_dataset(np.array([k]))[0]): name for k, name in names.items()}


def export_spec(cfg: Any, dm: Any, run_dir: Path) -> dict[str, Any]:
    """What a user of the exported network needs besides the weights."""
    settings = dm.preprocess_settings()
    return {
        "format": "torchscript",
        "run": str(run_dir),
        "architecture": architecture_meta(cfg, dm),
        "channels": list(dm.modalities),  # input channel i is this image of a case
        "output_mode": dm.output_mode,  # sigmoid: one probability per region; softmax: per class
        "classes": list(dm.class_names),
        # the values of the written label maps, in the dataset's own convention, and their names
        "label_map": {str(k): v for k, v in _dataset_label_names(dm, settings.labels).items()},
        **({"target": dm.describe()} if hasattr(dm, "describe") else {}),
        "preprocessing": {
            **dataclasses.asdict(settings),
            "steps": "per case: brain mask = any image non-zero; N4 bias-field correction in the "
            "mask (if n4); histogram normalisation of each image in the mask (MONAI "
            "HistogramNormalize), background 0; crop to the brain's bounding box, zero-padded to a "
            "multiple of `multiple` of at least `min_size` (tmerge.data.preprocess)",
        },
        "inference": {
            "patch_size": cfg.data.patch_size,
            "sliding_window": {
                "roi": cfg.loss.sw_roi or cfg.data.patch_size,
                "overlap": cfg.loss.sw_overlap,
                "mode": "gaussian",
            },
        },
    }


@torch.no_grad()
def run_export(cfg: ExportConfig) -> Path:
    """Export the run ``cfg.run`` into ``cfg.out``; return the folder."""
    for key in ("run", "out"):  # checked here, not in the config, so that --show-config works
        if not getattr(cfg, key):
            raise ConfigError(f"{key}: expected a path, e.g. tmerge export run=… out=…")
    run_dir, out = Path(str(cfg.run)).expanduser(), Path(str(cfg.out)).expanduser()
    run_cfg, dm, module = load_run(run_dir)
    net = module.net.eval().to(memory_format=torch.contiguous_format)
    size = run_cfg.data.patch_size
    example = torch.zeros(1, dm.in_channels, size, size, size)
    with warnings.catch_warnings():
        # The instance norms check their input size in Python; the trace keeps that check as a
        # constant, which holds for every volume at least one voxel wide (the round-trip test
        # runs other sizes than the example).
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        traced = torch.jit.trace(net, example, check_trace=False)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / MODEL_FILE) as tmp:
        torch.jit.save(traced, str(tmp))
    save_net(out / WEIGHTS_FILE, net, architecture_meta(run_cfg, dm))
    spec = export_spec(run_cfg, dm, run_dir)
    spec["sha256"] = {name: file_sha256(out / name) for name in (MODEL_FILE, WEIGHTS_FILE)}
    write_json(out / SPEC_FILE, spec)
    log.info("export: %s → %s (%s, %s, %s)", run_dir, out, MODEL_FILE, WEIGHTS_FILE, SPEC_FILE)
    return out
