"""How far apart two models' fused parameters are, layer by layer.

IMM's premise (Lee et al. 2017; paper §3.1) is that the merged models sit in one basin of the
loss, which incremental training (M2 starts from M1) is meant to ensure. These numbers say
whether it did: a relative distance near 1 means the second model has moved as far from the first
as the first is from the origin.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor


def layer_distances(
    first: Mapping[str, Tensor], second: Mapping[str, Tensor], layers: Mapping[str, Sequence[str]]
) -> dict[str, dict[str, float]]:
    """Per layer, the relative distance ‖θ₂ − θ₁‖ / ‖θ₁‖ and the cosine ⟨θ₁, θ₂⟩ / (‖θ₁‖ ‖θ₂‖).

    Each layer's parameters (weights and bias) are flattened into one vector per model.

    Args:
        first: θ₁, name → tensor.
        second: θ₂, name → tensor of the same shapes.
        layers: layer name → parameter names (e.g. :func:`tmerge.nets.layer_groups`). Layers whose
            shapes differ between the two models are skipped.

    Returns:
        layer → ``{"rel_distance": float, "cosine": float}``, in ``layers``' order. A layer whose
        ‖θ₁‖ (or ‖θ₂‖) is 0 gets ``inf`` (or a cosine of 0).
    """
    out: dict[str, dict[str, float]] = {}
    for layer, names in layers.items():
        if any(first[n].shape != second[n].shape for n in names):
            continue
        a = torch.cat([first[n].detach().double().flatten() for n in names])
        b = torch.cat([second[n].detach().double().flatten() for n in names])
        na, nb = float(a.norm()), float(b.norm())
        out[layer] = {
            "rel_distance": float((b - a).norm()) / na if na > 0 else float("inf"),
            "cosine": float(a @ b) / (na * nb) if na > 0 and nb > 0 else 0.0,
        }
    return out


def summarise_distances(per_layer: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """Min, median and max of the relative distance and the cosine over layers."""
    summary: dict[str, float] = {}
    for key in ("rel_distance", "cosine"):
        values = torch.tensor([v[key] for v in per_layer.values()], dtype=torch.float64)
        if values.numel() == 0:
            continue
        summary[f"{key}_min"] = float(values.min())
        summary[f"{key}_median"] = float(values.quantile(0.5))  # the mean of the middle two for even N
        summary[f"{key}_max"] = float(values.max())
    return summary
