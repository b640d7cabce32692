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

The methods are equal up to round-off, and round-off is not negligible for this network at small
sizes: at 32³ and depth 5 the bottleneck instance norm sees 2³ voxels and amplifies it, and
either method differs from a float64 computation by up to ~1e-2 relative (the two differ from
each other by ~6e-3); on a well-conditioned net they agree to 1e-6. Which one ``"auto"`` takes:
:mod:`tmerge.fisher.policy` (their timings: docs/benchmarks.md). If ``vmap`` or the compiler
fails (an operation without a batching rule, a loss with data-dependent control flow, out of
memory, no C compiler), the computation falls back to the eager loop with a warning.

Every computation logs one line with its sample count, time and volumes/s.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from tmerge.fisher.diagonal import normalize_fisher
from tmerge.fisher.gradients import (
    LossFn,
    add_squares,
    free_cuda_bytes,
    iter_samples,
    resolve_autocast,
    sample_loss,
    split_batch,
    squared_grads_vmap,
    to_device,
)
from tmerge.fisher.policy import DEFAULT_CHUNK, auto_method, check_options, vmap_chunk_size

log = logging.getLogger("tmerge")


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
        total = sum(len(split_batch(batch)[0]) for batch in dataloader)
    if max_samples is not None:
        total = max_samples if total is None else min(total, max_samples)
    return total


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
        add_squares(self.sum_list, grads)
        self.count += 1

    def _probe_chunk(self, x: Tensor, y: Any) -> int:
        """Run one sample through the loop while measuring its peak memory; size chunks from it."""
        torch.cuda.reset_peak_memory_stats(self.device)
        before = torch.cuda.memory_allocated(self.device)
        self._one(x, y)
        per_sample = torch.cuda.max_memory_allocated(self.device) - before
        chunk = vmap_chunk_size(per_sample, free_cuda_bytes(self.device))
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
                squares = squared_grads_vmap(
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
    amp = resolve_autocast(autocast_dtype, device)

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
                acc.add(to_device(x, device), to_device(y, device))
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
    from tqdm.auto import tqdm  # a dependency of Lightning's; imported only when asked for
    dataset = getattr(dataloader, "dataset", None)
    total = len(dataset) if dataset is not None and hasattr(dataset, "__len__") else None
    if max_samples is not None:
        total = max_samples if total is None else min(total, max_samples)
    return tqdm(total=total, desc="Fisher", unit="sample")


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
            ``torch.compile``); see :mod:`tmerge.fisher.policy`. Equal results up to round-off.
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
