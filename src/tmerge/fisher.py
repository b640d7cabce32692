"""Diagonal empirical Fisher information, F = (1/N) Σ_n (∇_θ ℓ_n)².

ℓ_n is the loss of ONE sample with its true label. The square is taken per sample: squaring the
gradient of a batch-mean loss (what several public EWC/IMM codes do) gives
(1/B²)(Σ_n ∇ℓ_n)², which drops every cross-sample cancellation and is not the Fisher.

Three interchangeable ways to get per-sample gradients, equal up to round-off:

* ``"loop"``: one forward/backward per sample (``torch.autograd.grad`` on the selected
  parameters only).
* ``"vmap"``: ``torch.func.vmap(grad(loss ∘ functional_call))`` over a chunk of samples, which
  runs the chunk as one batched forward/backward (the batched path).
* ``"compile"``: the loop with the per-sample forward and loss through ``torch.compile``
  (AOT autograd compiles the backward too).

Isensee2017 (4 input channels, 3 classes, depth 5), cross-entropy, seconds per volume (best of 2
runs over 8 volumes at 32³, 4 at 64³, 8 on GPU). CPU rows: torch 2.11, fp32, 2 threads pinned to
2 cores (``taskset -c 0,1``) of an otherwise idle 16-core host, because this project's shared
2-core box was too loaded to time (there the 32³ loop took 0.57-4.7 s per volume depending on the
neighbours). GPU rows: H200, torch defaults (TF32 convolutions); the 128³ rows: docs/benchmarks.md.

=============================  ==================  ===========================  ===========
setting                        loop                vmap, chunk 1 / 2 / 4 / 8    auto
=============================  ==================  ===========================  ===========
CPU 32³, base_filters=8        0.487               — / 0.134 / 0.130 / 0.124    vmap (3.7×)
CPU 64³, base_filters=8        1.33                — / 0.99 / 1.16 / —          loop (1)
CPU 64³, base_filters=16       1.37                — / 2.07 / 1.95 / —          loop
GPU 64³, base_filters=16       0.027               — / 0.030 / 0.016 / —        vmap (2)
GPU 128³, base_filters=16      0.057 (bf16 0.066)  0.070 / 0.057 / — / —        loop (3)
GPU 128³, compiled, bf16       0.020 + compiling   —                            compile (3)
=============================  ==================  ===========================  ===========

(1) vmap's 1.3× at chunk 2 here is forgone: it vanishes at base_filters=16 and costs memory.
(2) On a GPU the chunk is sized from the free memory (:func:`vmap_chunk_size`, at most 4, the
largest measured), so the memory that kept the batched path off the GPU is no longer a risk.
(3) The compiled loop is 3× the eager one per volume, but compiling the network's forward and
backward has a one-off cost, estimated at a minute on a GPU host (:data:`COMPILE_COST_S`; not
measured there yet — on this project's loaded 2-core CPU it took 3 minutes for a small net). It
pays only past ``COMPILE_COST_S / COMPILE_SAVING_S_PER_VOXEL`` voxel-samples
— about 1,300 volumes of 128³ — so ``"auto"`` compiles for a GPU Fisher over that many samples
(known from the loader's dataset length) and not for a paper task's 18 volumes. ``make bench``
reports the first compiled volume's time, to recalibrate :data:`COMPILE_COST_S`.

So ``"auto"`` is, for one sample of D·H·W voxels: on CPU ``vmap`` up to :data:`VMAP_MAX_VOXELS`,
else the loop (never the compiler); on CUDA ``compile`` when it pays (:func:`compile_pays`), else
``vmap`` up to :data:`GPU_VMAP_MAX_VOXELS`, else the loop. The rule is static on purpose: the
methods agree only up to round-off, so a timing-dependent choice would make the Fisher
irreproducible in its last digits. Round-off is not negligible for this network at small sizes:
at 32³ and depth 5 the bottleneck instance norm sees 2³ voxels and amplifies it, and either
method differs from a float64 computation by up to ~1e-2 relative (the two differ from each other
by ~6e-3); on a well-conditioned net they agree to 1e-6. If ``vmap`` or the compiler fails (an
operation without a batching rule, a loss with data-dependent control flow, out of memory, no C
compiler), the computation falls back to the eager loop with a warning.

**Autocast.** Every method runs under ``torch.autocast`` when asked (``autocast_dtype``) or when
the caller is inside one; :class:`~tmerge.callbacks.FisherCallback` uses the trainer's precision
(bf16 after ``"bf16-mixed"`` training). Parameters then enter the network in the autocast dtype (see
:func:`sample_loss`: this is what made ``vmap`` work under bf16, where it failed with a dtype
mismatch in instance norm's batched backward), the loss is computed in float32, and the squared
gradients are accumulated in float32. bf16 Fishers differ from float32 ones by ~1e-2 relative to
their largest entry; the Fisher's entries span many decades, which this does not change.

Every computation logs one line with its sample count, time and volumes/s.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from tmerge.stateless import stateless_call

LossFn = Callable[[Tensor, Tensor], Tensor]
"""``loss_fn(output (1, K, …), target (1, …)) -> scalar``: the loss of one sample."""

log = logging.getLogger("tmerge")

METHODS = ("auto", "loop", "vmap", "compile")
NORMALIZE = ("none", "sum", "l2", "per_tensor")
VMAP_MAX_VOXELS = 48**3
"""Largest spatial size (D·H·W) for which ``method="auto"`` uses ``vmap`` on CPU."""
GPU_VMAP_MAX_VOXELS = 64**3
"""Largest spatial size for which ``method="auto"`` uses ``vmap`` on a GPU (when compiling does not pay)."""
DEFAULT_CHUNK = 4
"""Samples per ``vmap`` call on CPU when ``chunk_size`` is not given (the optimum measured above);
on a GPU the chunk is sized from free memory (:func:`vmap_chunk_size`)."""
COMPILE_SAVING_S_PER_VOXEL = (0.066 - 0.020) / 128**3
"""Time the compiled loop saves per voxel of a sample against the eager one (H200, bf16, 128³)."""
COMPILE_COST_S = 60.0
"""One-off cost of compiling the per-sample forward and backward on a GPU host: an estimate (see
the module docstring); ``make bench`` on a GPU reports the measured value (``fisher.methods.compile.first_s``)."""


# --------------------------------------------------------------------------------------------
# Samples
# --------------------------------------------------------------------------------------------


def _split_batch(batch: Any) -> tuple[Tensor, Any]:
    """Return ``(images (B, C, …), labels (B, …))`` of a dict or ``(x, y)`` batch."""
    if isinstance(batch, Mapping):
        if "image" not in batch or "label" not in batch:
            raise ValueError(f"a dict batch needs keys 'image' and 'label', got keys {sorted(batch)}")
        return batch["image"], batch["label"]
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return batch[0], batch[1]
    raise ValueError(
        f"a batch must be a dict with 'image' and 'label' or an (x, y) tuple, got {type(batch).__name__}"
    )


def iter_samples(batches: Iterable[Any], max_samples: int | None = None) -> Iterator[tuple[Tensor, Any]]:
    """Split batches into single samples.

    Args:
        batches: Any iterable of batches (a ``DataLoader``, a list): dicts with ``"image"``
            ``(B, C, D, H, W)`` and ``"label"`` ``(B, …)``, or ``(x, y)`` tuples/lists.
        max_samples: Stop after this many samples (``None``: all).

    Yields:
        ``(x, y)`` with the batch dimension removed: ``x`` ``(C, D, H, W)``, ``y`` ``(…)``.
    """
    n = 0
    for batch in batches:
        x, y = _split_batch(batch)
        if len(x) != len(y):
            raise ValueError(f"batch has {len(x)} images but {len(y)} labels")
        for i in range(len(x)):
            if max_samples is not None and n >= max_samples:
                return
            yield x[i], y[i]
            n += 1


def _to(value: Any, device: torch.device) -> Any:
    return value.to(device, non_blocking=True) if isinstance(value, Tensor) else value


# --------------------------------------------------------------------------------------------
# Per-sample losses and squared gradients (pure functions of model, params and samples)
# --------------------------------------------------------------------------------------------


def _loss_scalar(loss: Tensor) -> Tensor:
    if loss.ndim != 0:
        raise ValueError(
            f"loss_fn must return a scalar (the loss of one sample), got shape {tuple(loss.shape)}"
        )
    return loss


def _autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """``torch.autocast`` in ``dtype``; for ``None`` an ambient autocast of ``device`` is switched off."""
    if dtype is not None:
        return torch.autocast(device.type, dtype=dtype)
    if torch.is_autocast_enabled(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def _resolve_autocast(dtype: torch.dtype | None, device: torch.device) -> torch.dtype | None:
    """The autocast dtype to compute in: ``dtype``, else the caller's active autocast on
    ``device``; ``None`` (float32) for float32 or no autocast."""
    if dtype is None and torch.is_autocast_enabled(device.type):
        dtype = torch.get_autocast_dtype(device.type)
    return None if dtype in (None, torch.float32) else dtype


def sample_loss(
    model: nn.Module,
    x: Tensor,
    y: Any,
    loss_fn: LossFn,
    *,
    state: Mapping[str, Tensor] | None = None,
    autocast_dtype: torch.dtype | None = None,
) -> Tensor:
    """The loss of one sample, ``loss_fn(model(x), y)``, optionally under autocast.

    Under autocast every floating-point parameter and buffer enters the network in
    ``autocast_dtype``. Autocast casts the convolution weights so anyway; casting the norms'
    affine parameters too gives every operation inputs of one dtype, which the batched backward
    of instance norm under ``vmap`` requires (with mixed dtypes it fails with "expected scalar
    type BFloat16 but found Float"), and keeps the loop, ``vmap`` and compiled paths on the same
    numbers. The casts are differentiable, so gradients reach the float32 parameters in float32.
    The output is cast to float32 before ``loss_fn``: the loss is never summed in bfloat16.

    Args:
        model: The network.
        x: One input with a batch dimension of 1, ``(1, C, D, H, W)``.
        y: Its target with a batch dimension of 1, ``(1, …)``.
        loss_fn: One sample's loss.
        state: Tensors to use instead of the model's parameters and buffers (through
            ``functional_call``), by name; ``None``: the model's own.
        autocast_dtype: ``None`` for float32, else the autocast dtype (e.g. ``torch.bfloat16``).

    Returns:
        The scalar loss.
    """
    with _autocast(x.device, autocast_dtype):
        if autocast_dtype is not None:
            if state is None:
                state = {**dict(model.named_parameters()), **dict(model.named_buffers())}
            state = {n: t.to(autocast_dtype) if t.is_floating_point() else t for n, t in state.items()}
        out = model(x) if state is None else stateless_call(model, state, (x,))
    if autocast_dtype is not None and isinstance(out, Tensor):
        out = out.float()
    return _loss_scalar(loss_fn(out, y))


def _add_squares(sums: Sequence[Tensor], grads: Sequence[Tensor | None]) -> None:
    """``sums[i] += grads[i]²`` in float32 as one multi-tensor operation (``None``: unused, no change).

    One fused call instead of two kernels per parameter: the network has ~100 parameter tensors,
    and on a GPU the compiled per-sample step is short enough for launch overhead to show.
    """
    pairs = [(s, g.float()) for s, g in zip(sums, grads, strict=True) if g is not None]
    if pairs:
        targets, values = [s for s, _ in pairs], [g for _, g in pairs]
        torch._foreach_addcmul_(targets, values, values)


def _sq_grads_vmap(
    model: nn.Module,
    params: Mapping[str, Tensor],
    frozen: Mapping[str, Tensor],
    xs: Tensor,
    ys: Tensor,
    loss_fn: LossFn,
    autocast_dtype: torch.dtype | None = None,
) -> dict[str, Tensor]:
    """Sum over a chunk of the squared per-sample gradients, computed with ``vmap(grad(·))``.

    Args:
        model: The network (stateless use through ``functional_call``).
        params: Detached tensors to differentiate, by name.
        frozen: Detached values of the other parameters and buffers, by name.
        xs: Inputs ``(k, C, D, H, W)``.
        ys: Targets ``(k, …)``.
        loss_fn: One sample's loss.
        autocast_dtype: ``None`` (float32) or the autocast dtype, see :func:`sample_loss`.

    Returns:
        ``{name: Σ_{n<k} (∂ℓ_n/∂θ)²}`` in float32, shapes of ``params``.
    """
    from torch.func import grad, vmap

    def one(p: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        # Inside vmap x is one sample (C, D, H, W); the model and loss see a batch of one.
        return sample_loss(
            model,
            x.unsqueeze(0),
            y.unsqueeze(0),
            loss_fn,
            state={**frozen, **p},
            autocast_dtype=autocast_dtype,
        )

    grads = vmap(grad(one), in_dims=(None, 0, 0))(dict(params), xs, ys)
    return {name: g.float().square().sum(0) for name, g in grads.items()}


def vmap_chunk_size(per_sample_bytes: int, free_bytes: int, *, fraction: float = 0.5, cap: int = 4) -> int:
    """Samples per ``vmap`` call that fit into ``fraction`` of the free accelerator memory.

    Args:
        per_sample_bytes: Peak memory of one sample's forward and backward (activations and
            gradients), as measured on the first sample.
        free_bytes: Memory free for the computation.
        fraction: Share of ``free_bytes`` to use; the rest is slack for the allocator's
            fragmentation and for batched kernels' workspaces.
        cap: Largest chunk: 4, the largest measured on a GPU (the best at 64³, see above).

    Returns:
        An integer in ``[1, cap]``.
    """
    if per_sample_bytes <= 0:
        return cap
    return max(1, min(cap, int(fraction * free_bytes) // per_sample_bytes))


def _free_cuda_bytes(device: torch.device) -> int:
    free, _ = torch.cuda.mem_get_info(device)
    # What the caching allocator holds without using is free for us as well.
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


# --------------------------------------------------------------------------------------------
# Sums and mean
# --------------------------------------------------------------------------------------------


@dataclass
class FisherSums:
    """Un-normalised Fisher sums as returned by :func:`compute_fisher_sums`.

    Attributes:
        sums: ``{name: Σ_n (∂ℓ_n/∂θ)²}``, float32 on CPU, shapes of the parameters.
        count: Number of samples ``N`` summed.
        method: The method actually used (``"loop"``, ``"vmap"`` or ``"compile"``; ``"loop"``
            after a fallback).
        seconds: Wall time of the computation (data loading included).
        precision: ``"float32"`` or the autocast dtype it ran under (``"bfloat16"``).
    """

    sums: dict[str, Tensor]
    count: int
    method: str
    seconds: float = 0.0
    precision: str = "float32"

    @property
    def volumes_per_s(self) -> float:
        """Samples per second (0 if nothing was timed)."""
        return self.count / self.seconds if self.seconds > 0 else 0.0


def check_options(
    *,
    normalize: str | None = None,
    method: str | None = None,
    chunk_size: int | None = None,
    max_samples: int | None = None,
    prefix: str = "",
) -> None:
    """The one validation of the Fisher's options, for the functions here, the callback and the
    configs: an unknown ``normalize`` or ``method`` (``None``: not given, not checked), or a
    ``chunk_size``/``max_samples`` that is not a positive integer (``None`` is fine for both).

    Args:
        prefix: Put before the option's name in the message: the config section that holds it
            (``"fisher."``), so that the message names the user's key.

    Raises:
        ValueError: ``"<prefix><option>: expected …, got …"``.
    """
    if normalize is not None and normalize not in NORMALIZE:
        raise ValueError(f"{prefix}normalize: expected one of {', '.join(NORMALIZE)}, got {normalize!r}")
    if method is not None and method not in METHODS:
        raise ValueError(f"{prefix}method: expected one of {', '.join(METHODS)}, got {method!r}")
    for name, value in (("chunk_size", chunk_size), ("max_samples", max_samples)):
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ValueError(f"{prefix}{name}: expected a positive integer or None (all), got {value!r}")


def _select_names(model: nn.Module, names: Sequence[str] | None) -> dict[str, nn.Parameter]:
    named = dict(model.named_parameters())
    if names is None:
        return {n: p for n, p in named.items() if p.requires_grad}
    if isinstance(names, str):
        names = [names]
    unknown = [n for n in names if n not in named]
    if unknown:
        raise ValueError(
            f"names not among the parameters of {type(model).__name__}: "
            f"{', '.join(unknown[:5])}{' …' if len(unknown) > 5 else ''}"
        )
    return {n: named[n] for n in names}


def _sample_count(dataloader: Iterable[Any], max_samples: int | None) -> int | None:
    """Number of samples the computation will see, where it is known without loading data."""
    dataset = getattr(dataloader, "dataset", None)
    total: int | None = None
    if dataset is not None and hasattr(dataset, "__len__"):
        total = len(dataset)
    elif isinstance(dataloader, (list, tuple)):
        total = sum(len(_split_batch(batch)[0]) for batch in dataloader)
    if max_samples is not None:
        total = max_samples if total is None else min(total, max_samples)
    return total


def compile_pays(samples: int | None, voxels: int) -> bool:
    """Whether compiling the per-sample step saves more time than compiling costs.

    ``samples · voxels · COMPILE_SAVING_S_PER_VOXEL ≥ COMPILE_COST_S``; an unknown sample count
    never pays (an unsized iterable might hold two samples).
    """
    return samples is not None and samples * voxels * COMPILE_SAVING_S_PER_VOXEL >= COMPILE_COST_S


def auto_method(x: Tensor, device: torch.device, samples: int | None = None) -> str:
    """The method ``method="auto"`` uses for samples like ``x`` on ``device`` (see the module
    docstring for the measurements behind the rule).

    Args:
        x: One sample ``(C, D, H, W)``; its voxel count ``D·H·W`` decides.
        device: Where the Fisher is computed.
        samples: How many samples the computation will see (``None``: unknown, never compiles).

    Returns:
        ``"loop"``, ``"vmap"`` or ``"compile"``.
    """
    voxels = math.prod(x.shape[1:]) if x.ndim > 1 else 1
    if device.type != "cuda":
        return "vmap" if voxels <= VMAP_MAX_VOXELS else "loop"
    if compile_pays(samples, voxels):
        return "compile"
    return "vmap" if voxels <= GPU_VMAP_MAX_VOXELS else "loop"


class _Accumulator:
    """The state of one Fisher computation: sums, count, method in use, and its step functions.

    Samples arrive one at a time (:meth:`add`); ``vmap`` collects them into chunks of equal
    shapes. A failing ``vmap`` or ``torch.compile`` turns the rest of the computation into the
    eager loop with a warning, which gives the same numbers.
    """

    def __init__(
        self,
        model: nn.Module,
        selected: Mapping[str, nn.Parameter],
        loss_fn: LossFn,
        device: torch.device,
        autocast_dtype: torch.dtype | None,
        method: str,
        chunk_size: int | None,
        samples: int | None,
    ) -> None:
        self.model, self.selected, self.loss_fn = model, dict(selected), loss_fn
        self.device, self.autocast_dtype, self.samples = device, autocast_dtype, samples
        self.method = method
        # CPU: the measured optimum; CUDA: sized from free memory on the first sample.
        self.chunk = chunk_size or (None if device.type == "cuda" else DEFAULT_CHUNK)
        self.params = list(self.selected.values())
        self.sums = {
            n: torch.zeros(p.shape, dtype=torch.float32, device=device) for n, p in self.selected.items()
        }
        self.sum_list = list(self.sums.values())
        self.count = 0
        self.pending: list[tuple[Tensor, Any]] = []
        self.compiled: Callable[[Tensor, Any], Tensor] | None = None

    def _eager(self, x: Tensor, y: Any) -> Tensor:
        return sample_loss(self.model, x, y, self.loss_fn, autocast_dtype=self.autocast_dtype)

    def _warn_fallback(self, what: str, exc: Exception) -> None:
        warnings.warn(
            f"empirical Fisher: {what} failed ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
            "falling back to the per-sample loop",
            RuntimeWarning,
            stacklevel=4,
        )
        self.method = "loop"

    def add(self, x: Tensor, y: Any) -> None:
        """Account for one sample ``x`` ``(C, D, H, W)``, ``y`` ``(…)`` (already on the device)."""
        if self.method == "auto":
            self.method = auto_method(x, self.device, self.samples)
        if self.method == "compile" and self.compiled is None:
            self.compiled = torch.compile(self._eager, dynamic=False)
        if self.method == "vmap" and self.chunk is None:
            self.chunk = self._probe_chunk(x, y)
            return
        if self.method != "vmap":
            self._one(x, y)
            return
        # Samples of a chunk must stack: flush when the shape changes.
        if self.pending and (x.shape != self.pending[0][0].shape or _shape(y) != _shape(self.pending[0][1])):
            self.flush()
        self.pending.append((x, y))
        if len(self.pending) >= (self.chunk or 1):
            self.flush()

    def _one(self, x: Tensor, y: Any) -> None:
        """One sample through the loop (compiled or eager)."""
        xb, yb = x.unsqueeze(0), y.unsqueeze(0)
        grads = None
        if self.method == "compile" and self.compiled is not None:
            try:
                grads = torch.autograd.grad(self.compiled(xb, yb), self.params, allow_unused=True)
            except Exception as exc:  # noqa: BLE001 - any compiler failure falls back to eager
                self._warn_fallback("torch.compile", exc)
                self.compiled = None
        if grads is None:
            # autograd.grad (not backward) so that no .grad is touched and no DDP reducer hook fires.
            grads = torch.autograd.grad(self._eager(xb, yb), self.params, allow_unused=True)
        _add_squares(self.sum_list, grads)
        self.count += 1

    def _probe_chunk(self, x: Tensor, y: Any) -> int:
        """Run one sample through the loop while measuring its peak memory; size chunks from it."""
        torch.cuda.reset_peak_memory_stats(self.device)
        before = torch.cuda.memory_allocated(self.device)
        self._one(x, y)
        per_sample = torch.cuda.max_memory_allocated(self.device) - before
        chunk = vmap_chunk_size(per_sample, _free_cuda_bytes(self.device))
        log.debug("Fisher: %.0f MiB per sample, vmap chunks of %d", per_sample / 2**20, chunk)
        return chunk

    def flush(self) -> None:
        """Compute the pending ``vmap`` chunk (or, after a fallback, its samples one by one)."""
        if not self.pending:
            return
        pending, self.pending = self.pending, []
        if self.method == "vmap":
            try:
                xs = torch.stack([x for x, _ in pending])
                ys = torch.stack([torch.as_tensor(y) for _, y in pending])
                frozen = _frozen_state(self.model, self.selected)
                detached = {n: p.detach() for n, p in self.selected.items()}
                squares = _sq_grads_vmap(
                    self.model, detached, frozen, xs, ys, self.loss_fn, self.autocast_dtype
                )
                torch._foreach_add_(self.sum_list, [squares[n] for n in self.sums])
                self.count += len(pending)
                return
            except Exception as exc:  # noqa: BLE001 - any vmap failure falls back to the loop
                self._warn_fallback("vmap", exc)
        for x, y in pending:
            self._one(x, y)


def compute_fisher_sums(
    model: nn.Module,
    dataloader: Iterable[Any],
    loss_fn: LossFn,
    *,
    names: Sequence[str] | None = None,
    max_samples: int | None = None,
    method: str = "auto",
    chunk_size: int | None = None,
    device: torch.device | str | None = None,
    progress: bool = False,
    autocast_dtype: torch.dtype | None = None,
) -> FisherSums:
    """Sums of squared per-sample gradients and the sample count — for reduction across ranks:
    summing them over disjoint shards of the data and dividing gives exactly the Fisher of the
    union — with the method used and the time (see :class:`FisherSums`). Same arguments as
    :func:`empirical_fisher` (without ``normalize``).

    Logs one line (logger ``tmerge``, INFO) with the sample count, the time and volumes/s.
    """
    check_options(method=method, chunk_size=chunk_size, max_samples=max_samples)
    selected = _select_names(model, names)
    if not selected:
        raise ValueError(f"no parameters to compute a Fisher for in {type(model).__name__}")
    first = next(iter(model.parameters()))
    home = first.device
    device = torch.device(device) if device is not None else home
    amp = _resolve_autocast(autocast_dtype, device)

    training = {m: m.training for m in model.modules()}
    requires = {n: p.requires_grad for n, p in selected.items()}
    bar = _progress_bar(progress, dataloader, max_samples)
    start = time.perf_counter()
    try:
        if device != home:
            model.to(device)
        # Eval mode: dropout off, norms use their inference behaviour; the Fisher is a property
        # of the trained, deterministic model.
        model.eval()
        for p in selected.values():
            p.requires_grad_(True)
        acc = _Accumulator(
            model, selected, loss_fn, device, amp, method, chunk_size, _sample_count(dataloader, max_samples)
        )
        # Callbacks may run under no_grad/inference mode; per-sample gradients need autograd.
        with torch.inference_mode(False), torch.enable_grad():
            for x, y in iter_samples(dataloader, max_samples):
                acc.add(_to(x, device), _to(y, device))
                if bar is not None:
                    bar.update(1)
            acc.flush()
        sums = {n: s.cpu() for n, s in acc.sums.items()}  # waits for the device: the time is real
    finally:
        for n, p in selected.items():
            p.requires_grad_(requires[n])
        for m, mode in training.items():
            m.training = mode
        if device != home:
            model.to(home)
        if bar is not None:
            bar.close()
    seconds = time.perf_counter() - start
    used = "loop" if acc.method == "auto" else acc.method  # "auto" remains only without samples
    precision = "float32" if amp is None else str(amp).removeprefix("torch.")
    result = FisherSums(sums, acc.count, used, seconds, precision)
    log.info(
        "Fisher: %d volume(s) in %.1f s (%.2f volumes/s; %s, %s)",
        result.count,
        seconds,
        result.volumes_per_s,
        used,
        precision,
    )
    return result


def _shape(value: Any) -> tuple[int, ...] | None:
    return tuple(value.shape) if isinstance(value, Tensor) else None


def _frozen_state(model: nn.Module, selected: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Detached parameters that are not differentiated, plus all buffers, for ``functional_call``."""
    frozen = {n: p.detach() for n, p in model.named_parameters() if n not in selected}
    frozen.update(dict(model.named_buffers()))
    return frozen


