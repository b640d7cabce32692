"""``tmerge bench``: the project's fast paths against their references, side by side in one process.

Five sections, each timed after ``warmup`` untimed steps (compilation, cuDNN autotuning):

* ``step``: one training step (forward, loss, backward, Adam) of the default network at the
  patch size, plain PyTorch eager float32 against the project's default fast path (the
  precision and ``torch.compile`` that ``TrainerConfig``'s ``"auto"`` resolves to: bf16
  autocast + compile + cuDNN autotuning on CUDA; eager float32 on CPU, where the two coincide).
* ``lightning``: the Lightning training loop (the project's ``SegmentationModule`` where it can
  be imported) on batches already on the device, against the bare fast step: the loop's overhead.
* ``data``: the same loop fed by the real patch pipeline (``PatchDataset``: in-memory volumes,
  random crops, augmentation, the project's loader settings) against on-device batches; the
  pipeline keeps up when the ratio is ≥ 0.9.
* ``fisher``: seconds per volume of the empirical Fisher by the per-sample loop and by the
  batched path (``vmap``), plus the compiled loop on a GPU, and whether they agree.
* ``adaption``: the T-IMM adaption step (:class:`~tmerge.merge.AdaptiveMerge`: eq. 2 merge in
  every forward) against the plain training step.

Peak memory is measured for each: allocated CUDA memory on a GPU, the process's resident set
(sampled) on CPU. Results go to ``<out_dir>/results.json`` (rewritten after each section, so an
interrupted run keeps what it measured) and ``results.md``; the table is also printed.

Imports are kept to torch, lightning and the project's net, merge, fisher, fastpath and runner
modules, so that the bench runs on a machine with only those (the lent GPU image of design §6 has
no monai, nibabel, omegaconf or wandb). Where they are present, the project's own loss and
``SegmentationModule`` are used and the data section runs; otherwise an equal soft-Dice loss in
torch and a stand-in module with the same training step are used and the data section is
skipped. ``results.json`` records which. Without omegaconf, run ``python -m tmerge.bench``.

Example:
    tmerge bench                                   # CPU: 64³ in ≤ 2 minutes; GPU: 128³, batch 2
    tmerge bench patch_size=32 iters=2 skip=[data]
    PYTHONPATH=src python -m tmerge.bench          # without the CLI's dependencies
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import os
import platform
import sys
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tmerge.errors import ConfigError, TmergeError
from tmerge.fastpath import CompiledForward, enable_cudnn_benchmark
from tmerge.fisher import _auto_method, autocast_for, compute_fisher_sums
from tmerge.io import write_json, write_text
from tmerge.merge import AdaptiveMerge
from tmerge.nets import layer_groups, partition
from tmerge.nets.config import NetConfig
from tmerge.paths import runs_dir
from tmerge.runner import quiet_lightning, resolve_compile, resolve_precision

log = logging.getLogger("tmerge")

SECTIONS = ("step", "lightning", "data", "fisher", "adaption")
FISHER_METHODS = ("loop", "vmap", "compile")
#: Largest relative difference (to the largest entry) at which two Fisher methods count as equal:
#: float32 round-off is amplified by instance norm at small bottlenecks (see :mod:`tmerge.fisher`);
#: bfloat16 autocast rounds every activation to 8 bits of mantissa.
FISHER_TOLERANCE = {"float32": 1e-2, "bfloat16": 5e-2, "float16": 5e-2}
DATA_TARGET = 0.9  # issue 6: the loop with real data at ≥ 90 % of the speed on device tensors


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
        multiple = 2 ** (self.net.depth - 1)
        if self.patch_size is not None and (self.patch_size < multiple or self.patch_size % multiple):
            raise ConfigError(
                f"patch_size: got {self.patch_size}; expected a multiple of {multiple} "
                f"(the network downsamples {multiple}× at depth {self.net.depth})"
            )
        for name in ("batch_size", "in_channels", "n_classes"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: got {getattr(self, name)}; expected a positive integer")
        if self.warmup < 0:
            raise ConfigError(f"warmup: got {self.warmup}; expected >= 0")
        for name in ("iters", "fisher_samples", "num_workers"):
            value = getattr(self, name)
            if value is not None and value < (0 if name == "num_workers" else 1):
                raise ConfigError(f"{name}: got {value}; expected {'>= 0' if name == 'num_workers' else '>= 1'}")
        if self.n_sources < 2:
            raise ConfigError(f"n_sources: got {self.n_sources}; the adaption step merges at least 2 models")
        unknown = [m for m in self.fisher_methods or () if m not in FISHER_METHODS]
        if unknown:
            raise ConfigError(f"fisher_methods: unknown {unknown}; expected some of {list(FISHER_METHODS)}")
        unknown = [s for s in self.skip if s not in SECTIONS]
        if unknown:
            raise ConfigError(f"skip: unknown section(s) {unknown}; expected some of {list(SECTIONS)}")


# --------------------------------------------------------------------------------------------
# Settings resolved for the device
# --------------------------------------------------------------------------------------------

_PRECISIONS: dict[str, tuple[torch.dtype | None, torch.dtype]] = {
    # Lightning precision → (autocast dtype or None, parameter dtype)
    "32-true": (None, torch.float32),
    "32": (None, torch.float32),
    "bf16-mixed": (torch.bfloat16, torch.float32),
    "bf16": (torch.bfloat16, torch.float32),
    "16-mixed": (torch.float16, torch.float32),
    "16": (torch.float16, torch.float32),
    "bf16-true": (None, torch.bfloat16),
    "64-true": (None, torch.float64),
}


@dataclass
class Resolved:
    """The concrete settings of one bench run."""

    device: torch.device
    patch: int
    iters: int
    fisher_samples: int
    fisher_methods: list[str]
    num_workers: int
    precision: str  # Lightning precision string of the fast path
    autocast: torch.dtype | None  # the fast path's autocast dtype (None: none)
    param_dtype: torch.dtype
    compile: bool
    memory_format: torch.memory_format

    @property
    def fast_label(self) -> str:
        parts = ["compiled" if self.compile else "eager", self.precision]
        return " ".join(parts)

    @property
    def fast_is_reference(self) -> bool:
        return not self.compile and self.autocast is None and self.param_dtype == torch.float32


def resolve(cfg: BenchConfig) -> Resolved:
    """Fill the ``None`` fields of ``cfg`` for its device.

    Raises:
        ConfigError: CUDA asked for but not available, or an unknown precision.
    """
    name = "cuda" if cfg.device == "auto" and torch.cuda.is_available() else cfg.device
    device = torch.device("cpu" if name == "auto" else name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device: {cfg.device!r} asked for, but torch sees no CUDA device")
    gpu = device.type == "cuda"
    accelerator = "gpu" if gpu else "cpu"
    precision = resolve_precision(cfg.precision, accelerator)
    if precision not in _PRECISIONS:
        raise ConfigError(f"precision: expected 'auto' or one of {sorted(_PRECISIONS)}, got {precision!r}")
    autocast, param_dtype = _PRECISIONS[precision]
    methods = cfg.fisher_methods or (["loop", "vmap", "compile"] if gpu else ["loop", "vmap"])
    return Resolved(
        device=device,
        patch=cfg.patch_size or (128 if gpu else 64),
        iters=cfg.iters or (20 if gpu else 2),
        fisher_samples=cfg.fisher_samples or (8 if gpu else 2),
        fisher_methods=list(methods),
        num_workers=cfg.num_workers if cfg.num_workers is not None else (8 if gpu else 0),
        precision=precision,
        autocast=autocast,
        param_dtype=param_dtype,
        compile=resolve_compile(cfg.compile, accelerator),
        memory_format=torch.channels_last_3d if cfg.net.channels_last else torch.contiguous_format,
    )


# --------------------------------------------------------------------------------------------
# Loss, data, timing and memory
# --------------------------------------------------------------------------------------------


class SoftDiceLoss(nn.Module):
    """Soft Dice over the batch per region, for sigmoid outputs, in plain torch.

    Numerically the project's BraTS loss (``loss.name="dice"``: MONAI ``DiceLoss(sigmoid=True,
    batch=True, include_background=True)``, smoothing 1e-5), for machines without MONAI.

    Shapes: ``logits`` ``(B, C, D, H, W)``, ``target`` region masks of the same shape; returns a
    scalar, the mean over regions of ``1 - (2 Σ p·t + 1e-5) / (Σ p + Σ t + 1e-5)``.
    """

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        prob = torch.sigmoid(logits)
        target = target.to(prob.dtype)
        dims = (0, *range(2, logits.ndim))
        intersection = (prob * target).sum(dims)
        denominator = prob.sum(dims) + target.sum(dims)
        return (1 - (2 * intersection + 1e-5) / (denominator + 1e-5)).mean()


def bench_loss() -> tuple[Callable[[Tensor, Tensor], Tensor], str]:
    """The loss every section uses: the project's BraTS loss (soft Dice over the regions, the
    paper's), else the equal :class:`SoftDiceLoss`; and a description for the report."""
    try:
        from tmerge.modules.segmentation import build_loss
    except ImportError as exc:
        return SoftDiceLoss(), f"soft Dice in torch ({_missing(exc)} not installed)"
    return build_loss("dice", "sigmoid"), "the project's BraTS loss (MONAI DiceLoss, sigmoid)"


