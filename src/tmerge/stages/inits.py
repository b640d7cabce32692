"""The initialisations of a target run (paper §4.3): a registry of entries that build themselves.

``init=<name>`` picks an entry of :data:`INITS`; a sweep is a list of names. Each entry says
which sources it needs (and whether with their Fishers or θ₀), builds the target network's
weights from them (:meth:`Initialisation.build`) and may add a stage before fine-tuning (T-IMM's
adaption) or a grid of hyper-parameters chosen on validation (the task-vector methods). Adding
an initialisation is one :func:`register` call; the orchestration (:mod:`tmerge.stages.target`)
knows none of them by name.

========== ==============================================================================
none       no transfer: fresh He initialisation
m1, m2     parameter transfer from one source model (``sources[0]`` / ``sources[1]``)
all-hcp*   parameter transfer from an All-HCP baseline model (paper's "Understanding T-IMM")
imm        eq. 2 with uniform α (Fisher-weighted mode-IMM) over all ``sources``
mean-imm   uniform α and unit Fishers (plain averaging)
timm       adaption stage (learn α per layer and S) → fine-tune (paper §3.3)
mean-timm  timm with unit Fishers: learned α alone (a supervised layer-wise AdaMerging), the
           ablation that tells the Fisher weighting's contribution from the learned α's
task-arithmetic, ties, dare, dare-ties, slerp
           task-vector merges of :mod:`tmerge.merge.methods` (θ₀: ``merge.base``)
========== ==============================================================================

The merges of P (imm, mean-imm and the task-vector methods) run the methods' table of
:mod:`tmerge.merge.methods`, as ``tmerge merge`` does: a method is implemented once.

Every initialisation treats S alike (``transfer.specific``): ``reinit`` (default, paper §3.2)
starts the instance norms and heads fresh for every method, ``keep`` takes the norms from the
source(s) (the mean of the sources' for merges); the heads are always re-created. The sources'
Fishers are normalised before merging by ``fisher.normalize`` (default ``per_tensor``). Fused
layers whose shape differs between the sources and the target (the first convolution: 2 HCP
channels vs 4 BraTS modalities) are re-initialised and trained with S.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from tmerge.errors import ConfigError
from tmerge.fisher import normalize_fisher
from tmerge.merge import mergeable_layers
from tmerge.merge.imm import fisher_epsilon
from tmerge.merge.methods import METHODS
from tmerge.nets import head_names, layer_groups, partition
from tmerge.sources import Source
from tmerge.stages.adaption import adapt
from tmerge.stages.configs import TargetStageConfig
from tmerge.stages.initialisation import InitContext, Initialisation, Initialised
from tmerge.transfer import average_parameters, transfer_parameters

log = logging.getLogger("tmerge")


def _all_sources(cfg: TargetStageConfig) -> list[str]:
    return list(cfg.sources)


def nth_source(i: int) -> Callable[[TargetStageConfig], list[str]]:
    """``sources[i]`` of the config, or an error naming ``sources`` if there are fewer."""

    def pick(cfg: TargetStageConfig) -> list[str]:
        if len(cfg.sources) <= i:
            raise ConfigError(
                f"sources: init=m{i + 1} needs at least {i + 1} source runs, got {list(cfg.sources)}"
            )
        return [cfg.sources[i]]

    return pick


def named_source(name: str) -> Callable[[TargetStageConfig], list[str]]:
    """Always the source run ``name`` (the All-HCP baselines)."""
    return lambda cfg: [name]


# --- builders -------------------------------------------------------------------------------------
def build_none(ctx: InitContext) -> Initialised:
    """The network as built: a fresh He initialisation."""
    return Initialised(ctx.net)


def split_specific(net: nn.Module) -> tuple[list[str], set[str], list[str]]:
    """``(P, heads, norms)`` of ``net``: its fused parameters, and S split into the heads (always
    re-created for the target's classes) and the rest, the norms (``transfer.specific=keep``
    takes those from the sources)."""
    fused, specific = partition(net)
    heads = set(head_names(net, specific))
    return fused, heads, [n for n in specific if n not in heads]


def build_transfer(ctx: InitContext) -> Initialised:
    """Every tensor of the (one) source whose shape matches, except S under
    ``transfer.specific=reinit`` (the heads in any case)."""
    cfg, net, source = ctx.cfg, ctx.net, ctx.sources[0]
    _, heads, norms = split_specific(net)
    keep = cfg.transfer.specific == "keep"
    exclude = (heads if keep else heads | set(norms)) | source.reinit
    report = transfer_parameters(net, source.state, exclude=exclude)
    log.info("%s: transfer from %s — %s", cfg.init, source.name, report.summary())
    return Initialised(net, specific_kept=[n for n in norms if n in report.copied])


def prepare_merge(ctx: InitContext, with_fisher: bool) -> Initialised:
    """What every merge shares: the mergeable layers, the normalised Fishers (None: unit), eq. 2's
    ε and, under ``transfer.specific=keep``, the instance norms as the mean of the sources' (the
    uniform α every merge starts from). P itself is left as built."""
    cfg, net, sources = ctx.cfg, ctx.net, ctx.sources
    fused, _, norms = split_specific(net)
    layers, mismatched = mergeable_layers(net, [s.state for s in sources], layer_groups(net, fused))
    reinit = frozenset().union(*(s.reinit for s in sources))
    for layer in [name for name, params in layers.items() if reinit.intersection(params)]:
        del layers[layer]  # the input layer of channels the sources never saw
        mismatched.append(layer)
    if mismatched:
        log.info(
            "%s: layers of other shape or input channels in the sources, re-initialised and trained with S: %s",
            cfg.init,
            ", ".join(mismatched),
        )
    fishers = None
    if with_fisher:
        if any(s.fisher is None for s in sources):
            raise ValueError(
                f"initialise: {cfg.init} merges by the Fisher, but a source was loaded without one"
            )
        fishers = [normalize_fisher(s.fisher, cfg.fisher.normalize) for s in sources]
    eps = fisher_epsilon(fishers, cfg.adaption.eps)
    keep = cfg.transfer.specific == "keep"
    kept = average_parameters(net, [s.state for s in sources], norms) if keep else []
    return Initialised(net, layers, fishers, eps, kept)


def adaptive_builder(with_fisher: bool) -> Callable[[InitContext], Initialised]:
    """T-IMM: P is left to the adaption stage (:class:`~tmerge.merge.AdaptiveMerge`)."""
    return lambda ctx: prepare_merge(ctx, with_fisher)


#: What a builder passes a method of the table besides the models, θ₀ and the Fishers.
MethodParams = Callable[[InitContext, Initialised], dict[str, Any]]


def method_builder(method: str, params: MethodParams) -> Callable[[InitContext], Initialised]:
    """P by ``method`` of the merge methods' table (:data:`tmerge.merge.methods.METHODS`, the one
    ``tmerge merge`` runs) over the mergeable layers, from the sources (with their normalised
    Fishers where the method weighs by them) and θ₀ (where it needs it), with ``params``."""
    spec = METHODS[method]

    def build(ctx: InitContext) -> Initialised:
        if spec.base and ctx.base is None:
            raise ValueError(f"initialise: {ctx.cfg.init} needs the base θ₀")
        start = prepare_merge(ctx, with_fisher=spec.fishers)
        names = [n for ns in start.layers.values() for n in ns]
        merged = spec.run(
            [{n: s.state[n] for n in names} for s in ctx.sources],
            None if ctx.base is None else {n: ctx.base[n] for n in names},
            None if start.fishers is None else [{n: f[n] for n in names if n in f} for f in start.fishers],
            **params(ctx, start),
        )
        start.net.load_state_dict({**start.net.state_dict(), **merged})
        return start

    return build


def eq2_params(ctx: InitContext, start: Initialised) -> dict[str, Any]:
    """IMM's and mean-IMM's parameters: the table's uniform α, and eq. 2's ε of the run,
    ``adaption.eps`` relative to the mean entry of all the normalised Fishers (those of layers
    that are not merged included), the ε a T-IMM adaption of the same sources merges with."""
    params: dict[str, Any] = {"eps": ctx.cfg.adaption.eps}
    if start.fishers is not None:
        params["fisher_scale"] = fisher_epsilon(start.fishers, 1.0)
    return params


def candidate_params(method: str) -> MethodParams:
    """A task-vector method's parameters: the candidate being built, else the first of the grid."""
    return lambda ctx, start: ctx.params or vector_candidates(ctx.cfg, method)[0]


