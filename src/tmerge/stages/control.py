"""``tmerge noise-source``: the negative control's source, a trained source whose fused layers are
seeded noise.

The known-answer control of a merge (docs/protocol.md): ``sources=[task1,task2,noise]`` merges a
source that knows nothing, so T-IMM's learned α must give it little weight. The noise source is
a copy of a finished source run (``from``) in which every fused tensor P is replaced by seeded
Gaussian noise of that tensor's own mean and standard deviation (the scale the merge sees is
the trained one's); S, the Fisher and θ₀ are the source's own files, so the Fisher weighting is
the same and only the knowledge in P is gone. The copy is a finished source run
(``runs/<name>/``) that every target stage loads like any other.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from tmerge.errors import ConfigError, RunError
from tmerge.io import read_json, write_json, write_safetensors
from tmerge.paths import runs_dir
from tmerge.runs import FISHER_FILE, INIT_FILE, NET_FILE, SOURCE_MARKER
from tmerge.sources import load_source

log = logging.getLogger("tmerge")


@dataclass
class NoiseSourceConfig:
    """Config of ``tmerge noise-source``."""

    source: str = "task1"  # the finished source run whose P is replaced (its Fisher, S and θ₀ kept)
    name: str = "noise"  # the new run folder, runs/<name>
    seed: int = 0  # of the noise
    runs_dir: str | None = None  # None: $TMERGE_RUNS or ./runs
    force: bool = False  # replace an existing runs/<name>

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name or self.name.startswith("."):
            raise ConfigError(f"name: expected a run folder name, got {self.name!r}")
        if self.name == self.source:
            raise ConfigError(f"name: the noise source needs its own folder, got source={self.source!r} too")


ALIASES = {"from": "source"}


def noise_like(state: Mapping[str, torch.Tensor], names: list[str], seed: int) -> dict[str, torch.Tensor]:
    """``state`` with each of ``names`` replaced by Gaussian noise of that tensor's mean and
    standard deviation (seeded: the same ``seed`` gives the same tensors, in ``names``' order)."""
    gen = torch.Generator().manual_seed(seed)
    out = dict(state)
    for name in names:
        t = state[name].to(torch.float32)
        std = float(t.std()) if t.numel() > 1 else 0.0
        noise = torch.randn(t.shape, generator=gen) * std + float(t.mean())
        out[name] = noise.to(state[name].dtype)
    return out


def run_noise_source(cfg: NoiseSourceConfig) -> Path:
    """Write ``runs/<name>``: the source's run with seeded-noise P; return the folder."""
    root = runs_dir(cfg.runs_dir)
    source = load_source(root, cfg.source, with_fisher=True)
    out = root / cfg.name
    marker = out / SOURCE_MARKER
    if out.exists() and not cfg.force:
        made = read_json(marker) if marker.is_file() else {}
        if made.get("control") == "noise" and (made.get("source"), made.get("seed")) == (cfg.source, cfg.seed):
            log.info("noise-source: %s is there (from %s, seed %d); pass force=true to remake it", out, cfg.source, cfg.seed)
            return out
        raise RunError(f"{out} exists and is not the noise of {cfg.source} with seed {cfg.seed}; pass force=true to replace it")
    assert source.fisher is not None
    fused = [n for n in source.state if n in source.fisher]  # P: what the Fisher covers
    state = noise_like(source.state, fused, cfg.seed)
    folder = source.folder or root / cfg.source
    tmp = out.with_name(f".{cfg.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    meta = {**source.meta, "control": {"kind": "noise", "source": cfg.source, "seed": cfg.seed}}
    write_safetensors(tmp / NET_FILE, state, {"tmerge": json.dumps(meta)})
    for name in (FISHER_FILE, INIT_FILE):
        if (folder / name).is_file():
            shutil.copyfile(folder / name, tmp / name)
    write_json(
        tmp / SOURCE_MARKER,
        {"control": "noise", "source": cfg.source, "seed": cfg.seed, "noised": len(fused)},
    )
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    log.info(
        "noise-source: %s = %s with %d fused tensors replaced by seeded noise (seed %d); its Fisher, S "
        "and θ₀ are %s's (use it as a source, e.g. sources=[task1,task2,%s])",
        out,
        cfg.source,
        len(fused),
        cfg.seed,
        cfg.source,
        cfg.name,
    )
    return out


__all__ = ["ALIASES", "NoiseSourceConfig", "noise_like", "run_noise_source"]
