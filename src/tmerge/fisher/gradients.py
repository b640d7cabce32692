"""Per-sample losses and squared gradients: the pieces every method of :mod:`tmerge.fisher.compute`
is made of, pure functions of a model, its parameters and samples.

**Autocast.** Every method runs under ``torch.autocast`` when asked (``autocast_dtype``) or when
the caller is inside one; :class:`~tmerge.callbacks.FisherCallback` uses the trainer's precision
(bf16 after ``"bf16-mixed"`` training). Parameters then enter the network in the autocast dtype
(see :func:`sample_loss`: this is what made ``vmap`` work under bf16, where it failed with a dtype
mismatch in instance norm's batched backward), the loss is computed in float32, and the squared
gradients are accumulated in float32. bf16 Fishers differ from float32 ones by ~1e-2 relative to
their largest entry; the Fisher's entries span many decades, which this does not change.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from tmerge.stateless import stateless_call

LossFn = Callable[[Tensor, Tensor], Tensor]
"""``loss_fn(output (1, K, …), target (1, …)) -> scalar``: the loss of one sample."""


# --------------------------------------------------------------------------------------------
# Samples
# --------------------------------------------------------------------------------------------


def split_batch(batch: Any) -> tuple[Tensor, Any]:
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
        x, y = split_batch(batch)
        if len(x) != len(y):
            raise ValueError(f"batch has {len(x)} images but {len(y)} labels")
        for i in range(len(x)):
            if max_samples is not None and n >= max_samples:
                return
            yield x[i], y[i]
            n += 1


def to_device(value: Any, device: torch.device) -> Any:
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


def resolve_autocast(dtype: torch.dtype | None, device: torch.device) -> torch.dtype | None:
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


def add_squares(sums: Sequence[Tensor], grads: Sequence[Tensor | None]) -> None:
    """``sums[i] += grads[i]²`` in float32 as one multi-tensor operation (``None``: unused, no change).

    One fused call instead of two kernels per parameter: the network has ~100 parameter tensors,
    and on a GPU the compiled per-sample step is short enough for launch overhead to show.
    """
    pairs = [(s, g.float()) for s, g in zip(sums, grads, strict=True) if g is not None]
    if pairs:
        targets, values = [s for s, _ in pairs], [g for _, g in pairs]
        torch._foreach_addcmul_(targets, values, values)


def squared_grads_vmap(
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


def free_cuda_bytes(device: torch.device) -> int:
    free, _ = torch.cuda.mem_get_info(device)
    # What the caching allocator holds without using is free for us as well.
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
