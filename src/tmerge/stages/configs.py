"""The stages' configs: what every training stage shares, the Fisher settings, and the
target stage's (initialisation, adaption, task-vector grids). Typed dataclasses, composed by
:mod:`tmerge.config` from ``experiments/*.yaml`` and ``key=value`` overrides; each checks its own
values and names the key it refuses."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from tmerge.config import check_count, check_number
from tmerge.data.datamodule import DataConfig
from tmerge.data.target import TargetDataConfig
from tmerge.errors import ConfigError
from tmerge.evaluate import MetricsConfig
from tmerge.fisher import check_options
from tmerge.loggers import LoggerConfig
from tmerge.modules.segmentation import LossConfig, OptimConfig
from tmerge.nets.config import NetConfig
from tmerge.runner import TrainerConfig


def check_fisher_options(**options: Any) -> None:
    """The Fisher's options of a config (:func:`tmerge.fisher.check_options`), refused as the
    user's error naming the ``fisher.*`` key."""
    try:
        check_options(**options, prefix="fisher.")
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


@dataclass
class FisherConfig:
    """Empirical-Fisher settings for the source models (computed once, after training)."""

    max_samples: int | None = None  # None: every training volume (18 for a paper task)
    # How the saved Fisher is scaled: "none" keeps the raw mean of squared gradients; the merge
    # stages normalise at merge time (their own `fisher.normalize`), so raw files serve every
    # choice. "sum" | "l2" | "per_tensor": see tmerge.fisher.normalize_fisher.
    normalize: str = "none"
    method: str = "auto"  # "auto" | "loop" | "vmap" | "compile" — all give the same numbers

    def __post_init__(self) -> None:
        check_fisher_options(normalize=self.normalize, method=self.method, max_samples=self.max_samples)


@dataclass
class MergeFisherConfig:
    """How the merge stages (imm, timm, forgetting) normalise the sources' Fishers before eq. 2."""

    # "per_tensor" (default): each model's Fisher tensor divided by its own sum, as the authors'
    # code did. Un-normalised ("none"), the two sources' Fishers differ per layer by factors of
    # 1 to 237 on the embedded data, so "uniform" IMM put a mean effective weight of 0.73 on M1.
    # "sum" | "l2": one global constant per model (see tmerge.fisher.normalize_fisher).
    normalize: str = "per_tensor"

    def __post_init__(self) -> None:
        check_fisher_options(normalize=self.normalize)


#: How an initialisation treats the task-specific parameters S (paper §3.2).
SPECIFIC_MODES = ("reinit", "keep")


@dataclass
class TransferConfig:
    """How every initialisation treats S, the instance norms and the segmentation heads.

    ``reinit`` (default, paper §3.2): S is freshly initialised for the target task by every
    transfer method, single-source or merged, so no method starts with a head start in S.
    ``keep``: the instance norms come from the source (for merged initialisations the mean of the
    sources' norms, which is the α-weighted mean at the uniform α every merge starts from);
    the heads are always re-created, the target has other classes.
    """

    specific: str = "reinit"

    def __post_init__(self) -> None:
        if self.specific not in SPECIFIC_MODES:
            raise ConfigError(
                f"transfer.specific: expected one of {', '.join(SPECIFIC_MODES)}, got {self.specific!r}"
            )


def check_net_data(net: NetConfig, data: DataConfig, loss: LossConfig) -> None:
    """The network↔data contract, checked where a run's config is composed (it sees both): the
    training patch (``data.patch_size``) and the sliding window (``loss.sw_roi``, 0: the patch)
    are cubes the network takes, multiples of ``net.divisor``; the data layer pads the volumes to
    the same divisor (the stages hand it to their DataModule).

    Raises:
        ConfigError: one line naming the key, its value and the divisor.
    """
    net.check_input_size("data.patch_size", data.patch_size)
    if loss.sw_roi:
        net.check_input_size("loss.sw_roi", loss.sw_roi, alternative="0 (the training patch) or ")


@dataclass
class RunConfig:
    """What every training stage's config holds; each stage adds its data and its own sections
    (the network↔data contract is checked here, once the stage's data is there)."""

    seed: int = 0  # training seed (initialisation, patch sampling); splits have data.seed
    force: bool = False  # run again even if the run folder holds a finished run
    runs_dir: str | None = None  # None: $TMERGE_RUNS or ./runs
    net: NetConfig = field(default_factory=NetConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)

    def __post_init__(self) -> None:
        data = getattr(self, "data", None)
        if data is not None:
            check_net_data(self.net, data, self.loss)


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
    # δ, chosen by measurement (docs/protocol.md §1). Capability test (useful source vs noise, 30-epoch
    # cap): 0.02 → useful side in 87 % of layers, mean α 0.70 (fails); 0.05 → 100 %, 0.84;
    # 0.1 → 100 %, 0.90; 0.2 → 100 %, 0.92. Embedded default at 4 % (seed 0), adaption val loss:
    # 0.05 → 0.540 (24 epochs), 0.1 → 0.541 (24), 0.2 → 0.580 (12: α jump to 0/1 and overshoot).
    delta_lr: float = 0.1
    # ε of eq. 2, relative to the mean Fisher entry (see tmerge.merge.imm.fisher_epsilon).
    eps: float = 1e-8

    def __post_init__(self) -> None:
        for key in ("lr", "delta_lr", "eps"):
            check_number(f"adaption.{key}", getattr(self, key))
        check_count("adaption.max_epochs", self.max_epochs, 1)
        # >= 1: the runner reads patience 0 as "the trainer's patience".
        check_count("adaption.patience", self.patience, 1)


