"""BraTS target stages: initialise the network one way or another, then fine-tune and test.

Initialisations are registry entries chosen by ``init=…`` (paper §4.3), so a sweep is a list of
names:

========== ==============================================================================
none       no transfer: fresh He initialisation
m1, m2     parameter transfer from one source model (``sources[0]`` / ``sources[1]``)
all-hcp*   parameter transfer from an All-HCP baseline model (paper's "Understanding T-IMM")
imm        eq. 2 with uniform α (Fisher-weighted mode-IMM) over all ``sources``
mean-imm   uniform α and unit Fishers (plain averaging)
timm       adaption stage (learn α per layer and S) → fine-tune (paper §3.3)
mean-timm  timm with unit Fishers: learned α alone (a supervised layer-wise AdaMerging), the
           ablation that tells the Fisher weighting's contribution from the learned α's
========== ==============================================================================

Every initialisation treats S alike (``transfer.specific``): ``reinit`` (default, paper §3.2)
starts the instance norms and heads fresh for every method, ``keep`` takes the norms from the
source(s) (the mean of the sources' for merges); the heads are always re-created. The sources'
Fishers are normalised before merging by ``fisher.normalize`` (default ``per_tensor``). Fused layers
whose shape differs between the sources and the target (the first convolution: 2 HCP channels
vs 4 BraTS modalities) are re-initialised and trained with S, as the original code effectively
did.

Outputs in ``runs/brats/p<portion>/<init>/`` (``…/seed<k>/<init>`` for ``seeds=[…]`` sweeps):
``model.ckpt``, ``stages.json`` (epochs and best validation score per stage, paper Table 3),
``test_per_subject.csv`` (Dice and HD95 per subject and region, in original geometry),
``predictions/<subject>.nii.gz`` (label maps 0/1/2/4; for portion 100 also
``predictions/validation/`` for the unlabelled set), ``alphas.json`` (timm), ``splits.json``,
``config.yaml`` and, written last, ``test_summary.json``. Formats: :mod:`tmerge.evaluate`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import Logger
from torch import nn

from tmerge.artifacts import TARGET_TYPE, is_reference, log_model
from tmerge.artifacts import resolve as resolve_artifact
from tmerge.callbacks import AlphaTrajectory
from tmerge.config import to_container
from tmerge.dashboard import log_alphas, log_test_results
from tmerge.data.brats import BraTSDataConfig, BraTSDataModule
from tmerge.errors import ConfigError, RunError
from tmerge.evaluate import (
    PREDICTIONS_DIR,
    VALIDATION_DIR,
    label_names,
    write_scores,
)
from tmerge.fisher import check_finite, load_fisher, normalize_fisher
from tmerge.io import file_sha256, read_json, write_json
from tmerge.loggers import LoggerConfig, stage_loggers, wandb_mode, wandb_run
from tmerge.merge import AdaptiveMerge, imm_merge, mergeable_layers
from tmerge.merge.methods import METHODS
from tmerge.modules.segmentation import SegmentationModule
from tmerge.nets import layer_groups, partition
from tmerge.paths import runs_dir
from tmerge.resume import is_rank_zero
from tmerge.runner import fit
from tmerge.stages.common import (
    FISHER_FILE,
    INIT_FILE,
    NET_FILE,
    SOURCE_MARKER,
    MergeFisherConfig,
    RunConfig,
    best_state_dict,
    check_init_matches,
    check_source_finished,
    fisher_epsilon,
    head_names,
    load_net,
    save_net,
    segmentation_module,
    stage_guard,
    start_run,
)
from tmerge.transfer import TransferConfig, average_parameters, transfer_parameters

log = logging.getLogger("tmerge")

MARKER = "test_summary.json"
ARCH_KEYS = ("base_filters", "depth")


@dataclass
class AdaptionConfig:
    """T-IMM adaption stage: learn the mixing ratios δ (and S) with the sources frozen.

    The stage ends when the validation loss stops improving (``patience``); ``max_epochs`` is a
    safety net. δ has its own learning rate: with Adam every parameter moves about one learning
    rate per step, and for two sources α¹ = σ(δ¹)/(σ(δ¹) + σ(δ²)) reaches 0.9 only once
    δ¹ − δ² ≈ 4.4. At the old shared rate of 5e-3 and a 6-epoch cap (96 steps at 4 %), α could
    not leave [0.38, 0.62].
    """

    max_epochs: int = 30  # a cap that seldom binds: early stopping on the validation loss ends it
    patience: int = 4  # validation checks without a lower validation loss
    lr: float = 5e-3  # S and re-initialised layers (the first convolution): fresh, so a large step
    # δ, chosen by measurement (docs/adaption.md). Capability test (useful source vs noise, 30-epoch
    # cap): 0.02 → useful side in 87 % of layers, mean α 0.70 (fails); 0.05 → 100 %, 0.84;
    # 0.1 → 100 %, 0.90; 0.2 → 100 %, 0.92. Embedded default at 4 % (seed 0), adaption val loss:
    # 0.05 → 0.540 (24 epochs), 0.1 → 0.541 (24), 0.2 → 0.580 (12: α jump to 0/1 and overshoot).
    delta_lr: float = 0.1
    # ε of eq. 2, relative to the mean Fisher entry (see stages.common.fisher_epsilon).
    eps: float = 1e-8

    def __post_init__(self) -> None:
        for key in ("lr", "delta_lr", "eps"):
            if not getattr(self, key) > 0:
                raise ConfigError(f"adaption.{key}: expected a positive number, got {getattr(self, key)!r}")
        if self.max_epochs < 1 or self.patience < 1:
            raise ConfigError(
                f"adaption.max_epochs/patience: expected positive counts, got {self.max_epochs}/{self.patience}"
            )


@dataclass
class VectorMergeConfig:
    """The task-vector initialisations (``task-arithmetic``, ``ties``, ``dare``, ``dare-ties``,
    ``slerp``; :mod:`tmerge.merge.task_vectors`). Each hyper-parameter is a list: one value or a small grid;
    with several candidates the one with the lowest validation loss after adapting S on the
    target (P frozen, S trained as the T-IMM adaption stage does) is chosen, before fine-tuning,
    and written to ``selection.json``."""

    # θ₀ of the task vectors τ_t = θ_t − θ₀. None: the first source's init.safetensors (the
    # random initialisation M1 started from; M2 descends from it too). A run name: that run's
    # trained weights (e.g. task1, which gives τ₂ = M2 − M1). Anything else: a safetensors file.
    base: str | None = None
    lam: list[float] = field(default_factory=lambda: [1.0])  # λ: scale of the merged task vector
    k: list[float] = field(default_factory=lambda: [20.0])  # TIES: % of entries kept (Yadav et al.)
    p: list[float] = field(default_factory=lambda: [0.5])  # DARE: drop probability (Yu et al.)
    t: list[float] = field(default_factory=lambda: [0.5])  # SLERP: 0 = first source, 1 = second
    seed: int = 0  # DARE's drop masks

    def __post_init__(self) -> None:
        from tmerge.merge.methods import check_value

        for key in ("lam", "k", "p", "t"):
            values = getattr(self, key)
            if not values:
                raise ConfigError(
                    f"merge.{key}: expected a list of one value or a small grid, got an empty list"
                )
            for value in values:
                try:
                    check_value(key, value, f"merge.{key}")
                except ValueError as exc:
                    raise ConfigError(str(exc)) from None
        if self.seed < 0:
            raise ConfigError(f"merge.seed: expected an integer >= 0, got {self.seed}")


@dataclass
class TargetStageConfig(RunConfig):
    """Config of a BraTS run (``tmerge timm``, ``tmerge imm``, ``tmerge target init=…``, sweeps)."""

    init: str = "timm"  # one of INITS (see the module docstring)
    sources: list[str] = field(default_factory=lambda: ["task1", "task2"])  # source run names
    # A sweep runs every entry of `inits` once per seed in `seeds`; with one seed the runs go
    # to runs/brats/p<portion>/<init>, with several to runs/brats/p<portion>/seed<k>/<init>.
    # The default compares T-IMM with every baseline and both ablations (unit Fishers with
    # uniform and with learned α) on the same splits and seeds.
    inits: list[str] = field(
        default_factory=lambda: ["none", "m1", "m2", "imm", "mean-imm", "mean-timm", "timm"]
    )
    seeds: list[int] = field(default_factory=lambda: [0])
    # The run folder's seed level: None → runs/brats/p<portion>/seed<k>/<init> when several seeds
    # are swept, runs/brats/p<portion>/<init> for one; true → always seed<k>/ (one run per
    # process, as a W&B agent or a SLURM array task runs them: experiments/sweeps, …/slurm).
    seed_folder: bool | None = None
    # How the sources' input channels feed the target's: entry i is the source channel whose
    # filters the target's channel i reuses, e.g. [0, 0, 1, 1] for HCP (T1, T2) → BraTS (t1,
    # t1ce, t2, flair). None: a first layer of another shape is re-initialised and trained with
    # S (what the original code effectively did); with a map it stays in P and is merged.
    channel_map: list[int] | None = None
    data: BraTSDataConfig = field(default_factory=BraTSDataConfig)
    adaption: AdaptionConfig = field(default_factory=AdaptionConfig)
    transfer: TransferConfig = field(default_factory=TransferConfig)
    fisher: MergeFisherConfig = field(default_factory=MergeFisherConfig)
    merge: VectorMergeConfig = field(default_factory=VectorMergeConfig)


ALIASES = {"portion": "data.portion", "epochs": "trainer.max_epochs"}


@dataclass(frozen=True)
class Initialisation:
    """How the target network's weights are obtained before fine-tuning."""

    kind: str  # "none" | "transfer" | "imm" | "timm" | "vector"
    source: Callable[[TargetStageConfig], list[str]] = lambda cfg: []
    fisher: bool = True  # False: mean-IMM (unit Fishers)
    method: str | None = None  # kind "vector": the tmerge.merge.methods entry

    @property
    def merges(self) -> bool:
        """Whether P is a merge of several sources (which then must share their architecture)."""
        return self.kind in ("imm", "timm", "vector")

    @property
    def needs_fisher(self) -> bool:
        return self.fisher and self.kind in ("imm", "timm")


