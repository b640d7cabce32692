"""What the bench runs: synthetic BraTS-shaped data, the project's module and loss, and the bare
training step the Lightning loop is compared with.

Every piece the stages use is the stages' own: the LightningModule comes from
:func:`tmerge.stages.module.segmentation_module` and the loss from
:func:`tmerge.modules.segmentation.build_loss` with the run config's ``loss`` section, so the
bench times what ``tmerge timm`` trains. Only the data are synthetic (no files to prepare).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from lightning.fabric.plugins import Precision
from torch import Tensor, nn

from tmerge.bench.settings import BenchConfig, Resolved
from tmerge.data.datasets import PatchDataset, Subject, loader_kwargs
from tmerge.data.labels import REGIONS
from tmerge.modules.segmentation import OptimConfig, SegmentationModule, build_loss
from tmerge.runner import TrainerConfig
from tmerge.stages.configs import RunConfig
from tmerge.stages.module import segmentation_module

#: BraTS targets: nested region masks with one sigmoid output each (ET ⊂ TC ⊂ WT).
OUTPUT_MODE = "sigmoid"


@dataclass(frozen=True)
class Task:
    """What :func:`~tmerge.stages.module.segmentation_module` reads of a DataModule."""

    output_mode: str
    class_names: list[str]


def run_config(cfg: BenchConfig, r: Resolved) -> RunConfig:
    """The stages' run config for the bench's network and fast path.

    The optimiser's schedule is ``"poly"`` (per step), not the default ``"plateau"``: the
    plateau scheduler monitors ``val/loss``, which a training-only loop never logs. Adam, its
    learning rate and weight decay are the project's defaults either way.
    """
    return RunConfig(
        seed=cfg.seed,
        net=cfg.net,
        optim=OptimConfig(schedule="poly"),
        trainer=TrainerConfig(accelerator=r.accelerator, precision=r.precision, compile=str(r.compile)),
    )


def task(cfg: BenchConfig) -> Task:
    """BraTS's regions for 3 outputs (the default), else numbered regions."""
    names = list(REGIONS) if cfg.n_classes == len(REGIONS) else [f"region{i}" for i in range(cfg.n_classes)]
    return Task(OUTPUT_MODE, names)


def bench_module(net: nn.Module, cfg: BenchConfig, r: Resolved) -> SegmentationModule:
    """The project's ``SegmentationModule`` for ``net``, built as the stages build it."""
    return segmentation_module(net, task(cfg), run_config(cfg, r), r.patch)


def bench_loss(cfg: BenchConfig, r: Resolved) -> nn.Module:
    """The module's loss (``loss.name`` of the run config, for sigmoid regions): the bare steps
    and the Fisher use it, so every section optimises the same objective."""
    return build_loss(run_config(cfg, r).loss.name, OUTPUT_MODE)


def loss_label(cfg: BenchConfig, r: Resolved) -> str:
    """How the results name the loss."""
    return f"the project's loss (loss.name={run_config(cfg, r).loss.name!r}, {OUTPUT_MODE} regions)"


def synthetic_batch(cfg: BenchConfig, patch: int, n: int, seed: int) -> tuple[Tensor, Tensor]:
    """Images ``(n, C_in, P, P, P)`` float32 and nested region masks ``(n, K, P, P, P)`` float32
    (K = ``cfg.n_classes``), on CPU, the same for the same seed."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, cfg.in_channels, patch, patch, patch, generator=g)
    # Nested regions (ET ⊂ TC ⊂ WT) from one smooth random field, so the Dice terms are those
    # of blobs, not of salt-and-pepper noise.
    smooth = F.avg_pool3d(torch.randn(n, 1, patch, patch, patch, generator=g), 5, stride=1, padding=2)
    levels = torch.tensor([0.15, 0.05, 0.0][: cfg.n_classes] + [0.0] * max(0, cfg.n_classes - 3))
    y = (smooth > levels.view(1, -1, 1, 1, 1)).float()
    return x, y


class Repeat(torch.utils.data.Dataset):
    """``n`` times the same (already batched, on-device) item: a loader that costs nothing, so a
    loop fed by it shows the loop's own overhead."""

    def __init__(self, item: dict[str, Tensor], n: int) -> None:
        self.item, self.n = item, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        return self.item