@dataclass
class VectorMergeConfig:
    """The task-vector initialisations (``task-arithmetic``, ``ties``, ``dare``, ``dare-ties``,
    ``slerp``; :mod:`tmerge.merge.task_vectors`). Each hyper-parameter is a list: one value or a small grid;
    with several candidates the one with the lowest validation loss after adapting S on the
    target (P frozen, S trained as the T-IMM adaption stage does) is chosen, before fine-tuning,
    and recorded in the run folder (:data:`~tmerge.runs.SELECTION_FILE`)."""

    # θ₀ of the task vectors τ_t = θ_t − θ₀. None: the first source's saved θ₀ (the
    # random initialisation M1 started from; M2 descends from it too). A run name: that run's
    # trained weights (e.g. task1, which gives τ₂ = M2 − M1). Anything else: a safetensors file.
    base: str | None = None
    lam: list[float] = field(default_factory=lambda: [1.0])  # λ: scale of the merged task vector
    k: list[float] = field(default_factory=lambda: [20.0])  # TIES: % of entries kept (Yadav et al.)
    p: list[float] = field(default_factory=lambda: [0.5])  # DARE: drop probability (Yu et al.)
    t: list[float] = field(default_factory=lambda: [0.5])  # SLERP: 0 = first source, 1 = second
    seed: int = 0  # DARE's drop masks
    # TIES' (and dare-ties') trim scope: "tensor" ranks each tensor's magnitudes on its own
    # (mergekit), "model" all merged tensors together (Yadav et al.'s code, fusion-bench). One
    # value, not a grid: it chooses which algorithm "ties" is, not a strength to tune, and a grid
    # would let validation pick between two methods under one name. Like `seed`, every candidate
    # of the grid gets it (and selection.json records it).
    trim: str = "tensor"

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
        try:
            check_value("trim", self.trim, "merge.trim")
        except ValueError as exc:
            raise ConfigError(str(exc)) from None


#: The run protocols of a target run (docs/protocol.md).
PROTOCOLS = ("paper", "fixed")


@dataclass
class FixedProtocolConfig:
    """The fixed protocol (``protocol=fixed``): equal budgets, no selection on validation.

    Every initialisation first trains S and the input layer with P frozen for ``warmup_epochs``
    (T-IMM and mean-T-IMM: their adaption, δ included, for the same epochs; the others: the
    adaption without δ), then fine-tunes everything for ``epochs`` under the annealed (poly)
    learning rate, and is tested with its final weights. The validation split is never read.
    The test subjects are scored after epochs 1, 2, 4, … and the last of the fine-tune (the
    learning curve, :data:`~tmerge.runs.CURVE_FILE`), with the random state restored around
    each pass, so the training is the one without curve points.
    """

    epochs: int = 15  # fine-tune epochs: none plateaus around epoch 15 at 4 % (docs/protocol.md)
    warmup_epochs: int = 5  # S warm-up (T-IMM: adaption) epochs, the same for every init
    curve: bool = True  # learning-curve points on the test subjects

    def __post_init__(self) -> None:
        check_count("fixed.epochs", self.epochs, 1)
        check_count("fixed.warmup_epochs", self.warmup_epochs, 0)


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
    # The run folder's last part; None: the init's name. A variant of an init beside the init
    # itself, e.g. the negative control `init=timm sources=[task1,task2,noise] run_name=timm-noise`
    # (the report shows it as a column of its own).
    run_name: str | None = None
    # How the sources' input channels feed the target's: entry i is the source channel whose
    # filters the target's channel i reuses, e.g. [0, 0, 1, 1] for HCP (T1, T2) → BraTS (t1,
    # t1ce, t2, flair). None: a first layer of another shape is re-initialised and trained with
    # S (what the original code effectively did); with a map it stays in P and is merged.
    channel_map: list[int] | None = None
    data: TargetDataConfig = field(default_factory=TargetDataConfig)
    # "paper": early stopping and the best-validation checkpoint (the paper's); "fixed": a fixed
    # budget, an annealed lr, the final weights and equal S warm-up for every init (`fixed.*`).
    protocol: str = "paper"
    fixed: FixedProtocolConfig = field(default_factory=FixedProtocolConfig)
    adaption: AdaptionConfig = field(default_factory=AdaptionConfig)
    transfer: TransferConfig = field(default_factory=TransferConfig)
    fisher: MergeFisherConfig = field(default_factory=MergeFisherConfig)
    merge: VectorMergeConfig = field(default_factory=VectorMergeConfig)
    # How the test scores are computed: HD95 pooled (BraTS/medpy) or directed (MONAI), empty
    # regions by the brats2018 or the brats2023 rules (tmerge.evaluate.MetricsConfig).
    metrics: MetricsConfig = field(default_factory=MetricsConfig)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.run_name is not None and (not self.run_name or "/" in self.run_name or self.run_name.startswith(".")):
            raise ConfigError(f"run_name: expected null or a folder name, got {self.run_name!r}")
        if self.protocol not in PROTOCOLS:
            raise ConfigError(f"protocol: expected one of {', '.join(PROTOCOLS)}, got {self.protocol!r}")

    def stage_optim(self, lr: float | None = None) -> OptimConfig:
        """The optimiser settings of a stage at ``lr`` (None: ``optim.lr``): under the fixed
        protocol the learning rate is annealed over the budget (poly) — nothing validates, so no
        plateau can be watched."""
        optim = self.optim if lr is None else dataclasses.replace(self.optim, lr=lr)
        return dataclasses.replace(optim, schedule="poly") if self.protocol == "fixed" else optim

    @property
    def select(self) -> str:
        """How the fits choose their weights: ``"best"`` (paper) or ``"last"`` (fixed)."""
        return "last" if self.protocol == "fixed" else "best"