def _nth(i: int) -> Callable[[TargetStageConfig], list[str]]:
    def pick(cfg: TargetStageConfig) -> list[str]:
        if len(cfg.sources) <= i:
            raise ConfigError(
                f"sources: init=m{i + 1} needs at least {i + 1} source runs, got {list(cfg.sources)}"
            )
        return [cfg.sources[i]]

    return pick


def _all_sources(cfg: TargetStageConfig) -> list[str]:
    return list(cfg.sources)


INITS: dict[str, Initialisation] = {
    "none": Initialisation("none"),
    "m1": Initialisation("transfer", _nth(0)),
    "m2": Initialisation("transfer", _nth(1)),
    "all-hcp": Initialisation("transfer", lambda cfg: ["all-hcp"]),
    "all-hcp-1-7": Initialisation("transfer", lambda cfg: ["all-hcp-1-7"]),
    "all-hcp-8-14": Initialisation("transfer", lambda cfg: ["all-hcp-8-14"]),
    "imm": Initialisation("imm", _all_sources),
    "mean-imm": Initialisation("imm", _all_sources, fisher=False),
    "timm": Initialisation("timm", _all_sources),
    "mean-timm": Initialisation("timm", _all_sources, fisher=False),
    **{
        m: Initialisation("vector", _all_sources, fisher=False, method=m)
        for m in ("task-arithmetic", "ties", "dare", "dare-ties", "slerp")
    },
}


