"""``tmerge shallow``: the premise checks' shallow baseline — a per-voxel classifier without
convolutions, on the same splits and test subjects as every initialisation.

Each voxel is described by its intensity in every channel and in two Gaussian-smoothed copies
of each (σ 1 and 2 voxels: a little context, no learned filters). A small MLP (two hidden layers
of 32) learns the target's classes (softmax) or regions (sigmoid) from voxels sampled from the
training subjects, half of them in the foreground, and predicts every voxel of each test subject,
scored as every run is scored. Where it comes near the CNNs, the target is decided by
intensities, not by the shapes and context that source models learn, and cannot show transfer.

It writes a target run folder ``…/p<portion>/[seed<k>/]shallow/`` (test scores, per-subject
file, voxel counts, ``stages.json``), so the report's tables show it as a column.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from scipy import ndimage
from torch import nn

from tmerge.data.target import TargetDataModule
from tmerge.evaluate import evaluate_subject
from tmerge.io import write_json
from tmerge.paths import runs_dir
from tmerge.runs import STAGES_FILE, TARGET_MARKER, target_dir
from tmerge.stages.configs import TargetStageConfig
from tmerge.stages.protocol import stage_guard, start_run
from tmerge.stages.results import write_test_results
from tmerge.stages.target import ALIASES, run_config

log = logging.getLogger("tmerge")

__all__ = ["ALIASES", "fit_voxel_classifier", "run_shallow", "voxel_features"]

#: Smoothing scales (voxels) of the feature copies.
SIGMAS = (1.0, 2.0)
#: Voxels sampled per training subject, and optimiser steps of the classifier.
VOXELS_PER_SUBJECT = 20_000
STEPS = 400


def voxel_features(image: np.ndarray, sigmas: tuple[float, ...] = SIGMAS) -> np.ndarray:
    """``(C, D, H, W)`` image → ``(C · (1 + len(sigmas)), D, H, W)`` float32 features: each
    channel and its Gaussian-smoothed copies."""
    image = np.asarray(image, dtype=np.float32)
    copies = [image] + [np.stack([ndimage.gaussian_filter(c, s) for c in image]) for s in sigmas]
    return np.concatenate(copies).astype(np.float32)


def fit_voxel_classifier(
    features: np.ndarray, targets: np.ndarray, mode: str, n_outputs: int, seed: int = 0, steps: int = STEPS
) -> nn.Module:
    """A two-hidden-layer MLP from per-voxel features to the target.

    Args:
        features: ``(N, F)`` float32.
        targets: ``(N,)`` class indices (softmax) or ``(N, R)`` region masks (sigmoid).
        mode: ``"softmax"`` or ``"sigmoid"``.
        n_outputs: output channels.
        seed: initialisation and minibatch draw.
        steps: Adam steps of 4096 voxels.
    """
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    x = torch.from_numpy(np.asarray(features, dtype=np.float32))
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    net = nn.Sequential(_Standardise(mean, std), nn.Linear(x.shape[1], 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, n_outputs))
    y = torch.from_numpy(np.asarray(targets))
    loss_fn: nn.Module = nn.CrossEntropyLoss() if mode == "softmax" else nn.BCEWithLogitsLoss()
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(steps):
        idx = torch.randint(0, x.shape[0], (min(4096, x.shape[0]),), generator=gen)
        out = net(x[idx])
        target = y[idx].long() if mode == "softmax" else y[idx].float()
        loss = loss_fn(out, target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net.eval()


class _Standardise(nn.Module):
    def __init__(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def _sample(subject: Any, rng: np.random.Generator, mode: str) -> tuple[np.ndarray, np.ndarray]:
    """Voxels of one training subject, half of them from its foreground: ``(N, F)``, targets."""
    feats = voxel_features(subject.image)
    target = subject.target  # (L, D, H, W)
    fg = np.flatnonzero(target.reshape(target.shape[0], -1).any(0) if mode == "sigmoid" else target[0].reshape(-1) > 0)
    everything = target[0].size
    n = VOXELS_PER_SUBJECT // 2
    pick = np.concatenate([rng.choice(fg, min(n, fg.size), replace=False) if fg.size else np.empty(0, int), rng.choice(everything, min(n, everything), replace=False)])
    x = feats.reshape(feats.shape[0], -1)[:, pick].T
    y = target[0].reshape(-1)[pick] if mode == "softmax" else target.reshape(target.shape[0], -1)[:, pick].T
    return x, y


def run_shallow(cfg: TargetStageConfig) -> list[Path]:
    """The shallow baseline of ``cfg``'s target and portion, once per seed of ``seeds`` (each
    seed's train/val draw, as a sweep's); return the run folders."""
    return [_run_one(dataclasses.replace(cfg, seed=seed)) for seed in cfg.seeds]


def _run_one(cfg: TargetStageConfig) -> Path:
    """Train and test the shallow baseline of ``cfg``'s target, portion and seed; return its folder."""
    cfg = run_config(dataclasses.replace(cfg, init="shallow"))
    dm = TargetDataModule(**dataclasses.asdict(cfg.data), divisor=cfg.net.divisor)  # the deep runs' volumes
    per_seed = cfg.seed_folder if cfg.seed_folder is not None else len(cfg.seeds) > 1
    run_dir = target_dir(runs_dir(cfg.runs_dir), cfg.data.portion, "shallow", cfg.seed if per_seed else None, target=dm.name)
    dm.run_dir = str(run_dir)
    dm.check_layout()
    with stage_guard(run_dir):
        if not start_run(run_dir, dataclasses.replace(cfg, inits=["shallow"], seeds=[cfg.seed]), TARGET_MARKER, force=cfg.force):
            log.info("%s is finished; pass force=true to run it again", run_dir)
            return run_dir
        L.seed_everything(cfg.seed, workers=True, verbose=False)
        dm.prepare_data()
        dm.setup("fit")
        rng = np.random.default_rng(cfg.seed)
        parts = [_sample(s, rng, dm.output_mode) for s in dm.loaded_subjects("train")]
        x = np.concatenate([p[0] for p in parts])
        y = np.concatenate([p[1] for p in parts])
        net = fit_voxel_classifier(x, y, dm.output_mode, dm.n_outputs, seed=cfg.seed)
        records = []
        with torch.no_grad():
            for subject in dm.loaded_subjects("test"):
                feats = voxel_features(subject.image)
                flat = torch.from_numpy(feats.reshape(feats.shape[0], -1).T)
                logits = net(flat).T.reshape(dm.n_outputs, *feats.shape[1:])
                result = evaluate_subject(logits, subject.target, subject.meta, dm.scheme, metrics=cfg.metrics)
                records.append({"subject": subject.id, **result.scores, **result.counts})
        write_json(run_dir / STAGES_FILE, {"init": "shallow", "sources": [], "voxels": int(x.shape[0]), "features": int(x.shape[1])})
        summary = write_test_results(run_dir, records, dm.class_names, cfg.metrics.convention)
        log.info("shallow p%s: test Dice mean %.3f over %d subjects (per-voxel MLP, no convolutions)", cfg.data.portion, summary["dice"]["mean"], summary["n"])
    return run_dir
