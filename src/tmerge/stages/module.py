"""The stages' LightningModule, built from a run config, and the architecture record that
travels with every saved network."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from tmerge.evaluate import MetricsConfig
from tmerge.modules.segmentation import OptimConfig, SegmentationModule
from tmerge.runner import resolve_compile
from tmerge.stages.configs import RunConfig


def architecture_meta(cfg: RunConfig, dm: Any) -> dict[str, Any]:
    """The network's architecture and task, as stored beside its weights (and checked against a
    target's before a source is merged or transferred)."""
    return {
        "arch": cfg.net.arch,
        "in_channels": dm.in_channels,
        "n_classes": dm.n_outputs,
        **cfg.net.architecture(),  # name and sizes (base_filters, depth for isensee2017)
        "output_mode": dm.output_mode,
        "class_names": list(dm.class_names),
        "channels": list(dm.modalities),
    }


def segmentation_module(
    net: nn.Module,
    dm: Any,
    cfg: RunConfig,
    patch_size: int,
    optim: OptimConfig | None = None,
    group_lrs: Mapping[str, float] | None = None,
    metrics: MetricsConfig | None = None,
) -> SegmentationModule:
    """The stage's LightningModule for ``net`` on ``dm``'s task, from the run config (``metrics``:
    how its test scores are computed, a target run's ``cfg.metrics``; None: the defaults)."""
    return SegmentationModule(
        net,
        output_mode=dm.output_mode,
        class_names=dm.class_names,
        patch_size=patch_size,
        optim=optim or cfg.optim,
        loss=cfg.loss,
        channels_last=cfg.net.channels_last,
        compile=resolve_compile(cfg.trainer.compile, cfg.trainer.accelerator),
        group_lrs=group_lrs,
        scheme=getattr(dm, "scheme", None),
        metrics=metrics,
    )