def _progress_bar(progress: bool, dataloader: Iterable[Any], max_samples: int | None) -> Any:
    if not progress:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # progress is a nicety, never a requirement
        return None
    dataset = getattr(dataloader, "dataset", None)
    total = len(dataset) if dataset is not None and hasattr(dataset, "__len__") else None
    if max_samples is not None:
        total = max_samples if total is None else min(total, max_samples)
    return tqdm(total=total, desc="Fisher", unit="sample")


def normalize_fisher(fisher: Mapping[str, Tensor], mode: str) -> dict[str, Tensor]:
    """Scale a Fisher by one global constant, or each tensor by its own sum.

    Args:
        fisher: ``{name: F}`` tensors of any shapes.
        mode: ``"none"`` (unchanged), ``"sum"`` (divide by the total of all entries over all
            names), ``"l2"`` (divide by the global L2 norm) or ``"per_tensor"`` (divide each
            tensor by its own sum, as the authors' T-IMM code did: every parameter tensor of
            every model then carries the same total weight in eq. 2, and only the distribution
            *within* a tensor decides the merge).

    Returns:
        A new dict with the scaled tensors. With ``"per_tensor"`` a tensor whose entries are all 0
        stays 0 (it has no distribution to keep; eq. 2's ε then decides).

    Raises:
        ValueError: On an unknown ``mode``, or a zero total for ``"sum"``/``"l2"``.
    """
    check_options(normalize=mode)
    if mode == "none":
        return dict(fisher)
    # Accumulate the statistics in float64 so large tensors do not lose precision.
    if mode == "per_tensor":
        out = {}
        for n, f in fisher.items():
            total = f.double().sum()
            out[n] = (f.double() / total).to(f.dtype) if total > 0 else f.clone()
        return out
    if mode == "sum":
        total = sum((f.double().sum() for f in fisher.values()), torch.zeros((), dtype=torch.float64))
    else:
        total = sum(
            (f.double().square().sum() for f in fisher.values()), torch.zeros((), dtype=torch.float64)
        ).sqrt()
    if not total > 0:
        raise ValueError(f"cannot normalise the Fisher by its {mode}: the total is {float(total)}")
    return {n: (f.double() / total).to(f.dtype) for n, f in fisher.items()}