def vector_candidates(cfg: TargetStageConfig, method: str) -> list[dict[str, Any]]:
    """The hyper-parameter candidates of a task-vector method: the product of the ``merge.*``
    lists it uses (λ, k, p, t), each with ``merge.seed`` for DARE and ``merge.trim`` for TIES
    (single values, not grids)."""
    grid: list[dict[str, Any]] = [{}]
    for key in METHODS[method].params:
        single = key in ("seed", "trim")
        values = [getattr(cfg.merge, key)] if single else list(getattr(cfg.merge, key))
        grid = [{**g, key: v} for g in grid for v in values]
    return grid


# --- the registry -------------------------------------------------------------------------------
INITS: dict[str, Initialisation] = {}


def register(name: str, init: Initialisation) -> Initialisation:
    """Add (or replace) the initialisation ``name``; ``init=<name>``, sweeps and the report (in
    the registry's order) then know it."""
    INITS[name] = init
    return init


def _vector(method: str) -> Initialisation:
    spec = METHODS[method]
    return Initialisation(
        method_builder(method, candidate_params(method)),
        _all_sources,
        merges=True,
        models=spec.models,
        base=spec.base,
        candidates=lambda cfg: vector_candidates(cfg, method),
        method=method,
    )


# In the order of the paper's Table 2 (the report's columns), the task-vector methods and the
# All-HCP baselines after; entries registered later follow.
register("none", Initialisation(build_none))
register("m1", Initialisation(build_transfer, nth_source(0)))
register("m2", Initialisation(build_transfer, nth_source(1)))
register("imm", Initialisation(method_builder("imm", eq2_params), _all_sources, fisher=True, merges=True))
register("mean-imm", Initialisation(method_builder("mean-imm", eq2_params), _all_sources, merges=True))
register("mean-timm", Initialisation(adaptive_builder(False), _all_sources, merges=True, adapt=adapt))
register("timm", Initialisation(adaptive_builder(True), _all_sources, fisher=True, merges=True, adapt=adapt))
for _name in ("task-arithmetic", "ties", "dare", "dare-ties", "slerp"):
    register(_name, _vector(_name))
for _name in ("all-hcp", "all-hcp-1-7", "all-hcp-8-14"):
    register(_name, Initialisation(build_transfer, named_source(_name)))


def initialise(
    cfg: TargetStageConfig,
    init: Initialisation,
    net: nn.Module,
    sources: list[Source],
    base: dict[str, torch.Tensor] | None = None,
    params: dict[str, Any] | None = None,
) -> Initialised:
    """Initialise a freshly built target ``net`` (in place) by the entry ``init``."""
    return init.build(InitContext(cfg, net, sources, base, params))