def target_dir(cfg: TargetStageConfig, init: str, seed: int | None = None) -> Path:
    base = runs_dir(cfg.runs_dir) / "brats" / f"p{cfg.data.portion}"
    return base / init if seed is None else base / f"seed{seed}" / init


@dataclass
class Source:
    """A trained source model: its weights, Fisher and architecture."""

    name: str
    state: dict[str, torch.Tensor]
    meta: dict[str, Any]
    fisher: dict[str, torch.Tensor] | None


def map_input_channels(
    tensors: dict[str, torch.Tensor],
    target: dict[str, torch.Tensor],
    channel_map: list[int],
    *,
    rescale: bool,
) -> dict[str, torch.Tensor]:
    """Rebuild tensors whose input-channel axis (dim 1) differs from the target's by reusing the
    source channels named in ``channel_map``.

    Args:
        tensors: a source state dict or Fisher, name → ``(C_out, C_in_source, k, k, k)``, ….
        target: the target network's state dict (for the shapes).
        channel_map: ``C_in_target`` source-channel indices.
        rescale: divide each reused filter by the number of target channels that share its
            source channel, so the layer's response to inputs that look alike stays the same
            (weights yes; Fishers no).

    Returns:
        A copy of ``tensors`` with the mapped tensors replaced.

    Raises:
        ConfigError: the map names a source channel that does not exist.
    """
    if any(not isinstance(c, int) or c < 0 for c in channel_map):
        raise ConfigError(f"channel_map: expected source-channel indices >= 0, got {list(channel_map)}")
    out = dict(tensors)
    index = torch.tensor(channel_map)
    copies = torch.bincount(index).clamp(min=1)
    for name, tensor in tensors.items():
        want = target.get(name)
        if want is None or tensor.ndim < 2 or tensor.shape == want.shape:
            continue
        if (
            tensor.shape[0] != want.shape[0]
            or tensor.shape[2:] != want.shape[2:]
            or want.shape[1] != len(channel_map)
        ):
            continue
        if int(index.max()) >= tensor.shape[1] or int(index.min()) < 0:
            raise ConfigError(
                f"channel_map: {channel_map} names source channel {int(index.max())}, "
                f"but {name} has {tensor.shape[1]} input channels (0…{tensor.shape[1] - 1})"
            )
        mapped = tensor.index_select(1, index)
        if rescale:
            mapped = mapped / copies[index].view(1, -1, *([1] * (tensor.ndim - 2))).to(mapped.dtype)
        out[name] = mapped
    return out


