"""Fisher-weighted merging of models (IMM, paper eq. 2) with per-layer mixing ratios.

For T models with parameters θ^t and diagonal Fishers F^t (same shapes), the merged parameter is,
element-wise,

    θ = Σ_t α^t (F^t + ε) θ^t / Σ_t α^t (F^t + ε)                                   (eq. 2 + ε)

with α ≥ 0 and Σ_t α^t = 1. Because the α sum to one, the denominator is Σ_t α^t F^t + ε, i.e. eq. 2
with ε added to the denominator, and the numerator gains ε·(α-weighted mean of θ). Adding ε to every
Fisher instead of only to the denominator is deliberate:

* one-hot α returns the chosen model exactly (up to float rounding), even where its Fisher is 0 —
  plain ``ΣαFθ / (ΣαF + ε)`` would shrink every weight by F/(F+ε) and return 0 where F == 0;
* where all weighted Fishers vanish, the result falls back smoothly to the α-weighted mean, with no
  discontinuous branch in the autograd graph;
* mean-IMM (F = 1) is exactly the α-weighted mean, and equal Fishers give the α-weighted mean.

The bias this leaves is a pull toward the α-weighted mean of size ε/(ΣαF + ε): negligible when the
Fishers are large against ε, but **ε must be small relative to the Fishers' scale** (empirical Fishers
of deep nets are often 1e-8 or smaller; normalise them, or lower ``eps``).

The math lives in the pure functions :func:`fisher_weights`, :func:`pack_terms`, :func:`combine_packed`
and :func:`merge_tensor`;
:func:`imm_merge` validates state dicts, Fishers and mixing ratios and applies them name by name.

Errors: this is pure code, so a bad argument raises :class:`ValueError` (or :class:`TypeError` for an
argument of the wrong kind) naming the value it got — a traceback, not a one-line user error. The
stages check the user's files and keys first and report those as :class:`~tmerge.errors.TmergeError`.

One file of ~450 lines on purpose: eq. 2, its ε, its validation and its packed form are one
formula; half of the lines are the docstrings that state its tensor shapes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from tmerge.fisher import fisher_problem

#: Tolerance on Σ_t α^t = 1 (float32 sigmoid-normalised ratios are off by ~1e-7).
ALPHA_SUM_TOL = 1e-4

#: Number of offending names quoted in an error message before "… and k more".
_MAX_LISTED = 5


# ----------------------------------------------------------------------------------------------------
# Pure math
# ----------------------------------------------------------------------------------------------------


def fisher_weights(fishers: Tensor, eps: float, fisher_floor: float = 0.0) -> Tensor:
    """Turn stacked Fishers into the merge weights ``G = max(F, floor·mean F) + ε``.

    Args:
        fishers: diagonal Fishers of one parameter, stacked over models, shape ``(T, *shape)``.
        eps: added to every entry, > 0; makes the merge well defined where all Fishers are 0.
        fisher_floor: relative floor; entries of model t below ``fisher_floor`` times the mean of
            model t's Fisher for this parameter are raised to it, so that a model whose Fisher is
            (nearly) zero somewhere does not lose all say there. 0 disables it.

    Returns:
        Merge weights ``G``, shape ``(T, *shape)``, all > 0.
    """
    if fisher_floor > 0.0:
        # Per model, per parameter tensor: mean over everything but the model axis.
        floor = fisher_floor * fishers.reshape(fishers.shape[0], -1).mean(dim=1)
        floor = floor.reshape(fishers.shape[0], *([1] * (fishers.dim() - 1)))
        fishers = torch.maximum(fishers, floor)
    return fishers + eps


def pack_terms(weighted_thetas: Tensor, weights: Tensor | None) -> Tensor:
    """Pack the α-independent terms of eq. 2 for :func:`combine_packed`.

    Args:
        weighted_thetas: ``G ⊙ θ`` stacked over models, shape ``(T, *shape)`` (θ when ``weights`` is None).
        weights: merge weights ``G`` (see :func:`fisher_weights`), shape ``(T, *shape)``, or None (G = 1).

    Returns:
        ``(T, 2, L)`` holding ``[G ⊙ θ, G]`` per model (``(T, L)`` holding θ when ``weights`` is None),
        L = ∏ shape, contiguous.
    """
    n_models = weighted_thetas.shape[0]
    if weights is None:
        return weighted_thetas.reshape(n_models, -1).contiguous()
    return torch.stack(
        [weighted_thetas.reshape(n_models, -1), weights.reshape(n_models, -1)], dim=1
    ).contiguous()


def combine_packed(alpha: Tensor, packed: Tensor) -> Tensor:
    """Core of eq. 2: ``Σ_t α^t G^t θ^t / Σ_t α^t G^t`` from :func:`pack_terms`' output.

    Numerator and denominator come from one mat-vec over the model axis (its backward is a
    reduction too), which is what keeps an adaption step close to a plain one. The result is
    invariant to rescaling α, so α need not be normalised here. Differentiable in α.

    Args:
        alpha: mixing ratios, shape ``(T,)``.
        packed: ``(T, 2, L)`` Fisher-weighted terms, or ``(T, L)`` parameters for mean-IMM.

    Returns:
        The merged, flattened parameter, shape ``(L,)``.
    """
    if packed.dim() == 2:
        return (alpha @ packed) / alpha.sum()
    # unbind, not [0]/[1]: indexing's backward zero-fills a (2, L) buffer per index, unbind's stacks.
    num, den = (alpha @ packed.reshape(packed.shape[0], -1)).view(2, -1).unbind(0)
    return num / den


def merge_tensor(
    thetas: Tensor,
    fishers: Tensor | None,
    alpha: Tensor,
    eps: float = 1e-8,
    fisher_floor: float = 0.0,
) -> Tensor:
    """Merge one parameter of T models by eq. 2 (ε added to every Fisher, see the module doc).

    Args:
        thetas: the parameter of each model, shape ``(T, *shape)``.
        fishers: their diagonal Fishers, shape ``(T, *shape)``; None → mean-IMM (F = 1), i.e. the
            α-weighted mean.
        alpha: mixing ratios, shape ``(T,)``, ≥ 0 (need not sum to 1: the merge is scale-invariant).
        eps: > 0, added to every Fisher entry.
        fisher_floor: relative Fisher floor, see :func:`fisher_weights`.

    Returns:
        The merged parameter, shape ``(*shape)``, in ``thetas``' dtype; differentiable in ``alpha``.

    Raises:
        ValueError: if ``alpha`` is not ``(T,)`` or ``fishers`` does not match ``thetas``' shape.
    """
    if alpha.dim() != 1 or alpha.shape[0] != thetas.shape[0]:
        raise ValueError(
            f"merge_tensor: alpha must have shape ({thetas.shape[0]},) to match thetas {tuple(thetas.shape)}, "
            f"got {tuple(alpha.shape)}"
        )
    alpha = alpha.to(thetas.dtype)
    if fishers is None:
        packed = pack_terms(thetas, None)
    else:
        if fishers.shape != thetas.shape:
            raise ValueError(
                f"merge_tensor: fishers shape {tuple(fishers.shape)} differs from thetas shape {tuple(thetas.shape)}"
            )
        g = fisher_weights(fishers.to(thetas.dtype), eps, fisher_floor)
        packed = pack_terms(g * thetas, g)
    return combine_packed(alpha, packed).view(thetas.shape[1:])


# ----------------------------------------------------------------------------------------------------
# Validation helpers (shared with adaptive.py)
# ----------------------------------------------------------------------------------------------------


def fisher_epsilon(fishers: Sequence[Mapping[str, torch.Tensor]] | None, relative: float) -> float:
    """The ε of eq. 2 on the Fishers' own scale: ``relative`` × the mean Fisher entry.

    Empirical Fishers of a segmentation loss are tiny and span many decades (on the embedded
    data: mean ≈ 1e-7, median ≈ 1e-12), so an absolute ε such as 1e-8 would swamp ~90 % of the
    entries and quietly turn IMM into plain averaging. Without Fishers (mean-IMM) ``relative``
    is used as it is.
    """
    if not fishers:
        return relative
    total = sum(float(t.double().sum()) for f in fishers for t in f.values())
    count = sum(t.numel() for f in fishers for t in f.values())
    return relative * (total / count if count and total > 0 else 1.0)


def listed(names: Sequence[str] | set[str]) -> str:
    """Quote a few names for an error message: ``'a', 'b', … and 3 more``."""
    names = sorted(names) if isinstance(names, set) else list(names)
    shown = ", ".join(repr(n) for n in names[:_MAX_LISTED])
    more = len(names) - _MAX_LISTED
    return shown + (f" … and {more} more" if more > 0 else "")


def check_layers(layers: Mapping[str, Sequence[str]]) -> dict[str, list[str]]:
    """Validate a layer → parameter-names grouping and return it as a plain dict of lists.

    Raises:
        TypeError: a layer's value is a bare string instead of a list of names.
        ValueError: it is empty, a layer has no parameters, or a parameter belongs to two layers.
    """
    if len(layers) == 0:
        raise ValueError(
            f"layers is empty: expected at least one layer → [parameter names] entry, got {layers!r}"
        )
    owner: dict[str, str] = {}
    out: dict[str, list[str]] = {}
    for layer, names in layers.items():
        if isinstance(names, str):
            raise TypeError(f"layer {layer!r}: expected a list of parameter names, got the string {names!r}")
        names = list(names)
        if not names:
            raise ValueError(
                f"layer {layer!r} has no parameters: expected at least one parameter name, got {names!r}"
            )
        for n in names:
            if n in owner:
                raise ValueError(f"parameter {n!r} is listed in two layers, {owner[n]!r} and {layer!r}")
            owner[n] = layer
        out[str(layer)] = names
    return out


def check_alpha(alpha: Tensor, n_models: int, what: str) -> None:
    """Check one vector of mixing ratios: shape ``(T,)``, finite, ≥ 0, summing to 1.

    Only detached values are inspected, so the check does not touch the autograd graph.

    Raises:
        ValueError: naming ``what`` (e.g. "alphas for layer 'conv1'") and what was expected.
    """
    if alpha.dim() != 1 or alpha.shape[0] != n_models:
        raise ValueError(
            f"{what}: expected shape ({n_models},) for {n_models} models, got {tuple(alpha.shape)}"
        )
    a = alpha.detach()
    if not torch.isfinite(a).all():
        raise ValueError(f"{what}: contains NaN or infinite values: {a.tolist()}")
    if (a < 0).any():
        raise ValueError(f"{what}: mixing ratios must be ≥ 0, got {a.tolist()}")
    total = float(a.double().sum())
    if abs(total - 1.0) > ALPHA_SUM_TOL:
        raise ValueError(
            f"{what}: mixing ratios must sum to 1 over the {n_models} models, got sum {total:.6g} ({a.tolist()})"
        )


def _as_tensor(value: Tensor | Sequence[float], what: str) -> Tensor:
    """``value`` as a tensor of the default float dtype (a tensor is returned as it is).

    Raises:
        TypeError: ``value`` is not numbers (torch's own TypeError or ValueError is chained).
    """
    if isinstance(value, Tensor):
        return value
    try:
        return torch.as_tensor(value, dtype=torch.get_default_dtype())
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{what}: expected a tensor of mixing ratios, got {value!r}") from exc


def _alpha_per_name(
    alphas: Tensor | Mapping[str, Tensor],
    n_models: int,
    layers: dict[str, list[str]] | None,
    names: Sequence[str],
) -> dict[str, Tensor]:
    """Resolve the three accepted forms of ``alphas`` into one validated ``(T,)`` tensor per name.

    Args:
        alphas: a ``(T,)`` tensor, a ``(T, N)`` tensor (column i ↔ i-th layer of ``layers``) or a
            mapping layer → ``(T,)`` ratios.
        n_models: T.
        layers: layer → parameter names (required for the ``(T, N)`` and mapping forms).
        names: the floating-point parameters to merge.

    Returns:
        name → ``(T,)`` mixing ratios, checked by :func:`check_alpha`.

    Raises:
        TypeError: ratios that are not numbers (see :func:`_as_tensor`).
        ValueError: a form that needs ``layers`` without it, a wrong shape, a layer or a name
            without ratios, or ratios that fail :func:`check_alpha`.
    """
    if isinstance(alphas, Mapping):
        if layers is None:
            raise ValueError(
                "alphas is a mapping layer → ratios, so `layers` (layer → parameter names) is required; "
                f"got layers=None for alphas layers {listed(list(alphas))}"
            )
        unknown = [k for k in alphas if k not in layers]
        if unknown:
            raise ValueError(f"alphas has layers that are not in `layers`: {listed(unknown)}")
        per_layer = {k: _as_tensor(v, f"alphas[{k!r}]") for k, v in alphas.items()}
    else:
        alphas = _as_tensor(alphas, "alphas")
        if alphas.dim() == 1:
            check_alpha(alphas, n_models, "alphas")
            return dict.fromkeys(names, alphas)
        if alphas.dim() != 2:
            raise ValueError(
                f"alphas: expected shape ({n_models},) or ({n_models}, N layers), got {tuple(alphas.shape)}"
            )
        if layers is None:
            raise ValueError(
                f"alphas has shape {tuple(alphas.shape)} (one column per layer), so `layers` is required "
                "to say which parameters each column mixes"
            )
        if alphas.shape != (n_models, len(layers)):
            raise ValueError(
                f"alphas: expected shape ({n_models}, {len(layers)}) for {n_models} models × {len(layers)} layers, "
                f"got {tuple(alphas.shape)}"
            )
        per_layer = {layer: alphas[:, i] for i, layer in enumerate(layers)}

    owner = {n: layer for layer, ns in layers.items() for n in ns}
    out: dict[str, Tensor] = {}
    checked: set[str] = set()
    for n in names:
        layer = owner.get(n)
        if layer is None:
            raise ValueError(
                f"parameter {n!r} is to be merged but belongs to no layer in `layers`, so it has no mixing ratio"
            )
        if layer not in per_layer:
            raise ValueError(f"alphas has no mixing ratios for layer {layer!r} (needed for parameter {n!r})")
        if layer not in checked:
            check_alpha(per_layer[layer], n_models, f"alphas for layer {layer!r}")
            checked.add(layer)
        out[n] = per_layer[layer]
    return out


# ----------------------------------------------------------------------------------------------------
# Public entry point
# ----------------------------------------------------------------------------------------------------


def check_merge_args(
    who: str, item: str, n_models: int, fishers: Sequence[Any] | None, eps: float, fisher_floor: float
) -> None:
    """The argument checks every eq.-2 merge shares (``who`` and ``item`` name them in messages).

    Raises:
        ValueError: fewer than 2 models, a Fisher count that differs from the model count, eps ≤ 0
            or a negative fisher_floor.
    """
    if n_models < 2:
        raise ValueError(f"{who} needs at least 2 {item}s to merge, got {n_models}")
    if fishers is not None and len(fishers) != n_models:
        raise ValueError(
            f"{who}: got {n_models} {item}s but {len(fishers)} Fishers; expected one Fisher per {item}"
        )
    if eps <= 0:
        raise ValueError(
            f"{who}: eps must be > 0 (it keeps the merge defined where all Fishers are 0), got {eps}"
        )
    if fisher_floor < 0:
        raise ValueError(f"{who}: fisher_floor must be ≥ 0, got {fisher_floor}")


def imm_merge(
    state_dicts: Sequence[Mapping[str, Tensor]],
    fishers: Sequence[Mapping[str, Tensor]] | None,
    alphas: Tensor | Mapping[str, Tensor],
    *,
    layers: Mapping[str, Sequence[str]] | None = None,
    names: Sequence[str] | None = None,
    eps: float = 1e-8,
    fisher_floor: float = 0.0,
) -> dict[str, Tensor]:
    """Merge T ≥ 2 models parameter by parameter with eq. 2 (IMM / T-IMM).

    Args:
        state_dicts: T state dicts (name → tensor) with the same names and shapes.
        fishers: T diagonal Fishers (name → tensor shaped like the parameter), or None for mean-IMM
            (F = 1, the α-weighted average).
        alphas: mixing ratios, ≥ 0 and summing to 1 over models, in one of three forms:
            a ``(T,)`` tensor (one ratio for every parameter); a mapping layer → ``(T,)`` tensor
            with ``layers``; or a ``(T, N)`` tensor with ``layers`` (column i ↔ i-th layer of
            ``layers``, in its order).
        layers: layer name → parameter names (paper §3.1: one mixing ratio per layer).
        names: the parameters to merge; default all names in ``layers``, else all keys of
            ``state_dicts[0]``.
        eps: > 0, added to every Fisher entry (see the module doc for why, and for the bias).
        fisher_floor: relative Fisher floor, see :func:`fisher_weights`; 0 disables it.

    Returns:
        name → merged tensor for the merged names only (shape of the parameter; differentiable in
        ``alphas``). Non-floating entries (e.g. BatchNorm's ``num_batches_tracked``) cannot be
        averaged and are copied from ``state_dicts[0]``. Load with ``load_state_dict(..., strict=False)``
        when only part of a network is merged.

    Raises:
        ValueError: fewer than 2 models; names missing from a model or Fisher; shape mismatches;
            negative Fishers; alphas of the wrong form or shape, negative, or not summing to 1.
        TypeError: a layer given as a bare string, or alphas that are not numbers.
    """
    n_models = len(state_dicts)
    check_merge_args("imm_merge", "model", n_models, fishers, eps, fisher_floor)
    layer_map = check_layers(layers) if layers is not None else None

    if names is not None:
        merge_names = list(names)
    elif layer_map is not None:
        merge_names = [n for ns in layer_map.values() for n in ns]
    else:
        merge_names = list(state_dicts[0].keys())
        # Merging "everything" only makes sense if every model has exactly the same names.
        first = set(merge_names)
        for t, sd in enumerate(state_dicts[1:], start=1):
            extra = set(sd.keys()) - first
            if extra:
                raise ValueError(f"state_dicts[{t}] has names that state_dicts[0] lacks: {listed(extra)}")
    if not merge_names:
        raise ValueError(
            "imm_merge: nothing to merge (no names given and state_dicts[0] is empty); "
            f"got names={names!r} and {len(state_dicts[0])} entries in state_dicts[0]"
        )

    for t, sd in enumerate(state_dicts):
        missing = [n for n in merge_names if n not in sd]
        if missing:
            raise ValueError(f"state_dicts[{t}] lacks {len(missing)} name(s) to merge: {listed(missing)}")
    ref = state_dicts[0]
    for n in merge_names:
        for t, sd in enumerate(state_dicts[1:], start=1):
            if sd[n].shape != ref[n].shape:
                raise ValueError(
                    f"parameter {n!r}: shape {tuple(sd[n].shape)} in state_dicts[{t}] differs from "
                    f"{tuple(ref[n].shape)} in state_dicts[0]"
                )

    float_names = [n for n in merge_names if ref[n].is_floating_point()]
    if fishers is not None:
        check_fishers(fishers, {n: ref[n].shape for n in float_names})

    alpha_of = _alpha_per_name(alphas, n_models, layer_map, float_names)

    merged: dict[str, Tensor] = {}
    for n in merge_names:
        if n not in alpha_of:
            merged[n] = ref[n].clone()
            continue
        thetas = torch.stack([sd[n] for sd in state_dicts])
        fs = None if fishers is None else torch.stack([f[n] for f in fishers]).to(thetas.device)
        merged[n] = merge_tensor(thetas, fs, alpha_of[n].to(thetas.device), eps, fisher_floor)
    return merged


def check_fishers(fishers: Sequence[Mapping[str, Tensor]], shapes: Mapping[str, torch.Size]) -> None:
    """Check that every Fisher has every name, with the parameter's shape, finite and ≥ 0
    (:func:`tmerge.fisher.fisher_problem`).

    Args:
        fishers: T mappings name → Fisher tensor.
        shapes: name → expected shape.

    Raises:
        ValueError: naming the Fisher (``fishers[t]``) and the parameter.
    """
    for t, f in enumerate(fishers):
        problem = fisher_problem(f, shapes, f"fishers[{t}]")
        if problem:
            raise ValueError(problem)