def empirical_fisher(
    model: nn.Module,
    dataloader: Iterable[Any],
    loss_fn: LossFn,
    *,
    names: Sequence[str] | None = None,
    max_samples: int | None = None,
    method: str = "auto",
    chunk_size: int | None = None,
    normalize: str = "none",
    device: torch.device | str | None = None,
    progress: bool = False,
    autocast_dtype: torch.dtype | None = None,
) -> dict[str, Tensor]:
    """Diagonal empirical Fisher: the mean over samples of squared per-sample gradients.

    For every selected parameter θ: ``F = (1/N) Σ_n (∂ℓ_n/∂θ)²`` with
    ``ℓ_n = loss_fn(model(x_n[None]), y_n[None])``. The model is put in eval mode for the
    computation (dropout off) and every module's mode is restored afterwards; no ``.grad`` is
    modified. Accumulation is in float32, also under autocast.

    Args:
        model: Any module mapping ``(1, C, …)`` inputs to outputs ``loss_fn`` accepts.
        dataloader: Iterable of batches: dicts with ``"image"`` ``(B, C, D, H, W)`` and
            ``"label"`` ``(B, …)``, or ``(x, y)`` tuples; any batch size (split into samples).
        loss_fn: ``loss_fn(output (1, K, …), target (1, …)) -> scalar``, one sample's loss.
        names: Parameter names to compute (default: all parameters requiring grad). Frozen
            parameters may be named; they are differentiated without being unfrozen for good.
        max_samples: Use at most this many samples (``None``: all).
        method: ``"auto"``, ``"loop"``, ``"vmap"`` or ``"compile"`` (the loop through
            ``torch.compile``); see the module docstring. Equal results up to round-off.
        chunk_size: Samples per ``vmap`` call (default: :data:`DEFAULT_CHUNK` on CPU; on CUDA
            sized from the free memory, :func:`vmap_chunk_size`).
        normalize: ``"none"``, ``"sum"``, ``"l2"`` or ``"per_tensor"`` (see :func:`normalize_fisher`).
        device: Device to compute on (default: the model's). The model is moved there and back.
        progress: Show a tqdm progress bar.
        autocast_dtype: Compute the forward and backward under ``torch.autocast`` in this dtype
            (e.g. ``torch.bfloat16``; see :func:`sample_loss`). ``None``: the caller's active
            autocast on ``device``, if any, else float32; ``torch.float32``: float32 always.

    Returns:
        ``{name: F}`` float32 CPU tensors with the parameters' shapes, in ``names`` order.

    Raises:
        ValueError: On an unknown ``method``/``normalize``, unknown names, a non-scalar loss, or
            a dataloader that yields no samples.

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Conv3d(1, 2, 3, padding=1))
        >>> data = [(torch.randn(4, 1, 4, 4, 4), torch.randint(0, 2, (4, 4, 4, 4)))]
        >>> fisher = empirical_fisher(net, data, torch.nn.functional.cross_entropy)
        >>> fisher["0.weight"].shape
        torch.Size([2, 1, 3, 3, 3])
    """
    check_options(normalize=normalize)
    result = compute_fisher_sums(
        model,
        dataloader,
        loss_fn,
        names=names,
        max_samples=max_samples,
        method=method,
        chunk_size=chunk_size,
        device=device,
        progress=progress,
        autocast_dtype=autocast_dtype,
    )
    if result.count == 0:
        raise ValueError("empirical Fisher: the dataloader yielded no samples")
    return normalize_fisher({n: s / result.count for n, s in result.sums.items()}, normalize)


