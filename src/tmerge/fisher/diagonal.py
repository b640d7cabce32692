"""What a diagonal Fisher is: the one check of its shapes and values, and its normalisations.

Pure maths on ``{name: F}`` tensors, wherever they come from (a file, a computation, an argument).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from tmerge.fisher.policy import check_options


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
