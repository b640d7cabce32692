"""Accelerator fast paths shared by the training module and the benchmark.

* :class:`CompiledForward`: ``torch.compile`` of a network with a guarded fallback to eager.
* :func:`enable_cudnn_benchmark`: cuDNN autotuning where it is allowed.

Earlier H100 figures (docs/benchmarks.md; 128³, batch 2, Isensee2017): eager bf16 0.090 s per
training step, ``torch.compile`` + bf16 0.040 s. Compiling takes minutes on a CPU and gains little
there, so the project's default (``TrainerConfig.compile="auto"``) compiles on CUDA only.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

import torch
from torch import nn

log = logging.getLogger("tmerge")


class CompiledForward:
    """Call ``torch.compile(module)``; if compiling fails, warn once and call ``module`` eagerly.

    ``torch.compile`` is lazy: the graph is captured and compiled at the first call (and again for
    a new input shape or mode), so that is where failures show — an unsupported operation, a
    missing C compiler, a Triton error. Out-of-memory errors are not compile failures and are
    raised as they are.

    This is deliberately not an ``nn.Module``: an owner that keeps it in an attribute does not
    register the compiled wrapper as a sub-module, so the owner's ``state_dict`` keys stay those
    of ``module`` (no ``_orig_mod.`` prefix) and checkpoints load with or without compiling. The
    wrapper shares ``module``'s parameters; ``module`` itself stays eager for other users (the
    Fisher's per-sample loop and ``vmap`` call it directly).

    Args:
        module: The network; called as ``module(*args, **kwargs)``.
        **compile_kwargs: Passed to ``torch.compile`` (e.g. ``mode="max-autotune"``).

    Example:
        >>> net = torch.nn.Linear(2, 2)
        >>> fast = CompiledForward(net)
        >>> fast(torch.randn(3, 2)).shape  # doctest: +SKIP
        torch.Size([3, 2])
    """

    def __init__(self, module: nn.Module, **compile_kwargs: Any) -> None:
        self.module = module
        self.compiled: Any = torch.compile(module, **compile_kwargs)
        self.error: str | None = None
        """Why compiling failed (``None`` while the compiled path is in use)."""

    @property
    def active(self) -> bool:
        """Whether calls still go through the compiled module."""
        return self.compiled is not None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.compiled is not None:
            try:
                return self.compiled(*args, **kwargs)
            except torch.cuda.OutOfMemoryError:
                raise
            except Exception as exc:  # noqa: BLE001 - any compiler failure falls back to eager
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
                self.error = f"{type(exc).__name__}: {first}"
                warnings.warn(
                    f"torch.compile of {type(self.module).__name__} failed ({self.error}); "
                    "running it eagerly (same numbers, slower)",
                    RuntimeWarning,
                    stacklevel=2,
                )
                self.compiled = None
        return self.module(*args, **kwargs)


def enable_cudnn_benchmark() -> bool:
    """Let cuDNN time its convolution algorithms per input shape and keep the fastest.

    Training patches all have one shape, so the search is paid once. Left alone when
    deterministic algorithms are requested (``Trainer(deterministic=True)`` turns them on), since
    autotuning may pick a non-deterministic algorithm.

    Returns:
        Whether it was switched on.
    """
    if torch.are_deterministic_algorithms_enabled():
        return False
    if not torch.backends.cudnn.benchmark:
        log.debug("cudnn.benchmark on")
    torch.backends.cudnn.benchmark = True
    return True