def _batch(cfg: BenchConfig, r: Resolved, n: int, seed: int) -> tuple[Tensor, Tensor]:
    """Images ``(n, C, P, P, P)`` and nested region masks ``(n, K, P, P, P)`` on CPU."""
    g = torch.Generator().manual_seed(seed)
    p = r.patch
    x = torch.randn(n, cfg.in_channels, p, p, p, generator=g)
    # Nested regions (ET ⊂ TC ⊂ WT) from one smooth random field: realistic Dice terms.
    field_ = F.avg_pool3d(torch.randn(n, 1, p, p, p, generator=g), 5, stride=1, padding=2)
    levels = torch.tensor([0.15, 0.05, 0.0][: cfg.n_classes] + [0.0] * max(0, cfg.n_classes - 3))
    y = (field_ > levels.view(1, -1, 1, 1, 1)).float()
    return x, y


def _to_device(x: Tensor, r: Resolved) -> Tensor:
    """``x`` on the bench's device in the network's memory format (channels-last by default)."""
    return x.to(r.device).contiguous(memory_format=r.memory_format)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError, AttributeError):
        return None


class PeakMemory:
    """Peak memory during a ``with`` block, in MiB (:attr:`mib`; ``None`` where unknown).

    CUDA: ``torch.cuda.max_memory_allocated`` (reset on entry). CPU: the process's resident set,
    sampled every 5 ms by a thread (Linux ``/proc``), so it includes the process's baseline.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.mib: float | None = None
        self._peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            _sync(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        elif _rss_bytes() is not None:
            self._peak = _rss_bytes() or 0
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self._peak = max(self._peak, _rss_bytes() or 0)

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            _sync(self.device)
            self.mib = torch.cuda.max_memory_allocated(self.device) / 2**20
        elif self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._peak = max(self._peak, _rss_bytes() or 0)
            self.mib = self._peak / 2**20


def time_steps(step: Callable[[], Any], warmup: int, iters: int, device: torch.device) -> dict[str, Any]:
    """Run ``step`` ``warmup`` times untimed, then ``iters`` times timed (one device sync each side).

    Returns:
        ``{"s": seconds per timed step, "first_s": seconds of the warm-up (compilation shows
        here), "peak_mib": peak memory of the timed steps}``.
    """
    start = time.perf_counter()
    for _ in range(warmup):
        step()
    _sync(device)
    warm = time.perf_counter()
    with PeakMemory(device) as memory:
        begin = time.perf_counter()
        for _ in range(iters):
            step()
        _sync(device)
        seconds = (time.perf_counter() - begin) / iters
    return {"s": seconds, "first_s": warm - start, "peak_mib": memory.mib}


def _autocast(device: torch.device, dtype: torch.dtype | None) -> Any:
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else torch.autocast(device.type, enabled=False)


def train_step(
    forward: Callable[[Tensor], Tensor],
    params: Sequence[nn.Parameter],
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    x: Tensor,
    y: Tensor,
    autocast: torch.dtype | None,
) -> Callable[[], None]:
    """A bare training step on fixed device tensors: forward and loss (under ``autocast``),
    backward, Adam as the project configures it. No host synchronisation."""
    optimizer = torch.optim.Adam(params, lr=5e-4, weight_decay=1e-5)

    def step() -> None:
        with _autocast(x.device, autocast):
            loss = loss_fn(forward(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


class _Reference:
    """Plain PyTorch numerics for a ``with`` block: TF32 off (true float32), cuDNN autotuning off."""

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


# --------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------


class Bench:
    """One bench run: builds networks and data for ``cfg`` and measures the sections."""

    def __init__(self, cfg: BenchConfig) -> None:
        self.cfg = cfg
        self.r = resolve(cfg)
        self.loss_fn, self.loss_name = bench_loss()
        x, y = _batch(cfg, self.r, cfg.batch_size, cfg.seed)
        self.x, self.y = _to_device(x, self.r), _to_device(y, self.r)
        self.results: dict[str, Any] = {}
        self._fast_step: dict[str, Any] | None = None
        self._device_loop: dict[str, Any] | None = None

    def net(self, dtype: torch.dtype = torch.float32) -> nn.Module:
        """A fresh default network (same seed, same weights every time) on the device."""
        torch.manual_seed(self.cfg.seed)
        net = self.cfg.net.build(self.cfg.in_channels, self.cfg.n_classes)
        return net.to(self.r.device, dtype).to(memory_format=self.r.memory_format)

    def _inputs(self, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        return (self.x.to(dtype), self.y) if dtype != torch.float32 else (self.x, self.y)

    # ---------------------------------------------------------------- step

    def fast_step(self) -> dict[str, Any]:
        """The bare training step in the project's fast path (measured once, reused)."""
        if self._fast_step is None:
            r = self.r
            if r.device.type == "cuda":
                enable_cudnn_benchmark()
            net = self.net(r.param_dtype)
            forward = CompiledForward(net) if r.compile else net
            x, y = self._inputs(r.param_dtype)
            timing = time_steps(
                train_step(forward, list(net.parameters()), self.loss_fn, x, y, r.autocast),
                self.cfg.warmup,
                r.iters,
                r.device,
            )
            if isinstance(forward, CompiledForward) and not forward.active:
                timing["compile_error"] = forward.error
            self._fast_step = timing
        return self._fast_step

    def section_step(self) -> dict[str, Any]:
        r = self.r
        with _Reference():
            net = self.net()
            reference = time_steps(
                train_step(net, list(net.parameters()), self.loss_fn, self.x, self.y, None),
                self.cfg.warmup,
                r.iters,
                r.device,
            )
            del net
        if r.fast_is_reference:
            # The fast path is the reference here (CPU): the same measurement, not taken twice.
            self._fast_step = dict(reference)
            fast = {**reference, "same_as_reference": True}
        else:
            fast = {**self.fast_step(), "same_as_reference": False}
        return {
            "reference": {"label": "eager float32", **reference},
            "fast": {"label": r.fast_label, **fast},
            "speedup": reference["s"] / fast["s"],
        }

    # ---------------------------------------------------------------- lightning

    def _module(self) -> tuple[L.LightningModule, str]:
        net = self.net(self.r.param_dtype)
        try:
            module = _project_module(net, self.r, self.cfg.n_classes)
            return module, "SegmentationModule"
        except ImportError as exc:
            return _StandInModule(net, self.loss_fn, self.r), f"stand-in ({_missing(exc)} not installed)"

    def _lightning(self, loader: Any, batches: int) -> dict[str, Any]:
        """Fit a fresh module on ``loader`` for warmup + iters steps; time the last ``iters``."""
        r = self.r
        module, name = self._module()
        timer = _StepTimer(self.cfg.warmup, r.iters, r.device)
        trainer = L.Trainer(
            accelerator="gpu" if r.device.type == "cuda" else "cpu",
            devices=[r.device.index or 0] if r.device.type == "cuda" else 1,
            precision=r.precision,
            max_epochs=1,
            max_steps=batches,
            limit_val_batches=0,
            num_sanity_val_steps=0,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            default_root_dir=str(self.out_dir / "lightning"),
            callbacks=[timer],
        )
        trainer.fit(module, train_dataloaders=loader)
        if timer.steps < r.iters:
            raise RuntimeError(f"bench: the Lightning loop ran {timer.steps} timed steps, expected {r.iters}")
        return {"s": timer.seconds / timer.steps, "peak_mib": timer.peak_mib, "module": name}

    def device_loop(self) -> dict[str, Any]:
        """The Lightning loop on batches already on the device (measured once, reused)."""
        if self._device_loop is None:
            batches = self.cfg.warmup + self.r.iters
            x, y = self._inputs(self.r.param_dtype)
            loader = torch.utils.data.DataLoader(_Repeat({"image": x, "label": y}, batches), batch_size=None)
            self._device_loop = self._lightning(loader, batches)
        return self._device_loop

    def section_lightning(self) -> dict[str, Any]:
        bare = self.fast_step()
        loop = self.device_loop()
        return {
            "module": loop["module"],
            "bare": {"label": f"bare step, {self.r.fast_label}", "s": bare["s"], "peak_mib": bare["peak_mib"]},
            "lightning": {"label": "Lightning loop, device tensors", "s": loop["s"], "peak_mib": loop["peak_mib"]},
            "overhead": loop["s"] / bare["s"],
            "steps_per_s": 1 / loop["s"],
            "bare_steps_per_s": 1 / bare["s"],
        }

    # ---------------------------------------------------------------- data

    def section_data(self) -> dict[str, Any]:
        try:
            loader, batches = self._patch_loader()
        except ImportError as exc:
            return {"skipped": f"the data pipeline needs {_missing(exc)}, which is not installed"}
        # The loader alone (what the GPU would wait for with num_workers=0).
        start = time.perf_counter()
        fetched = sum(1 for _ in loader)
        loader_s = (time.perf_counter() - start) / max(fetched, 1)
        real = self._lightning(loader, batches)
        device = self.device_loop()
        return {
            "device": {"label": "Lightning loop, device tensors", "s": device["s"], "peak_mib": device["peak_mib"]},
            "real": {"label": "Lightning loop, patch pipeline", "s": real["s"], "peak_mib": real["peak_mib"]},
            "ratio": device["s"] / real["s"],
            "target": DATA_TARGET,
            "keeps_up": device["s"] / real["s"] >= DATA_TARGET,
            "loader_s_per_batch": loader_s,
            "num_workers": self.r.num_workers,
        }

    def _patch_loader(self) -> tuple[torch.utils.data.DataLoader, int]:
        """The project's training pipeline on synthetic in-memory subjects (volumes 1.25× the patch)."""
        import numpy as np

        from tmerge.data.common import PatchDataset, Subject, loader_kwargs

        cfg, r = self.cfg, self.r
        edge = int(round(r.patch * 1.25))
        g = np.random.default_rng(cfg.seed)
        subjects = []
        n_subjects = 4
        grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, edge)] * 3, indexing="ij"))
        radius = np.sqrt((grid**2).sum(0))
        for i in range(n_subjects):
            image = g.standard_normal((cfg.in_channels, edge, edge, edge), dtype=np.float32)
            target = np.stack([radius < rad for rad in (0.6, 0.4, 0.2)[: cfg.n_classes]]).astype(np.uint8)
            subjects.append(Subject(id=f"bench{i}", image=image, target=target, meta={}))
        batches = cfg.warmup + r.iters
        per_volume = math.ceil(batches * cfg.batch_size / n_subjects)
        dataset = PatchDataset(subjects, (r.patch,) * 3, per_volume, torch.float32, augment=True)
        loader = torch.utils.data.DataLoader(
            dataset,
            batch_size=cfg.batch_size,
            shuffle=True,
            drop_last=True,
            **loader_kwargs(r.num_workers, cuda=r.device.type == "cuda"),
        )
        return loader, batches

    # ---------------------------------------------------------------- fisher

    def section_fisher(self) -> dict[str, Any]:
        cfg, r = self.cfg, self.r
        n = r.fisher_samples
        x, y = _batch(cfg, r, n, cfg.seed + 1)
        samples = [(x[i : i + 1], y[i : i + 1]) for i in range(n)]  # CPU, as a loader yields them
        autocast = autocast_for(r.precision)
        net = self.net()
        methods: dict[str, dict[str, Any]] = {}
        sums: dict[str, dict[str, Tensor]] = {}
        for method in r.fisher_methods:
            first_s = 0.0
            if cfg.warmup:
                start = time.perf_counter()
                compute_fisher_sums(
                    net, samples, self.loss_fn, method=method, max_samples=cfg.warmup, autocast_dtype=autocast
                )
                first_s = time.perf_counter() - start
            with PeakMemory(r.device) as memory:
                result = compute_fisher_sums(net, samples, self.loss_fn, method=method, autocast_dtype=autocast)
            methods[method] = {
                "label": {"loop": "per-sample loop", "vmap": "batched (vmap)", "compile": "compiled loop"}[method],
                "used": result.method,
                "precision": result.precision,
                "s": result.seconds / result.count,
                "volumes_per_s": result.volumes_per_s,
                "first_s": first_s,
                "peak_mib": memory.mib,
            }
            sums[method] = result.sums
        reference = next(iter(sums))
        scale = max(float(t.abs().max()) for t in sums[reference].values()) or 1.0
        precision = next(iter(methods.values()))["precision"]
        tolerance = FISHER_TOLERANCE.get(precision, 5e-2)
        diffs = {
            m: max(float((s[k] - sums[reference][k]).abs().max()) for k in s) / scale
            for m, s in sums.items()
            if m != reference
        }
        out: dict[str, Any] = {
            "methods": methods,
            "reference": reference,
            "max_rel_diff": diffs,
            "tolerance": tolerance,
            "equal": all(d <= tolerance for d in diffs.values()),
            "auto_picks": _auto_method(x[0], r.device, n),
            "auto_picks_paper": _auto_method(x[0], r.device, 18),  # a paper task's 18 volumes
        }
        if "loop" in methods and "vmap" in methods:
            out["speedup_batched"] = methods["loop"]["s"] / methods["vmap"]["s"]
        if "loop" in methods and "compile" in methods:
            out["speedup_compiled"] = methods["loop"]["s"] / methods["compile"]["s"]
        return out

    # ---------------------------------------------------------------- adaption

    def section_adaption(self) -> dict[str, Any]:
        cfg, r = self.cfg, self.r
        net = self.net(r.param_dtype)
        fused, _ = partition(net)
        layers = layer_groups(net, fused)
        g = torch.Generator().manual_seed(cfg.seed + 2)
        state = {k: v.detach().cpu() for k, v in net.state_dict().items()}
        # Sources: the network's weights with independent perturbations; Fishers: positive, of
        # the magnitudes seen on the embedded data (mean ≈ 1e-7).
        sources = [
            {k: v + 0.01 * torch.randn(v.shape, generator=g).to(v.dtype) for k, v in state.items()}
            for _ in range(cfg.n_sources)
        ]
        fishers = [
            {n: torch.rand(state[n].shape, generator=g) * 2e-7 for n in fused} for _ in range(cfg.n_sources)
        ]
        adaptive = AdaptiveMerge(net, sources, fishers, layers, eps=1e-10).to(r.device)
        forward = CompiledForward(adaptive) if r.compile else adaptive
        params = [p for p in adaptive.parameters() if p.requires_grad]
        x, y = self._inputs(r.param_dtype)
        timing = time_steps(
            train_step(forward, params, self.loss_fn, x, y, r.autocast), cfg.warmup, r.iters, r.device
        )
        plain = self.fast_step()
        return {
            "plain": {"label": f"training step, {r.fast_label}", "s": plain["s"], "peak_mib": plain["peak_mib"]},
            "adaption": {"label": f"adaption step, {r.fast_label}", **timing},
            "ratio": timing["s"] / plain["s"],
            "layers": len(layers),
            "sources": cfg.n_sources,
        }

    # ---------------------------------------------------------------- run

    def _prime(self) -> None:
        """One untimed step before anything is timed: the process's first step pays one-off
        costs (allocator growth, oneDNN/cuDNN handles, lazy imports) that would otherwise land
        in whichever section comes first (measured at 64³ on CPU: 21 s first step, 12 s after)."""
        net = self.net()
        train_step(net, list(net.parameters()), self.loss_fn, self.x, self.y, None)()
        _sync(self.r.device)


    @property
    def out_dir(self) -> Path:
        return Path(self.cfg.out_dir) if self.cfg.out_dir else runs_dir() / "bench"

    def environment(self) -> dict[str, Any]:
        r = self.r
        env: dict[str, Any] = {
            "device": torch.cuda.get_device_name(r.device) if r.device.type == "cuda" else platform.processor() or "cpu",
            "device_type": r.device.type,
            "cpu_threads": torch.get_num_threads(),
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "lightning": L.__version__,
            "python": platform.python_version(),
            "when": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        if r.device.type == "cuda":
            env["cuda"] = torch.version.cuda
        return env

    def settings(self) -> dict[str, Any]:
        cfg, r = self.cfg, self.r
        return {
            "patch_size": r.patch,
            "batch_size": cfg.batch_size,
            "in_channels": cfg.in_channels,
            "n_classes": cfg.n_classes,
            "net": dataclasses.asdict(cfg.net),
            "precision": r.precision,
            "compile": r.compile,
            "warmup": cfg.warmup,
            "iters": r.iters,
            "fisher_samples": r.fisher_samples,
            "fisher_methods": r.fisher_methods,
            "loss": self.loss_name,
        }

    def run(self) -> dict[str, Any]:
        """Measure every section not in ``cfg.skip``; write ``results.json`` after each."""
        start = time.perf_counter()
        out = self.out_dir
        self.results = {"environment": self.environment(), "settings": self.settings()}
        log.info(
            "bench on %s: %d³ patches, batch %d, base %d, fast path %s",
            self.results["environment"]["device"],
            self.r.patch,
            self.cfg.batch_size,
            self.cfg.net.base_filters,
            self.r.fast_label,
        )
        quiet_lightning()
        if self.cfg.warmup:
            self._prime()
        with warnings.catch_warnings():
            for message in (
                r".*does not have many workers",
                r"The number of training batches",
                r".*isinstance\(treespec, LeafSpec\)",
                r".*max_steps=.* reached",
                r"You defined a `validation_step` but have no `val_dataloader`",
            ):
                warnings.filterwarnings("ignore", message=message)
            for section in SECTIONS:
                if section in self.cfg.skip:
                    continue
                began = time.perf_counter()
                self.results[section] = getattr(self, f"section_{section}")()
                self.results[section]["section_s"] = time.perf_counter() - began
                log.info("bench: %s done (%.0f s)", section, self.results[section]["section_s"])
                self.results["total_s"] = time.perf_counter() - start
                write_json(out / "results.json", self.results)
        self.results["total_s"] = time.perf_counter() - start
        write_json(out / "results.json", self.results)
        table = format_table(self.results)
        write_text(out / "results.md", table)
        print(table)
        log.info("bench: %.0f s; results in %s", self.results["total_s"], out / "results.json")
        return self.results


def run_bench(cfg: BenchConfig) -> dict[str, Any]:
    """Entry point of ``tmerge bench``; returns the results also written to ``results.json``."""
    return Bench(cfg).run()


# --------------------------------------------------------------------------------------------
# Lightning pieces
# --------------------------------------------------------------------------------------------


class _Repeat(torch.utils.data.Dataset):
    """``n`` times the same (already batched, on-device) item: a loader that costs nothing."""

    def __init__(self, item: dict[str, Tensor], n: int) -> None:
        self.item, self.n = item, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        return self.item


class _StepTimer(L.Callback):
    """Times training steps ``warmup … warmup + iters - 1``, data loading included (from the end
    of the last warm-up step to the end of the last timed step, one device sync at each end)."""

    def __init__(self, warmup: int, iters: int, device: torch.device) -> None:
        self.warmup, self.iters, self.device = warmup, iters, device
        self.start: float | None = None
        self.seconds = 0.0
        self.steps = 0
        self.peak_mib: float | None = None
        self._memory: PeakMemory | None = None

    def _begin(self) -> None:
        _sync(self.device)
        self._memory = PeakMemory(self.device).__enter__()
        self.start = time.perf_counter()

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.warmup == 0:
            self._begin()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        done = trainer.global_step
        if done == self.warmup:
            self._begin()
        elif self.start is not None and done == self.warmup + self.iters:
            _sync(self.device)
            self.seconds = time.perf_counter() - self.start
            self.steps = self.iters
            assert self._memory is not None
            self._memory.__exit__(None, None, None)
            self.peak_mib = self._memory.mib


def _configure_fast_path(module: L.LightningModule) -> None:
    if module.trainer.strategy.root_device.type == "cuda":
        enable_cudnn_benchmark()


class _StandInModule(L.LightningModule):
    """The project's training step where ``SegmentationModule`` cannot be imported (no MONAI):
    forward (compiled if asked), loss, ``train/loss`` logged per epoch, Adam."""

    def __init__(self, net: nn.Module, loss_fn: Callable[[Tensor, Tensor], Tensor], r: Resolved) -> None:
        super().__init__()
        self.net, self.loss_fn, self.memory_format = net, loss_fn, r.memory_format
        self.compile_net = r.compile
        self._fast_net: CompiledForward | None = None

    def configure_model(self) -> None:
        _configure_fast_path(self)
        if self.compile_net and self._fast_net is None:
            self._fast_net = CompiledForward(self.net)

    def forward(self, x: Tensor) -> Tensor:
        net = self._fast_net if self._fast_net is not None else self.net
        return net(x.contiguous(memory_format=self.memory_format))

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        loss = self.loss_fn(self(batch["image"]), batch["label"])
        self.log("train/loss", loss, on_step=False, on_epoch=True, batch_size=batch["image"].shape[0])
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam([p for p in self.parameters() if p.requires_grad], lr=5e-4, weight_decay=1e-5)


def _project_module(net: nn.Module, r: Resolved, n_classes: int) -> L.LightningModule:
    """The project's ``SegmentationModule`` (BraTS regions, soft Dice) with a plain Adam: its
    plateau scheduler monitors ``val/loss``, which a training-only loop never logs.

    Raises:
        ImportError: Where the module's dependencies (MONAI, nibabel, …) are missing.
    """
    from tmerge.modules.segmentation import LossConfig, SegmentationModule

    class BenchSegmentationModule(SegmentationModule):
        def configure_optimizers(self) -> torch.optim.Optimizer:  # type: ignore[override]
            params = [p for p in self.parameters() if p.requires_grad]
            return torch.optim.Adam(params, lr=self.optim.lr, weight_decay=self.optim.weight_decay)

    return BenchSegmentationModule(
        net,
        output_mode="sigmoid",
        class_names=["ET", "TC", "WT"] if n_classes == 3 else [f"region{i}" for i in range(n_classes)],
        patch_size=r.patch,
        loss=LossConfig(name="dice"),
        channels_last=r.memory_format == torch.channels_last_3d,
        compile=r.compile,
    )


def _missing(exc: ImportError) -> str:
    return exc.name or str(exc)


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def _fmt_s(value: float | None) -> str:
    if value is None:
        return "—"
    return f"{value * 1000:.1f} ms" if value < 1 else f"{value:.2f} s"


def _fmt_mib(value: float | None) -> str:
    return "—" if value is None else f"{value:,.0f}"


def format_table(results: dict[str, Any]) -> str:
    """A Markdown table of ``results`` (as written to ``results.json``)."""
    env, s = results["environment"], results["settings"]
    memory = "peak CUDA MiB" if env["device_type"] == "cuda" else "peak RSS MiB"
    lines = [
        f"# tmerge bench — {env['device']} ({env['device_type']}), torch {env['torch']}, lightning {env['lightning']}",
        "",
        f"{s['patch_size']}³ patches, batch {s['batch_size']}, Isensee2017 base {s['net']['base_filters']} "
        f"depth {s['net']['depth']}, {s['in_channels']}→{s['n_classes']} channels; fast path: "
        f"{'compiled' if s['compile'] else 'eager'} {s['precision']}; {s['warmup']} warm-up + {s['iters']} "
        f"timed steps; loss: {s['loss']}; {env['when']}, {env['cpu_threads']} CPU threads.",
        "",
        f"| measurement | A | time A | B | time B | B vs A | {memory} A / B |",
        "|---|---|---|---|---|---|---|",
    ]

    def row(what: str, a: dict[str, Any], b: dict[str, Any], ratio: str) -> None:
        lines.append(
            f"| {what} | {a['label']} | {_fmt_s(a['s'])} | {b['label']} | {_fmt_s(b['s'])} | {ratio} | "
            f"{_fmt_mib(a.get('peak_mib'))} / {_fmt_mib(b.get('peak_mib'))} |"
        )

    def faster(ratio: float) -> str:
        return f"{ratio:.2f}× faster" if ratio >= 1 else f"{1 / ratio:.2f}× slower"

    notes: list[str] = []
    if "step" in results:
        st = results["step"]
        same = " (same path on this device)" if st["fast"].get("same_as_reference") else ""
        row("training step", st["reference"], st["fast"], f"{faster(st['speedup'])}{same}")
        if st["fast"].get("compile_error"):
            notes.append(f"torch.compile failed, eager fallback: {st['fast']['compile_error']}")
        if s["compile"]:
            notes.append(f"first fast step incl. compilation: {_fmt_s(st['fast']['first_s'])}")
    if "lightning" in results:
        lt = results["lightning"]
        row("Lightning loop", lt["bare"], lt["lightning"], f"overhead {lt['overhead']:.2f}×")
        notes.append(f"Lightning module: {lt['module']}; {lt['steps_per_s']:.2f} steps/s")
    if "data" in results:
        dt = results["data"]
        if "skipped" in dt:
            notes.append(f"data: skipped — {dt['skipped']}")
        else:
            verdict = "keeps up" if dt["keeps_up"] else "too slow"
            row(
                "data pipeline",
                dt["device"],
                dt["real"],
                f"{dt['ratio']:.2f} of the speed (target ≥ {dt['target']}: {verdict})",
            )
            notes.append(
                f"loader alone: {_fmt_s(dt['loader_s_per_batch'])} per batch with {dt['num_workers']} worker(s)"
            )
    if "fisher" in results:
        fi = results["fisher"]
        methods = fi["methods"]
        ref = methods[fi["reference"]]
        for name, m in methods.items():
            if name == fi["reference"]:
                continue
            diff = fi["max_rel_diff"][name]
            equal = "equal" if diff <= fi["tolerance"] else "DIFFER"
            row(
                f"Fisher per volume ({m['precision']})",
                ref,
                m,
                f"{faster(ref['s'] / m['s'])}; {equal} (max rel. diff {diff:.1e})",
            )
        for name, m in methods.items():
            if m["used"] != name:
                notes.append(f"Fisher {name}: fell back to {m['used']}")
        if "compile" in methods:
            notes.append(f"Fisher compiled loop: first volume incl. compilation {_fmt_s(methods['compile']['first_s'])}")
        notes.append(
            "Fisher volumes/s: "
            + ", ".join(f"{n} {m['volumes_per_s']:.2f}" for n, m in methods.items())
            + f"; method='auto' picks {fi['auto_picks']} here, {fi['auto_picks_paper']} for 18 volumes"
        )
    if "adaption" in results:
        ad = results["adaption"]
        row("adaption step", ad["plain"], ad["adaption"], f"{ad['ratio']:.2f}× the time")
        notes.append(f"adaption: {ad['sources']} sources, {ad['layers']} merged layers")
    lines.append("")
    lines += [f"- {n}" for n in notes]
    lines.append(f"- total: {results.get('total_s', 0):.0f} s")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------
# Without the CLI (no omegaconf)
# --------------------------------------------------------------------------------------------


def _parse_value(text: str) -> Any:
    text = text.strip()
    lowered = text.lower()
    if lowered in ("null", "none", "~"):
        return None
    if lowered in ("true", "false"):
        return lowered == "true"
    if text.startswith("[") and text.endswith("]"):
        inner = text[1:-1].strip()
        return [_parse_value(part) for part in inner.split(",")] if inner else []
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text.strip("'\"")


def apply_overrides(cfg: BenchConfig, overrides: Sequence[str]) -> BenchConfig:
    """``key=value`` overrides (``iters=2``, ``net.base_filters=8``, ``skip=[data,fisher]``) on a
    copy of ``cfg``, without OmegaConf (for machines that lack it).

    Raises:
        ConfigError: A malformed pair, an unknown key or an invalid value, naming it.
    """
    cfg = copy.deepcopy(cfg)
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep:
            raise ConfigError(f"{item!r}: overrides are key=value pairs (e.g. iters=2)")
        *path, leaf = key.split(".")
        target: Any = cfg
        for part in path:
            target = getattr(target, part, None) if dataclasses.is_dataclass(target) else None
        if not dataclasses.is_dataclass(target) or leaf not in {f.name for f in dataclasses.fields(target)}:
            raise ConfigError(f"config key {key} (command line): not a key of BenchConfig")
        setattr(target, leaf, _parse_value(text))
    cfg.__post_init__()
    return cfg


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m tmerge.bench [key=value …]``: the bench with or without the CLI's dependencies."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("[tmerge] %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False
    try:
        try:
            from tmerge.config import compose
        except ImportError:  # no omegaconf (the lent GPU image): plain overrides
            cfg = apply_overrides(BenchConfig(), args)
        else:
            cfg = compose(BenchConfig, None, args)
        run_bench(cfg)
    except TmergeError as exc:
        print(f"tmerge bench: error: {exc}", file=sys.stderr)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