def patch_loader(cfg: BenchConfig, r: Resolved, batches: int) -> torch.utils.data.DataLoader:
    """The project's training pipeline on 4 synthetic in-memory subjects.

    Volumes ``(C_in, E, E, E)`` with E = 1.25 × the patch edge (so the random crops move), targets
    ``(K, E, E, E)`` uint8 concentric spheres; :class:`~tmerge.data.datasets.PatchDataset` crops,
    flips and jitters intensities as in training, with the project's loader settings. Yields at
    least ``batches`` batches of ``{"image": (B, C_in, P, P, P), "label": (B, K, P, P, P)}``.
    """
    edge = int(round(r.patch * 1.25))
    g = np.random.default_rng(cfg.seed)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, edge)] * 3, indexing="ij"))
    radius = np.sqrt((grid**2).sum(0))
    radii = [0.6 - 0.4 * k / max(cfg.n_classes - 1, 1) for k in range(cfg.n_classes)]
    target = np.stack([radius < rad for rad in radii]).astype(np.uint8)
    n_subjects = 4
    subjects = [
        Subject(
            id=f"bench{i}",
            image=g.standard_normal((cfg.in_channels, edge, edge, edge), dtype=np.float32),
            target=target,
            meta={},
        )
        for i in range(n_subjects)
    ]
    per_volume = math.ceil(batches * cfg.batch_size / n_subjects)
    dataset = PatchDataset(subjects, (r.patch,) * 3, per_volume, torch.float32, augment=True)
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=cfg.batch_size,
        shuffle=True,
        drop_last=True,
        **loader_kwargs(r.num_workers, cuda=r.device.type == "cuda"),
    )


def bare_step(
    forward: Callable[[Tensor], Tensor],
    params: Sequence[nn.Parameter],
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    x: Tensor,
    y: Tensor,
    plugin: Precision,
) -> Callable[[], None]:
    """One training step without Lightning's loop, on fixed device tensors.

    Forward and loss under the precision plugin's context (autocast for ``*-mixed``), backward
    and Adam through the plugin (loss scaling for ``16-mixed``), Adam at the project's learning
    rate and weight decay; no host synchronisation. ``x``: ``(B, C_in, P, P, P)``, ``y``:
    ``(B, K, P, P, P)``, both already in the dtype and memory format the step should see.
    """
    optim = OptimConfig()
    optimizer = torch.optim.Adam(params, lr=optim.lr, weight_decay=optim.weight_decay)

    def step() -> None:
        with plugin.forward_context():
            loss = loss_fn(forward(x), y)
        optimizer.zero_grad(set_to_none=True)
        plugin.backward(loss, None)
        plugin.optimizer_step(optimizer)

    return step


def reference_plugin() -> Precision:
    """Lightning's plain float32 plugin (no autocast, no conversion): the reference numerics."""
    return Precision()


class ReferenceNumerics:
    """Plain PyTorch numerics for a ``with`` block: TF32 off (true float32 on Ampere and later,
    where TF32 convolutions are PyTorch's default) and cuDNN autotuning off; restored on exit."""

    def __enter__(self) -> None:
        self._saved = (
            torch.backends.cudnn.allow_tf32,
            torch.backends.cuda.matmul.allow_tf32,
            torch.backends.cudnn.benchmark,
        )
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.benchmark = False

    def __exit__(self, *exc: object) -> None:
        (
            torch.backends.cudnn.allow_tf32,
            torch.backends.cuda.matmul.allow_tf32,
            torch.backends.cudnn.benchmark,
        ) = self._saved