def load_sources(
    cfg: TargetStageConfig,
    names: list[str],
    fused: list[str],
    with_fisher: bool,
    target: dict[str, torch.Tensor] | None = None,
) -> list[Source]:
    """Load source runs by name, checking they exist and match the target architecture; with
    ``cfg.channel_map``, adapt their input layer to the ``target`` state dict's shapes."""
    root = runs_dir(cfg.runs_dir)
    expected = {"base_filters": cfg.net.base_filters, "depth": cfg.net.depth}
    sources = []
    for name in names:
        folder = root / name
        if is_reference(name):  # a W&B artifact: its files, from the local cache or downloaded
            files = (NET_FILE, SOURCE_MARKER, *((FISHER_FILE,) if with_fisher else ()))
            folder = resolve_artifact(name, root, wandb_mode(cfg.logger), files)
        path = folder / NET_FILE
        hint = f"make {name}" if name in ("task1", "task2") else f"tmerge source … name={name}"
        if not path.is_file():
            raise RunError(f"source model {name!r} not found: {path} does not exist; train it first ({hint})")
        check_source_finished(path, hint)
        state, meta = load_net(path)
        diffs = [
            f"{k}={meta.get(k)!r} (target {expected[k]!r})" for k in ARCH_KEYS if meta.get(k) != expected[k]
        ]
        if diffs:
            raise RunError(f"{path}: source of another architecture than the target net: {', '.join(diffs)}")
        fisher = None
        if with_fisher:
            # Every fused parameter of the source has a Fisher (its first layer included, though
            # a first layer of another shape than the target's is not merged).
            fisher_path = folder / FISHER_FILE
            fisher = load_fisher(fisher_path, expected_names=[n for n in fused if n in state])
            check_fisher_matches(fisher_path, fisher, path, state, meta)
        if cfg.channel_map is not None:
            if target is None:
                raise ValueError("load_sources: channel_map needs the target state dict")
            state = map_input_channels(state, target, list(cfg.channel_map), rescale=True)
            if fisher is not None:
                fisher = map_input_channels(fisher, target, list(cfg.channel_map), rescale=False)
        sources.append(Source(name, state, meta, fisher))
    outputs = {s.name: s.meta.get("n_classes") for s in sources}
    if len(sources) > 1 and len(set(outputs.values())) > 1:
        # Merged models share P but each keeps its own S and heads; sources of different label
        # counts are not the paper's setting (each source task has as many classes) and usually
        # mean a wrong run name.
        raise RunError(
            "sources: models to merge must solve tasks with the same number of classes, got "
            + ", ".join(f"{n}: {k} outputs" for n, k in outputs.items())
        )
    return sources


def check_fisher_matches(
    fisher_path: Path,
    fisher: dict[str, torch.Tensor],
    net_path: Path,
    state: dict[str, torch.Tensor],
    meta: dict[str, Any],
) -> None:
    """Refuse a Fisher that was not computed for the weights beside it: wrong shapes, a hash
    that differs from the one the weights recorded, or non-finite entries.

    Raises:
        RunError: naming the Fisher file and what does not match.
    """
    for key, value in fisher.items():
        if key in state and value.shape != state[key].shape:
            raise RunError(
                f"{fisher_path}: Fisher of another model: {key} has shape {tuple(value.shape)}, "
                f"the weights in {net_path} {tuple(state[key].shape)}"
            )
    recorded = meta.get("fisher_sha256")
    if recorded and file_sha256(fisher_path) != recorded:
        raise RunError(
            f"{fisher_path}: not the Fisher computed for {net_path} (its hash differs from the one "
            "recorded with the weights); restore the run's own Fisher or retrain it with force=true"
        )
    check_finite(fisher, str(fisher_path))


@dataclass
class Initialised:
    """A target network after its initialisation, and what a T-IMM adaption needs besides."""

    net: nn.Module
    layers: dict[str, list[str]] = field(default_factory=dict)  # merged layers → parameter names
    fishers: list[dict[str, torch.Tensor]] | None = None  # normalised; None: unit Fishers
    eps: float = 0.0
    specific_kept: list[str] = field(default_factory=list)  # S tensors taken from the sources


def initialise(
    cfg: TargetStageConfig,
    init: Initialisation,
    net: nn.Module,
    sources: list[Source],
    base: dict[str, torch.Tensor] | None = None,
    params: dict[str, Any] | None = None,
) -> Initialised:
    """Initialise a freshly built target ``net`` (in place) by ``init``.

    * ``none``: as built. ``transfer``: every tensor of the source whose shape matches, except S
      under ``transfer.specific=reinit`` (the heads in any case). ``imm``: P by eq. 2 with uniform
      α. ``timm``: P is left to the adaption stage (:class:`~tmerge.merge.AdaptiveMerge`).
      ``vector``: P by the method of :mod:`tmerge.merge.methods` from the sources and ``base``
      (θ₀) with ``params`` (one candidate of :func:`vector_candidates`).
    * Under ``transfer.specific=keep`` the merged initialisations take the instance norms as the
      mean of the sources' (the uniform α every merge starts from; T-IMM's adaption then trains
      them, as all of S).

    Returns:
        The net and, for merges, the mergeable layers, the normalised Fishers (None for the
        ``mean-`` variants) and eq. 2's ε.
    """
    fused, specific = partition(net)
    heads = set(head_names(net, specific))
    norms = [n for n in specific if n not in heads]
    keep = cfg.transfer.specific == "keep"
    if init.kind == "none":
        return Initialised(net)
    if init.kind == "transfer":
        report = transfer_parameters(net, sources[0].state, exclude=heads if keep else set(specific))
        log.info("%s: transfer from %s — %s", cfg.init, sources[0].name, report.summary())
        return Initialised(net, specific_kept=[n for n in norms if n in report.copied])
    layers, mismatched = mergeable_layers(net, [s.state for s in sources], layer_groups(net, fused))
    if mismatched:
        log.info(
            "%s: layers of other shape in the sources, re-initialised and trained with S: %s",
            cfg.init,
            ", ".join(mismatched),
        )
    fishers = None
    if init.fisher:
        if any(s.fisher is None for s in sources):
            raise ValueError(
                f"initialise: {cfg.init} merges by the Fisher, but a source was loaded without one"
            )
        fishers = [normalize_fisher(s.fisher, cfg.fisher.normalize) for s in sources]
    eps = fisher_epsilon(fishers, cfg.adaption.eps)
    kept = average_parameters(net, [s.state for s in sources], norms) if keep else []
    if init.kind == "imm":
        alphas = torch.full((len(sources),), 1.0 / len(sources))
        merged = imm_merge([s.state for s in sources], fishers, alphas, layers=layers, eps=eps)
        net.load_state_dict({**net.state_dict(), **merged})
    elif init.kind == "vector":
        spec = METHODS[str(init.method)]
        if spec.base and base is None:
            raise ValueError(f"initialise: {cfg.init} needs the base θ₀")
        names = [n for ns in layers.values() for n in ns]
        merged = spec.run(
            [{n: s.state[n] for n in names} for s in sources],
            None if base is None else {n: base[n] for n in names},
            None,
            **(params or vector_candidates(cfg, init)[0]),
        )
        net.load_state_dict({**net.state_dict(), **merged})
    return Initialised(net, layers, fishers, eps, kept)


