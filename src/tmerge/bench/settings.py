"""What ``tmerge bench`` measures: its config (:class:`BenchConfig`, composed by the CLI like every
stage's) and the concrete settings it resolves to on the device (:class:`Resolved`)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from lightning.fabric import Fabric
from lightning.fabric.plugins import Precision

from tmerge.errors import ConfigError
from tmerge.nets.config import NetConfig
from tmerge.runner import check_compile, check_precision, resolve_compile, resolve_precision

SECTIONS = ("step", "lightning", "data", "fisher", "adaption")
FISHER_METHODS = ("loop", "vmap", "compile")


@dataclass
class BenchConfig:
    """What ``tmerge bench`` measures and at which size (``None``: chosen for the device)."""

    device: str = "auto"  # "auto" (CUDA when available), "cpu" or "cuda"
    # Patch edge: None = 128 on a GPU (design §6's figures), 64 on CPU (≤ 2 minutes on 2 cores).
    patch_size: int | None = None
    batch_size: int = 2  # design §6 measures batch 2
    in_channels: int = 4  # BraTS: T1, T1ce, T2, FLAIR
    n_classes: int = 3  # BraTS regions ET, TC, WT (sigmoid outputs)
    net: NetConfig = field(default_factory=NetConfig)  # the default network: the paper's, base 16
    # The fast path, resolved as TrainerConfig's fields are: bf16 autocast + compile on CUDA.
    precision: str = "auto"
    compile: str = "auto"
    warmup: int = 1  # untimed steps before each measurement
    # Timed steps per measurement; None: 2 on CPU (keeps `make bench` within 2 minutes on two
    # cores), 20 on GPU.
    iters: int | None = None
    # Volumes per Fisher method; None: 2 on CPU, 8 on GPU (design §6 times 8).
    fisher_samples: int | None = None
    # None: loop and vmap, and on a GPU the compiled loop too (compiling takes minutes on a CPU).
    fisher_methods: list[str] | None = None
    n_sources: int = 2  # models merged by the adaption step (the paper merges M1 and M2)
    num_workers: int | None = None  # loader workers of the data section; None: 0 on CPU, 8 on GPU
    skip: list[str] = field(default_factory=list)  # sections left out (step, lightning, data, …)
    out_dir: str | None = None  # None: <runs>/bench
    seed: int = 0

    def __post_init__(self) -> None:
        if self.device not in ("auto", "cpu", "cuda") and not str(self.device).startswith("cuda:"):
            raise ConfigError(f"device: expected 'auto', 'cpu' or 'cuda', got {self.device!r}")
        check_precision(self.precision, "precision")  # as trainer.precision is, when composed
        check_compile(self.compile, "compile")
        multiple = self.net.divisor
        if self.patch_size is not None and (self.patch_size < multiple or self.patch_size % multiple):
            raise ConfigError(
                f"patch_size: got {self.patch_size}; expected a multiple of {multiple} "
                f"(the network, {self.net.label()}, downsamples {multiple}×)"
            )
        for name in ("batch_size", "in_channels", "n_classes"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: got {getattr(self, name)}; expected a positive integer")
        if self.n_sources < 2:
            raise ConfigError(f"n_sources: got {self.n_sources}; the adaption step merges at least 2 models")
        if self.warmup < 0:
            raise ConfigError(f"warmup: got {self.warmup}; expected >= 0")
        for name, least in (("iters", 1), ("fisher_samples", 1), ("num_workers", 0)):
            value = getattr(self, name)
            if value is not None and value < least:
                raise ConfigError(f"{name}: got {value}; expected >= {least} or null")
        unknown = [m for m in self.fisher_methods or () if m not in FISHER_METHODS]
        if unknown:
            raise ConfigError(f"fisher_methods: unknown {unknown}; expected some of {list(FISHER_METHODS)}")
        unknown = [s for s in self.skip if s not in SECTIONS]
        if unknown:
            raise ConfigError(f"skip: unknown section(s) {unknown}; expected some of {list(SECTIONS)}")


@dataclass
class Resolved:
    """The concrete settings of one bench run (every ``None`` of :class:`BenchConfig` filled)."""

    device: torch.device
    patch: int
    iters: int
    fisher_samples: int
    fisher_methods: list[str]
    num_workers: int
    #: Lightning's precision plugin of the fast path (Fabric's, which the bare steps can drive
    #: without a Trainer): its autocast context, parameter and input dtypes, loss scaling.
    plugin: Precision
    compile: bool
    memory_format: torch.memory_format

    @property
    def precision(self) -> str:
        """Lightning's normalised precision name (``"32"`` → ``"32-true"``), as the Trainer gets it."""
        return str(self.plugin.precision)

    @property
    def accelerator(self) -> str:
        return "gpu" if self.device.type == "cuda" else "cpu"

    @property
    def fast_label(self) -> str:
        return f"{'compiled' if self.compile else 'eager'} {self.precision}"

    @property
    def fast_is_reference(self) -> bool:
        """Whether the fast path is plain eager float32 (CPU defaults): then one measurement
        serves both, instead of timing the same thing twice."""
        return not self.compile and self.precision == "32-true"


def resolve(cfg: BenchConfig) -> Resolved:
    """Fill the ``None`` fields of ``cfg`` for its device.

    Precision and compilation are resolved by the trainer's own rules
    (:func:`~tmerge.runner.resolve_precision`, :func:`~tmerge.runner.resolve_compile`), and the
    precision is turned into Lightning's plugin by Lightning itself, so the bench's fast path is
    the numerics a stage's Trainer would run.

    Raises:
        ConfigError: CUDA asked for but not available, or a precision or compile value that
            Lightning or the trainer does not know, naming the key.
    """
    name = "cuda" if cfg.device == "auto" and torch.cuda.is_available() else cfg.device
    device = torch.device("cpu" if name == "auto" else name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device: {cfg.device!r} asked for, but torch sees no CUDA device")
    gpu = device.type == "cuda"
    accelerator = "gpu" if gpu else "cpu"
    precision = resolve_precision(cfg.precision, accelerator)
    try:
        fabric = Fabric(
            accelerator=accelerator, devices=[device.index or 0] if gpu else 1, precision=precision
        )
    except ValueError as exc:  # Lightning lists the precisions it accepts
        raise ConfigError(f"precision: {str(exc).splitlines()[0]}") from None
    try:
        compile_ = resolve_compile(cfg.compile, accelerator)
    except ConfigError as exc:  # it names trainer.compile; here the key is `compile`
        raise ConfigError(str(exc).replace("trainer.compile", "compile", 1)) from None
    methods = cfg.fisher_methods or (list(FISHER_METHODS) if gpu else ["loop", "vmap"])
    return Resolved(
        device=device,
        patch=cfg.patch_size or (128 if gpu else 64),
        iters=cfg.iters or (20 if gpu else 2),
        fisher_samples=cfg.fisher_samples or (8 if gpu else 2),
        fisher_methods=list(methods),
        num_workers=cfg.num_workers if cfg.num_workers is not None else (8 if gpu else 0),
        plugin=fabric.strategy.precision,
        compile=compile_,
        memory_format=torch.channels_last_3d if cfg.net.channels_last else torch.contiguous_format,
    )
