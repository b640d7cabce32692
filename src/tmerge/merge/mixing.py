"""Learned per-layer mixing ratios α (paper §3.3): α_i^t = σ(δ_i^t) / Σ_j σ(δ_i^j), δ free.

The reparametrisation turns the constrained problem (α ≥ 0, Σ_t α^t = 1 per layer) into an
unconstrained one in δ. δ = 0 gives the uniform α = 1/T, i.e. plain IMM, which is where the
adaption stage starts.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn


def mixing_ratios(delta: Tensor) -> Tensor:
    """Map free parameters δ to mixing ratios α, normalising over models.

    Args:
        delta: unconstrained parameters, shape ``(T, N)`` (T models, N layers).

    Returns:
        α, shape ``(T, N)``: every entry in (0, 1), every column summing to 1.
    """
    # σ(δ) ∈ (0, 1) keeps the denominator ≥ T·σ(min δ) > 0, unlike a plain ratio of δ's.
    s = torch.sigmoid(delta)
    return s / s.sum(dim=0, keepdim=True)


class LayerwiseMixing(nn.Module):
    """Holds δ (T × N) and returns the mixing ratios α (T × N) of eq. 2, one column per layer.

    Args:
        n_models: T ≥ 2, the number of merged source models.
        layers: the layer names (column order of α), or their number N ≥ 1 (names become
            ``"0"``, ``"1"``, …).

    Raises:
        TypeError: ``n_models`` is not an integer, or ``layers`` is a bare string.
        ValueError: ``n_models`` < 2, no layers, or a layer name given twice.

    Attributes:
        delta: ``nn.Parameter`` of shape ``(T, N)``, initialised to 0 (uniform α = IMM).
        layer_names: list of the N layer names, in column order.
        n_models: T.
    """

    def __init__(self, n_models: int, layers: Sequence[str] | int) -> None:
        super().__init__()
        wanted = f"LayerwiseMixing: n_models must be an integer ≥ 2 (models to merge), got {n_models!r}"
        if isinstance(n_models, bool) or not isinstance(n_models, int):
            raise TypeError(wanted)
        if n_models < 2:
            raise ValueError(wanted)
        if isinstance(layers, int) and not isinstance(layers, bool):
            if layers < 1:
                raise ValueError(f"LayerwiseMixing: the number of layers must be ≥ 1, got {layers}")
            names = [str(i) for i in range(layers)]
        elif isinstance(layers, str):
            raise TypeError(
                f"LayerwiseMixing: layers must be a list of layer names or a count, got the string {layers!r}"
            )
        else:
            names = [str(n) for n in layers]
            if not names:
                raise ValueError(
                    f"LayerwiseMixing: layers is empty; expected at least one layer name, got {layers!r}"
                )
            dup = sorted({n for n in names if names.count(n) > 1})
            if dup:
                raise ValueError(f"LayerwiseMixing: duplicate layer names {dup}")
        self.n_models = n_models
        self.layer_names: list[str] = names
        self.delta = nn.Parameter(torch.zeros(n_models, len(names)))

    @property
    def n_layers(self) -> int:
        """N, the number of layers (columns of α)."""
        return len(self.layer_names)

    def forward(self) -> Tensor:
        """Return α, shape ``(T, N)``; columns sum to 1, entries ≥ 0; differentiable in δ."""
        return mixing_ratios(self.delta)

    @torch.no_grad()
    def alphas_dict(self) -> dict[str, list[float]]:
        """Return layer → ``[α^1, …, α^T]`` as plain floats, e.g. for the run's α record."""
        alpha = self().detach().cpu().double()
        return {name: alpha[:, i].tolist() for i, name in enumerate(self.layer_names)}

    def extra_repr(self) -> str:
        return f"n_models={self.n_models}, n_layers={self.n_layers}"