# --------------------------------------------------------------------------------------------
# What a Fisher must be
# --------------------------------------------------------------------------------------------


def fisher_problem(
    fisher: Mapping[str, Tensor], shapes: Mapping[str, Sequence[int]], subject: str
) -> str | None:
    """What is wrong with a diagonal Fisher, or ``None``: the one check of a Fisher, wherever it
    comes from (a file, a computation, an argument).

    Checked in this order: every name of ``shapes`` is present; then each tensor (the names of
    ``shapes`` first, in their order, then the others) has the parameter's shape, where
    ``shapes`` gives it, and entries that are finite and ≥ 0.

    Args:
        fisher: ``{name: F}``.
        shapes: name → the shape of the parameter the Fisher belongs to.
        subject: What the Fisher is, to start the message with: a file, ``fishers[1]``.

    Returns:
        One line naming ``subject`` and the first parameter at fault, or ``None`` when the Fisher
        is sound. Callers raise it: pure code as a ``ValueError``, the stages as the user's error.
    """
    missing = [n for n in shapes if n not in fisher]
    if missing:
        return f"{subject} lacks {len(missing)} expected parameter(s), e.g. {missing[0]!r}"
    for name in [*shapes, *(n for n in fisher if n not in shapes)]:
        value, where = fisher[name], f"{subject}[{name!r}]"
        if name in shapes and tuple(value.shape) != tuple(shapes[name]):
            return (
                f"{where} has shape {tuple(value.shape)}, expected the parameter's shape "
                f"{tuple(shapes[name])}: the Fisher of another model"
            )
        finite = torch.isfinite(value)
        if not finite.all():
            return (
                f"{where} has NaN or infinite entries; expected finite values ≥ 0, "
                f"got {int((~finite).sum())} of {value.numel()} non-finite"
            )
        if (value < 0).any():
            return f"{where} has negative entries; a diagonal Fisher is ≥ 0, got min {float(value.min()):g}"
    return None


# --------------------------------------------------------------------------------------------
# Lightning precision (the callback itself is tmerge.callbacks.FisherCallback)
# --------------------------------------------------------------------------------------------


def autocast_for(precision: str | int | None) -> torch.dtype | None:
    """The Fisher's autocast dtype for a Lightning ``precision`` setting.

    ``"bf16-mixed"`` → ``torch.bfloat16`` (the numerics the model was trained in; the compiled
    bf16 loop is the fast GPU path, docs/benchmarks.md). Anything else → ``None`` (float32), also
    ``"16-mixed"``: float16 per-sample gradients would underflow without the loss scaling that
    training uses, and the Fisher's entries are tiny (median ≈ 1e-12 on the embedded data).
    """
    return torch.bfloat16 if str(precision) in ("bf16-mixed", "bf16") else None