def vector_candidates(cfg: TargetStageConfig, init: Initialisation) -> list[dict[str, Any]]:
    """The hyper-parameter candidates of a task-vector initialisation: the product of the
    ``merge.*`` lists it uses (λ, k, p, t), each with ``merge.seed`` for DARE."""
    spec = METHODS[str(init.method)]
    grid = [dict()]  # type: list[dict[str, Any]]
    for key in spec.params:
        values = [cfg.merge.seed] if key == "seed" else list(getattr(cfg.merge, key))
        grid = [{**g, key: v} for g in grid for v in values]
    return grid


def load_base(
    cfg: TargetStageConfig, source_names: list[str], target: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """θ₀ of the task-vector methods (``merge.base``), input layer mapped like the sources'.

    Raises:
        RunError: the file does not exist, is unreadable, or is not the init its run recorded.
    """
    root = runs_dir(cfg.runs_dir)
    if cfg.merge.base is None:
        first = root / source_names[0]
        if is_reference(source_names[0]):
            first = resolve_artifact(source_names[0], root, wandb_mode(cfg.logger), (INIT_FILE,))
        path = first / INIT_FILE
        hint = f"retrain {source_names[0]} with this version (it saves its initial weights) or set merge.base"
    elif (root / cfg.merge.base / NET_FILE).is_file():
        path, hint = root / cfg.merge.base / NET_FILE, ""
    else:
        path, hint = Path(cfg.merge.base).expanduser(), "set merge.base to a run name or a safetensors file"
    if not path.is_file():
        raise RunError(f"merge.base: {path} does not exist; {hint}")
    check_init_matches(path)
    state, _ = load_net(path)
    if cfg.channel_map is not None:
        state = map_input_channels(state, target, list(cfg.channel_map), rescale=True)
    return state


def check_base(
    path_hint: str, base: dict[str, torch.Tensor], sources: list[Source], layers: dict[str, list[str]]
) -> None:
    """Refuse a base θ₀ that lacks a merged parameter or holds it in another shape than the sources.

    Raises:
        RunError: naming the base and the first such parameter.
    """
    for names in layers.values():
        for n in names:
            if n not in base:
                raise RunError(
                    f"merge.base: {path_hint} has no {n!r}; expected the weights the sources started from"
                )
            if base[n].shape != sources[0].state[n].shape:
                raise RunError(
                    f"merge.base: {path_hint}: {n!r} has shape {tuple(base[n].shape)}, the sources "
                    f"{tuple(sources[0].state[n].shape)}; expected the weights the sources started from"
                )


def select_candidate(
    cfg: TargetStageConfig,
    init: Initialisation,
    dm: BraTSDataModule,
    sources: list[Source],
    base: dict[str, torch.Tensor] | None,
    run_dir: Path,
) -> dict[str, Any]:
    """The candidate of :func:`vector_candidates` to fine-tune: the only one, or the one whose
    merged P, frozen, reaches the lowest validation loss after S (norms, heads, re-initialised
    layers) is trained as in the T-IMM adaption stage (``adaption.lr``, early stopping on the
    validation loss, ``adaption.max_epochs``). Writes ``selection.json`` when it chose."""
    candidates = vector_candidates(cfg, init)
    if len(candidates) == 1:
        return candidates[0]
    scores = []
    for i, params in enumerate(candidates):
        L.seed_everything(cfg.seed, workers=True, verbose=False)
        start = initialise(cfg, init, cfg.net.build(dm.in_channels, dm.n_outputs), sources, base, params)
        frozen = {n for ns in start.layers.values() for n in ns}
        for name, param in start.net.named_parameters():
            param.requires_grad_(name not in frozen)
        module = segmentation_module(
            start.net, dm, cfg, cfg.data.patch_size, optim=dataclasses.replace(cfg.optim, lr=cfg.adaption.lr)
        )
        label = f"p{cfg.data.portion}/{cfg.init} selection {i + 1}/{len(candidates)} {params}"
        _, result = fit(
            module,
            dm,
            run_dir=run_dir / "selection" / str(i),
            trainer_cfg=cfg.trainer,
            monitor="val/loss",
            mode="min",
            name=label,
            max_epochs=cfg.adaption.max_epochs,
            patience=cfg.adaption.patience,
        )
        scores.append({"params": params, "val_loss": result.best_score, "epochs": result.epochs})
        log.info("%s: best val loss %.4f", label, result.best_score or float("nan"))
    best = min(scores, key=lambda r: float("inf") if r["val_loss"] is None else r["val_loss"])
    if is_rank_zero():
        record = {"method": init.method, "candidates": scores, "chosen": best["params"]}
        write_json(run_dir / "selection.json", record)
    log.info("%s: chose %s (val loss %.4f)", cfg.init, best["params"], best["val_loss"] or float("nan"))
    return best["params"]


def run_config(cfg: TargetStageConfig, init: str | None = None, seed: int | None = None) -> TargetStageConfig:
    """The config of one run: ``cfg`` for ``init`` and ``seed`` (default: ``cfg``'s), with the
    train/val draw resolved (``data.draw_seed`` None → the run's seed) so that every
    initialisation of a seed trains and validates on the same subjects."""
    init = cfg.init if init is None else init
    seed = cfg.seed if seed is None else seed
    draw = seed if cfg.data.draw_seed is None else cfg.data.draw_seed
    return dataclasses.replace(cfg, init=init, seed=seed, data=dataclasses.replace(cfg.data, draw_seed=draw))


def run_target(cfg: TargetStageConfig) -> Path:
    """Initialise by ``cfg.init``, (adapt,) fine-tune and test one BraTS run; return its folder."""
    if cfg.init not in INITS:
        raise ConfigError(f"init: expected one of {', '.join(INITS)}, got {cfg.init!r}")
    init = INITS[cfg.init]
    per_seed = cfg.seed_folder if cfg.seed_folder is not None else len(cfg.seeds) > 1
    run_dir = target_dir(cfg, cfg.init, cfg.seed if per_seed else None)
    cfg = run_config(cfg)
    source_names = init.source(cfg)
    if init.merges and len(source_names) < 2:
        raise ConfigError(f"sources: init={cfg.init} merges at least 2 source runs, got {source_names}")
    if init.kind == "vector" and METHODS[str(init.method)].models not in (None, len(source_names)):
        raise ConfigError(
            f"sources: init={cfg.init} merges exactly {METHODS[str(init.method)].models} source runs, "
            f"got {source_names}"
        )
    run_cfg = dataclasses.replace(cfg, inits=[cfg.init], seeds=[cfg.seed])
    # Everything that can fail on the user's input (sources, architectures, Fishers) is checked
    # before the run folder is touched. The DataModule does no I/O before prepare_data.
    dm = BraTSDataModule(**dataclasses.asdict(cfg.data), run_dir=str(run_dir))
    net = cfg.net.build(dm.in_channels, dm.n_outputs)
    fused, _ = partition(net)
    sources = load_sources(
        cfg,
        source_names,
        fused,
        with_fisher=init.needs_fisher,
        target=net.state_dict(),
    )
    base = None
    if init.kind == "vector" and METHODS[str(init.method)].base:
        base = load_base(cfg, source_names, net.state_dict())
        layers, _ = mergeable_layers(net, [s.state for s in sources], layer_groups(net, fused))
        check_base(cfg.merge.base or f"{source_names[0]}/{INIT_FILE}", base, sources, layers)
    dm.check_layout()
    with stage_guard(run_dir):
        if not start_run(run_dir, run_cfg, MARKER, force=cfg.force):
            log.info("%s is finished; pass force=true to run it again", run_dir)
            return run_dir

        stages: dict[str, Any] = {
            "init": cfg.init,
            "sources": source_names,
            "specific": cfg.transfer.specific,
            "fisher_normalize": cfg.fisher.normalize if init.needs_fisher else None,
        }
        tags = [f"p{cfg.data.portion}", cfg.init, f"seed{cfg.seed}"]
        # One W&B run for the whole process, every stage under its own key prefix (what
        # `wandb agent`, which pins the process's run id, expects; see tmerge.loggers).
        name = f"p{cfg.data.portion}-{cfg.init}"
        with wandb_run(_logger_cfg(cfg, tags), runs_dir(cfg.runs_dir), name, to_container(run_cfg)) as run:
            _run_stages(cfg, init, dm, sources, base, run_dir, run, stages)
        return run_dir


def _run_stages(
    cfg: TargetStageConfig,
    init: Initialisation,
    dm: BraTSDataModule,
    sources: list[Source],
    base: dict[str, torch.Tensor] | None,
    run_dir: Path,
    run: Logger | None,
    stages: dict[str, Any],
) -> None:
    """Initialise, (select a candidate, adapt,) fine-tune and test one run in its locked folder;
    ``stages`` (the run's summary so far) is completed and written to ``stages.json``."""
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    net = cfg.net.build(dm.in_channels, dm.n_outputs)  # fresh initialisation under the run's seed
    params = None
    if init.kind == "vector":
        params = select_candidate(cfg, init, dm, sources, base, run_dir)
        stages["merge"] = {"method": init.method, "params": params}
        L.seed_everything(cfg.seed, workers=True, verbose=False)  # S as fresh as for every init
        net = cfg.net.build(dm.in_channels, dm.n_outputs)
    start = initialise(cfg, init, net, sources, base, params)
    net = start.net
    if init.kind == "timm":
        net, stages["adaption"] = adapt(cfg, dm, net, sources, start, run_dir, run)

    module = segmentation_module(net, dm, cfg, cfg.data.patch_size)
    loggers = stage_loggers(run_dir, run, "finetune")
    trainer, result = fit(
        module,
        dm,
        run_dir=run_dir,
        trainer_cfg=cfg.trainer,
        loggers=loggers,
        name=f"p{cfg.data.portion}/{cfg.init} fine-tune",
    )
    stages["finetune"] = result.as_dict()
    # Test in original geometry; label maps to predictions/ (see tmerge.evaluate).
    module.export_dir = run_dir / PREDICTIONS_DIR
    trainer.test(module, datamodule=dm, ckpt_path=result.best_path or None, verbose=False, weights_only=True)
    _export_unlabelled(trainer, module, dm, run_dir, result.best_path)
    log_test_results(
        loggers,
        module.test_records,
        dm.class_names,
        module.test_previews,
        label_names(dm.output_mode, dm.class_names),
        step=trainer.global_step,
    )
    if trainer.is_global_zero:
        write_json(run_dir / "stages.json", stages)
        # The fine-tuned best weights (trainer.test loaded them), for prediction and export.
        meta = {
            "arch": "Isensee2017",
            "in_channels": dm.in_channels,
            "n_classes": dm.n_outputs,
            "base_filters": cfg.net.base_filters,
            "depth": cfg.net.depth,
            "output_mode": dm.output_mode,
            "class_names": list(dm.class_names),
            "init": cfg.init,
            "portion": cfg.data.portion,
            "seed": cfg.seed,
            "sources": list(stages["sources"]),
        }
        save_net(run_dir / NET_FILE, module.net, meta)
        summary = write_test_results(run_dir, module.test_records, dm.class_names)
        log.info("%s p%s: test %s", cfg.init, cfg.data.portion, format_summary(summary))
        files = {f: run_dir / f for f in (NET_FILE, "stages.json", MARKER)}
        name = f"brats-p{cfg.data.portion}-{cfg.init}-seed{cfg.seed}"
        log_model(run, name, TARGET_TYPE, files, {**meta, "test": summary})


def _export_unlabelled(
    trainer: L.Trainer, module: SegmentationModule, dm: BraTSDataModule, run_dir: Path, best_path: str
) -> None:
    """Predict the unlabelled validation set (the 100 % portion's, paper §4.4) into
    ``predictions/validation/<Brats18_ID>.nii.gz``, the BraTS submission naming."""
    if not dm.subjects.get("predict"):
        return
    module.export_dir = run_dir / PREDICTIONS_DIR / VALIDATION_DIR
    log.info("predicting %d unlabelled subjects into %s", len(dm.subjects["predict"]), module.export_dir)
    trainer.predict(
        module, datamodule=dm, ckpt_path=best_path or None, return_predictions=False, weights_only=True
    )


def _logger_cfg(cfg: TargetStageConfig, tags: list[str]) -> LoggerConfig:
    wandb = dataclasses.replace(
        cfg.logger.wandb,
        group=cfg.logger.wandb.group or f"brats-p{cfg.data.portion}",
        tags=[*cfg.logger.wandb.tags, *tags],
    )
    return LoggerConfig(wandb=wandb)


def adapt(
    cfg: TargetStageConfig,
    dm: BraTSDataModule,
    net: nn.Module,
    sources: list[Source],
    start: Initialised,
    run_dir: Path,
    run: Logger | None,
) -> tuple[nn.Module, dict[str, Any]]:
    """T-IMM adaption stage: train δ (at ``adaption.delta_lr``) and S (at ``adaption.lr``) on the
    target with the sources frozen until the validation loss stops improving; return the net
    with P materialised from the α of the best epoch (S kept) and the stage's summary. Writes
    ``alphas.json``: the final α and their trajectory over the epochs."""
    adaptive = AdaptiveMerge(net, [s.state for s in sources], start.fishers, start.layers, eps=start.eps)
    module = segmentation_module(
        adaptive,
        dm,
        cfg,
        cfg.data.patch_size,
        optim=dataclasses.replace(cfg.optim, lr=cfg.adaption.lr),
        group_lrs={"net.mixing.": cfg.adaption.delta_lr},
    )
    names = [s.name for s in sources]
    trajectory = AlphaTrajectory(adaptive.mixing, names)
    stage_dir = run_dir / "adaption"
    label = f"p{cfg.data.portion}/{cfg.init} adaption"
    loggers = stage_loggers(stage_dir, run, "adaption")
    trainer, result = fit(
        module,
        dm,
        run_dir=stage_dir,
        trainer_cfg=cfg.trainer,
        loggers=loggers,
        monitor="val/loss",
        mode="min",
        callbacks=[trajectory],
        name=label,
        max_epochs=cfg.adaption.max_epochs,
        patience=cfg.adaption.patience,
    )
    if result.best_path:  # continue from the adaption epoch with the lowest validation loss
        module.load_state_dict(best_state_dict(result.best_path, prefix=""))
    scores = result.best_metrics
    alphas = adaptive.mixing.alphas_dict()
    # δ's gradients are all-reduced like any parameter's, so every rank must hold the same α;
    # check it rather than trust it (a rank that diverged would fine-tune another model).
    # (Without a process group — one process, or a re-run that skipped the finished adaption —
    # every rank has just loaded the same checkpoint.)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        deltas = trainer.strategy.all_gather(adaptive.mixing.delta.detach())
        deltas = deltas.reshape(-1, *adaptive.mixing.delta.shape)
        spread = float((deltas - deltas[0]).abs().max())
        if spread > 1e-6:
            raise RunError(
                f"{cfg.init} adaption: the DDP ranks ended with different mixing ratios (max |Δδ| = {spread:.3g})"
            )
    epochs = trajectory.trajectory
    alphas_file = run_dir / "alphas.json"
    if not epochs and alphas_file.is_file():
        # A re-run after a kill that came after the adaption: its fit is not repeated, so the
        # trajectory is the one the first attempt recorded.
        epochs = read_json(alphas_file).get("trajectory", [])
    if trainer.is_global_zero:
        write_json(
            alphas_file,
            {
                "sources": names,
                "layers": list(alphas),
                "alphas": alphas,
                "best_epoch": result.best_epoch,
                "trajectory": epochs,
                "delta_lr": cfg.adaption.delta_lr,
                "fisher": cfg.fisher.normalize if start.fishers is not None else "unit",
                "world_size": trainer.world_size,
                "ranks_agree": True,
            },
        )
    log_alphas(loggers, alphas, names, step=trainer.global_step, trajectory=epochs)  # paper Fig. 5
    summary = {**result.as_dict(), "val_dice": scores.get("val/dice"), "val_loss": scores.get("val/loss")}
    first = [a[0] for a in alphas.values()]
    log.info(
        "%s: %d epochs (best %s), val Dice %.3f, val loss %.4f; α of %s per layer %.2f–%.2f (mean %.2f): %s",
        label,
        result.epochs,
        result.best_epoch,
        summary["val_dice"] or float("nan"),
        summary["val_loss"] or float("nan"),
        names[0],
        min(first),
        max(first),
        sum(first) / len(first),
        " ".join(f"{a:.2f}" for a in first),
    )
    return adaptive.release(), summary


def write_test_results(
    run_dir: Path, records: list[dict[str, Any]], class_names: list[str]
) -> dict[str, Any]:
    """Write ``test_per_subject.csv`` and, last, ``test_summary.json`` (the run's finished marker).

    Args:
        run_dir: The run folder.
        records: Per-subject scores ``subject``, ``dice_<c>``, ``hd95_<c>`` (any order).
        class_names: The scored classes (``ET``, ``TC``, ``WT``).

    Returns:
        The summary: ``{"n", "dice": {<c>…, "mean"}, "hd95": {<c>…}}`` (formats:
        :mod:`tmerge.evaluate`).
    """
    return write_scores(run_dir / "test_per_subject.csv", run_dir / MARKER, records, class_names)


def format_summary(summary: dict[str, Any]) -> str:
    """One line of a ``test_summary.json``: Dice per class and mean, HD95 per class, n."""

    def num(value: float | None, spec: str) -> str:
        return "n/a" if value is None else format(value, spec)

    dice = ", ".join(f"{k} {num(v, '.3f')}" for k, v in summary["dice"].items())
    hd95 = ", ".join(f"{k} {num(v, '.1f')}" for k, v in summary["hd95"].items())
    return f"Dice {dice}; HD95 {hd95} mm (n={summary['n']})"


def run_sweep(cfg: TargetStageConfig) -> None:
    """Every initialisation in ``cfg.inits``, once per seed in ``cfg.seeds``, on identical splits.

    Logs a line when each run starts (``run k/N``) and one summary line when it has finished.
    """
    runs = [(seed, init) for seed in cfg.seeds for init in cfg.inits]
    for k, (seed, init) in enumerate(runs, start=1):
        log.info("sweep p%s: run %d/%d — seed %d, %s", cfg.data.portion, k, len(runs), seed, init)
        run_dir = run_target(dataclasses.replace(cfg, init=init, seed=seed))  # draw: see run_config
        if not (run_dir / MARKER).is_file():  # a DDP rank other than 0: rank 0 writes the marker
            continue
        summary = json.loads((run_dir / MARKER).read_text())
        log.info("sweep p%s seed %d %-12s test %s", cfg.data.portion, seed, init, format_summary(summary))
