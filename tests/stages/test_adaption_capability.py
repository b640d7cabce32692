"""Capability test: with the adaption stage's *default* settings, α learns which source helps.

Two sources share one architecture: a network trained on a small segmentation task (useful), and
the same network with every fused tensor replaced by seeded noise of the same scale (useless).
Their Fishers are equal (ones), so only α decides how much of each enters the merge. The target
task is the source's own kind of task with fresh task-specific parameters, and the epoch has as
many steps as the embedded default at 4 % (8 subjects × 4 patches ÷ batch 2 = 16). The stage,
run through :func:`tmerge.stages.target.adapt` with :class:`AdaptionConfig`'s defaults, must put
α on the useful source in ≥ 90 % of the layers with a mean ≥ 0.8 — and on the other side when
the two are swapped.

Run as a script to measure other settings: ``python tests/stages/test_adaption_capability.py
0.01 0.02 0.05 0.1`` prints, per δ learning rate, the share of layers won and the mean α.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from tmerge.modules.segmentation import build_loss
from tmerge.nets import Isensee2017, layer_groups, partition
from tmerge.sources import Source
from tmerge.stages.adaption import adapt
from tmerge.stages.configs import AdaptionConfig, TargetStageConfig
from tmerge.stages.initialisation import Initialised

SIZE = 16  # voxels per edge
TRAIN, VAL = 32, 2  # samples per epoch (16 steps at batch 2) and validation volumes


def blob_volumes(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` volumes ``(n, 2, S, S, S)`` with a bright ball of random centre and radius in channel
    0 (and noise in both channels), and their labels ``(n, 1, S, S, S)`` (1 inside the ball)."""
    g = torch.Generator().manual_seed(seed)
    grid = torch.stack(torch.meshgrid(*[torch.arange(SIZE, dtype=torch.float32)] * 3, indexing="ij"))
    centre = 4 + (SIZE - 8) * torch.rand(n, 3, 1, 1, 1, generator=g)
    radius = 2.5 + 2.5 * torch.rand(n, 1, 1, 1, generator=g)
    inside = ((grid.unsqueeze(0) - centre).square().sum(1) <= radius.square()).float()
    image = 0.4 * torch.randn(n, 2, SIZE, SIZE, SIZE, generator=g)
    image[:, 0] += inside
    return image, inside.unsqueeze(1).long()


class Blobs(Dataset):
    def __init__(self, n: int, seed: int) -> None:
        self.image, self.label = blob_volumes(n, seed)

    def __len__(self) -> int:
        return len(self.image)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"image": self.image[i], "label": self.label[i]}


class BlobData(L.LightningDataModule):
    """What :func:`adapt` needs of a DataModule: loaders, the output mode and class names."""

    output_mode = "softmax"
    class_names = ["ball"]

    def __init__(self, seed: int) -> None:
        super().__init__()
        self.train, self.val = Blobs(TRAIN, seed), Blobs(VAL, seed + 1)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train, batch_size=2, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val, batch_size=1)


def build() -> torch.nn.Module:
    return Isensee2017(in_channels=2, n_classes=2, base_filters=4, depth=3, dropout=0.0)


def trained_source(steps: int = 150) -> dict[str, torch.Tensor]:
    """A source that solves the ball task (checked: its Dice on new volumes exceeds 0.8)."""
    torch.manual_seed(0)
    net = build()
    loss_fn = build_loss("dice_ce", "softmax")
    x, y = blob_volumes(64, seed=100)
    opt = torch.optim.Adam(net.parameters(), lr=5e-3)
    for step in range(steps):
        i = torch.arange(2 * step, 2 * step + 2) % len(x)
        opt.zero_grad()
        loss_fn(net(x[i]), y[i]).backward()
        opt.step()
    with torch.no_grad():
        xt, yt = blob_volumes(8, seed=200)
        pred = net.eval()(xt).argmax(1, keepdim=True)
        dice = 2 * (pred * yt).sum() / (pred.sum() + yt.sum())
    assert dice > 0.8, f"the useful source did not learn its task (Dice {float(dice):.2f})"
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def noise_source(useful: dict[str, torch.Tensor], fused: list[str]) -> dict[str, torch.Tensor]:
    """The useful source with every fused tensor replaced by seeded noise of the same std."""
    g = torch.Generator().manual_seed(1)
    out = dict(useful)
    for n in fused:
        t = useful[n]
        out[n] = torch.randn(t.shape, generator=g) * t.std().clamp(min=1e-3)
    return out


def learned_alphas(sources: list[dict[str, torch.Tensor]], tmp: Path, **adaption: float) -> torch.Tensor:
    """Run the adaption stage on the ball task; return α of the first source per layer ``(N,)``."""
    L.seed_everything(3, verbose=False)
    net = build()
    fused, _ = partition(net)
    layers = layer_groups(net, fused)
    ones = [{n: torch.ones_like(s[n]) for n in fused} for s in sources]
    cfg = TargetStageConfig(runs_dir=str(tmp))
    cfg = dataclasses.replace(
        cfg,
        adaption=dataclasses.replace(cfg.adaption, **adaption),
        trainer=dataclasses.replace(cfg.trainer, accelerator="cpu"),
        logger=dataclasses.replace(cfg.logger, wandb=dataclasses.replace(cfg.logger.wandb, mode="disabled")),
    )
    cfg.data.patch_size = SIZE
    start = Initialised(net, layers, ones, eps=1e-8)
    named = [Source(f"s{t}", s, {}, f) for t, (s, f) in enumerate(zip(sources, ones, strict=True))]
    released, _ = adapt(cfg, BlobData(seed=7), net, named, start, tmp, None)  # no W&B run
    record = json.loads((tmp / "alphas.json").read_text())
    assert released is net
    return torch.tensor([record["alphas"][layer][0] for layer in layers])


@pytest.mark.slow
def test_alpha_favours_the_useful_source_with_default_settings(tmp_path: Path) -> None:
    useful = trained_source()
    fused, _ = partition(build())
    noise = noise_source(useful, fused)
    for order, name in (([useful, noise], "useful first"), ([noise, useful], "useful second")):
        alpha = learned_alphas(order, tmp_path / name.replace(" ", "-"))
        on_useful = alpha if order[0] is useful else 1 - alpha
        share = float((on_useful > 0.5).float().mean())
        assert share >= 0.9 and float(on_useful.mean()) >= 0.8, (
            f"{name}: α on the useful source > ½ in {share:.0%} of {len(alpha)} layers, "
            f"mean {float(on_useful.mean()):.2f}: {[round(float(a), 2) for a in on_useful]}"
        )


if (
    __name__ == "__main__"
):  # measure δ learning rates: python tests/stages/test_adaption_capability.py 0.01 0.05
    import tempfile
    import time

    useful = trained_source()
    fused, _ = partition(build())
    noise = noise_source(useful, fused)
    for lr in [float(a) for a in sys.argv[1:]] or [AdaptionConfig().delta_lr]:
        t0 = time.perf_counter()
        for order in ([useful, noise], [noise, useful]):
            alpha = learned_alphas(order, Path(tempfile.mkdtemp()), delta_lr=lr)
            on = alpha if order[0] is useful else 1 - alpha
            print(
                f"delta_lr={lr:g}: useful side in {float((on > 0.5).float().mean()):.0%} of layers, "
                f"mean α {float(on.mean()):.3f}, min {float(on.min()):.3f} ({time.perf_counter() - t0:.0f} s)",
                flush=True,
            )
