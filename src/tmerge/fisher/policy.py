"""How the empirical Fisher is computed: the method ``"auto"`` picks, the vmap chunk, the autocast
dtype after training, and the one validation of the Fisher's options.

The rule behind ``"auto"`` comes from the per-volume timings in docs/benchmarks.md ("The
Fisher's methods"). For one sample of D·H·W voxels: on CPU ``vmap`` up to
:data:`VMAP_MAX_VOXELS`, else the loop (never the compiler); on CUDA ``compile`` when it pays
(:func:`compile_pays`), else ``vmap`` up to :data:`GPU_VMAP_MAX_VOXELS`, else the loop. The rule
is static on purpose: the methods agree only up to round-off, so a timing-dependent choice would
make the Fisher irreproducible in its last digits.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

METHODS = ("auto", "loop", "vmap", "compile")
NORMALIZE = ("none", "sum", "l2", "per_tensor")
VMAP_MAX_VOXELS = 48**3
"""Largest spatial size (D·H·W) for which ``method="auto"`` uses ``vmap`` on CPU."""
GPU_VMAP_MAX_VOXELS = 64**3
"""Largest spatial size for which ``method="auto"`` uses ``vmap`` on a GPU (when compiling does not pay)."""
DEFAULT_CHUNK = 4
"""Samples per ``vmap`` call on CPU when ``chunk_size`` is not given (the optimum measured at 32³, docs/benchmarks.md);
on a GPU the chunk is sized from free memory (:func:`vmap_chunk_size`)."""
COMPILE_SAVING_S_PER_VOXEL = (0.066 - 0.020) / 128**3
"""Time the compiled loop saves per voxel of a sample against the eager one (H200, bf16, 128³)."""
COMPILE_COST_S = 60.0
"""One-off cost of compiling the per-sample forward and backward on a GPU host: an estimate (see
docs/benchmarks.md); ``make bench`` on a GPU reports the measured value (``fisher.methods.compile.first_s``)."""


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


def vmap_chunk_size(per_sample_bytes: int, free_bytes: int, *, fraction: float = 0.5, cap: int = 4) -> int:
    """Samples per ``vmap`` call that fit into ``fraction`` of the free accelerator memory.

    Args:
        per_sample_bytes: Peak memory of one sample's forward and backward (activations and
            gradients), as measured on the first sample.
        free_bytes: Memory free for the computation.
        fraction: Share of ``free_bytes`` to use; the rest is slack for the allocator's
            fragmentation and for batched kernels' workspaces.
        cap: Largest chunk: 4, the largest measured on a GPU (the best at 64³, docs/benchmarks.md).

    Returns:
        An integer in ``[1, cap]``.
    """
    if per_sample_bytes <= 0:
        return cap
    return max(1, min(cap, int(fraction * free_bytes) // per_sample_bytes))


def autocast_for(precision: str | int | None) -> torch.dtype | None:
    """The Fisher's autocast dtype for a Lightning ``precision`` setting.

    ``"bf16-mixed"`` → ``torch.bfloat16`` (the numerics the model was trained in; the compiled
    bf16 loop is the fast GPU path, docs/benchmarks.md). Anything else → ``None`` (float32), also
    ``"16-mixed"``: float16 per-sample gradients would underflow without the loss scaling that
    training uses, and the Fisher's entries are tiny (median ≈ 1e-12 on the embedded data).
    """
    return torch.bfloat16 if str(precision) in ("bf16-mixed", "bf16") else None
