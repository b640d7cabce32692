"""What an initialisation of a target run is: the registry entry (:class:`Initialisation`), what
its ``build`` gets (:class:`InitContext`) and what it returns (:class:`Initialised`).

The types alone, apart from the registry and its builders (:mod:`tmerge.stages.inits`), because
the stages on either side of a build use them too: the adaption stage takes an
:class:`Initialised`, the grid selection an :class:`Initialisation`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from tmerge.sources import Source
from tmerge.stages.configs import TargetStageConfig


@dataclass
class Initialised:
    """A target network after its initialisation, and what a T-IMM adaption needs besides."""

    net: nn.Module
    layers: dict[str, list[str]] = field(default_factory=dict)  # merged layers → parameter names
    fishers: list[dict[str, torch.Tensor]] | None = None  # normalised; None: unit Fishers
    eps: float = 0.0
    specific_kept: list[str] = field(default_factory=list)  # S tensors taken from the sources


@dataclass
class InitContext:
    """What an entry's ``build`` gets: the run's config, the target network freshly built under
    the run's seed (initialised in place), the loaded sources, θ₀ where the entry needs it, and
    the hyper-parameters of the candidate being built (entries with a grid)."""

    cfg: TargetStageConfig
    net: nn.Module
    sources: list[Source]
    base: dict[str, torch.Tensor] | None = None
    params: dict[str, Any] | None = None


def _no_sources(cfg: TargetStageConfig) -> list[str]:
    return []


@dataclass(frozen=True)
class Initialisation:
    """How the target network's weights are obtained before fine-tuning: one registry entry.

    Attributes:
        build: Sets the weights of ``ctx.net`` (in place) and returns them as :class:`Initialised`.
        sources: The source run names it needs, from the config.
        fisher: Whether the sources are loaded with their Fishers.
        merges: Whether P is a merge of several sources (≥ 2, of one architecture).
        models: Exactly this many sources (None: any).
        base: Whether it needs θ₀ (``merge.base``; the task-vector methods).
        candidates: A grid of hyper-parameters, chosen on validation when it has several
            (:mod:`tmerge.stages.selection`); None: no grid.
        adapt: A stage between the initialisation and the fine-tune (T-IMM's adaption): it gets
            ``(cfg, dm, net, sources, start, run_dir, wandb_run)`` and returns the network to
            fine-tune and the stage's summary for the stages' record.
        method: The name recorded with the grid's choice.
    """

    build: Callable[[InitContext], Initialised]
    sources: Callable[[TargetStageConfig], list[str]] = _no_sources
    fisher: bool = False
    merges: bool = False
    models: int | None = None
    base: bool = False
    candidates: Callable[[TargetStageConfig], list[dict[str, Any]]] | None = None
    adapt: Callable[..., tuple[nn.Module, dict[str, Any]]] | None = None
    method: str | None = None
