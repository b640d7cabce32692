"""Source run folders (``<runs>/<name>/``) as ``tmerge task1``/``task2`` leave them — weights with
their metadata, a Fisher, the finished marker — made without training."""

from __future__ import annotations

from pathlib import Path

import torch

from tmerge.io import file_sha256, write_safetensors
from tmerge.nets import Isensee2017, partition
from tmerge.runs import save_net


def fake_source(
    runs: Path,
    name: str,
    *,
    base_filters: int = 4,
    in_channels: int = 2,
    n_classes: int = 8,
    fisher_drop: int = 0,
    fisher_hash: bool = False,
    seed: int | None = None,
) -> Path:
    """Write a finished source run of a small Isensee2017 (depth 3) with random weights and a
    random positive Fisher of its fused parameters; return its folder.

    Args:
        fisher_drop: leave the first this many fused parameters out of the Fisher.
        fisher_hash: record the Fisher's SHA-256 beside the weights, as training does (a test
            that edits the Fisher afterwards leaves it out, to meet the check it targets).
        seed: seed the weights and the Fisher (default: the global generator as it stands).
    """
    if seed is not None:
        torch.manual_seed(seed)
    folder = runs / name
    net = Isensee2017(in_channels, n_classes, base_filters=base_filters, depth=3)
    meta = {
        "arch": "Isensee2017",
        "in_channels": in_channels,
        "n_classes": n_classes,
        "base_filters": base_filters,
        "depth": 3,
    }
    fused, _ = partition(net)
    fisher_path = folder / "fisher.safetensors"
    fisher = {n: torch.rand_like(p) for n, p in net.named_parameters() if n in fused[fisher_drop:]}
    write_safetensors(fisher_path, fisher)
    if fisher_hash:
        meta["fisher_sha256"] = file_sha256(fisher_path)
    save_net(folder / "net.safetensors", net, meta)
    (folder / "metrics.json").write_text("{}")  # a finished run
    return folder
