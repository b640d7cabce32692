"""The merge methods by name: what each computes, its parameters, and what it needs.

One table serves ``tmerge merge`` (recipes) and the target stage's initialisations, so a method
is defined once. Each entry's ``run(models, base, fishers, **params)`` takes T state dicts, the
base θ₀ (or None) and the T Fishers (or None) and returns the merged state dict; the maths is in
:mod:`tmerge.merge.imm` and :mod:`tmerge.merge.task_vectors`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from tmerge.merge.imm import check_alpha, fisher_epsilon, imm_merge
from tmerge.merge.task_vectors import TRIM_SCOPES, dare, slerp, task_arithmetic, ties


def _imm(fisher: bool) -> Callable[..., dict[str, Tensor]]:
    """Eq. 2 with the recipe's α (default uniform). Tensors without a Fisher (a source's Fisher
    covers its fused parameters only: norms and heads have none) are merged with unit Fishers,
    i.e. averaged with the same α. ``fisher_scale`` (set by the caller, not the user): the mean
    Fisher entry that ε is relative to; None: this call's Fishers'."""

    def run(
        models: Sequence[Mapping[str, Tensor]], base: Any, fishers: Any, **params: Any
    ) -> dict[str, Tensor]:
        t = len(models)
        alphas = params.get("alphas")
        alpha = torch.full((t,), 1.0 / t) if alphas is None else torch.tensor(alphas, dtype=torch.float32)
        names = [n for n in models[0] if models[0][n].is_floating_point()]
        weighted = [n for n in names if fisher and all(n in f for f in fishers)]
        plain = [n for n in names if n not in weighted]
        out = {n: models[0][n].clone() for n in models[0] if n not in names}
        if weighted:
            f = [{n: x[n] for n in weighted} for x in fishers]
            # ε on the scale of all the Fishers, not only of this call's tensors: a recipe that
            # merges its tensors in groups (per-layer overrides) gets the same ε for each.
            scale = params.get("fisher_scale")
            eps = (
                float(params.get("eps", 1e-8)) * scale
                if scale
                else fisher_epsilon(f, float(params.get("eps", 1e-8)))
            )
            out.update(imm_merge(models, f, alpha, names=weighted, eps=eps))
        if plain:
            out.update(imm_merge(models, None, alpha, names=plain, eps=float(params.get("eps", 1e-8))))
        return out

    return run


def _needs_base(fn: Callable[..., dict[str, Tensor]]) -> Callable[..., dict[str, Tensor]]:
    def run(
        models: Sequence[Mapping[str, Tensor]], base: Any, fishers: Any, **params: Any
    ) -> dict[str, Tensor]:
        return fn(models, base, **params)

    return run


def _slerp(models: Sequence[Mapping[str, Tensor]], base: Any, fishers: Any, *, t: float) -> dict[str, Tensor]:
    return slerp(models, t)


def _dare_ties(
    models: Sequence[Mapping[str, Tensor]],
    base: Mapping[str, Tensor],
    *,
    p: float,
    k: float,
    lam: float,
    seed: int,
    trim: str,
) -> dict[str, Tensor]:
    return dare(models, base, p=p, lam=lam, seed=seed, ties_k=k, trim=trim)


@dataclass(frozen=True)
class Method:
    """A merge method: its function, its parameters (with defaults) and the inputs it needs."""

    run: Callable[..., dict[str, Tensor]]
    params: Mapping[str, Any]
    base: bool = False  # needs θ₀
    fishers: bool = False  # needs the models' Fishers
    models: int | None = None  # exact number of models, if fixed
    paper: str = ""  # the method's reference, e.g. "Yadav et al. 2023"


#: Valid values of the methods' parameters: name → (check, what is expected).
_RANGES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "k": (lambda v: 0 < float(v) <= 100, "a percentage in (0, 100]"),
    "p": (lambda v: 0 <= float(v) < 1, "a drop probability in [0, 1)"),
    "t": (lambda v: 0 <= float(v) <= 1, "a number in [0, 1]"),
    "lam": (lambda v: math.isfinite(float(v)), "a finite number"),
    "eps": (lambda v: float(v) > 0, "a positive number"),
    "seed": (lambda v: int(v) == v and int(v) >= 0, "an integer >= 0"),
    "trim": (lambda v: v in TRIM_SCOPES, f"one of {', '.join(TRIM_SCOPES)}"),
}


def check_value(key: str, value: Any, where: str) -> None:
    """Check one parameter value against its range (parameters without one pass).

    Raises:
        ValueError: ``"<where>: <key> must be <expected>, got <value>"``.
    """
    if key not in _RANGES or value is None:
        return
    ok, expected = _RANGES[key]
    try:
        valid = ok(value)
    except (TypeError, ValueError):
        valid = False
    if not valid:
        raise ValueError(f"{where}: {key} must be {expected}, got {value!r}")


def check_params(method: str, params: Mapping[str, Any], n_models: int) -> None:
    """Check a method's parameters and model count before anything is merged.

    Raises:
        ValueError: an unknown method or parameter, a value out of range (named, with what is
            expected), the wrong number of models, or ``alphas`` that are not numbers ≥ 0
            summing to 1.
    """
    if method not in METHODS:
        raise ValueError(f"unknown merge method {method!r}; expected one of {', '.join(METHODS)}")
    spec = METHODS[method]
    unknown = sorted(set(params) - set(spec.params))
    if unknown:
        raise ValueError(f"{method} takes {', '.join(spec.params)}; unknown {', '.join(unknown)}")
    for key, value in params.items():
        check_value(key, value, method)
    alphas = params.get("alphas")
    if alphas is not None and len(alphas) != n_models:
        raise ValueError(f"{method}: alphas must have one entry per model ({n_models}), got {list(alphas)}")
    if alphas is not None:
        # The recipe's ratios are the user's: refuse them here, where the caller can name the
        # recipe key, not deep inside imm_merge.
        try:
            ratios = torch.tensor([float(a) for a in alphas], dtype=torch.float32)  # as the merge uses them
        except (TypeError, ValueError):
            raise ValueError(f"{method}: alphas must be numbers, got {list(alphas)}") from None
        check_alpha(ratios, n_models, f"{method}: alphas")
    if spec.models is not None and n_models != spec.models:
        raise ValueError(f"{method} merges exactly {spec.models} models, got {n_models}")
    if n_models < (1 if spec.base else 2):
        raise ValueError(f"{method} needs at least {1 if spec.base else 2} models, got {n_models}")


METHODS: dict[str, Method] = {
    "imm": Method(
        _imm(True), {"alphas": None, "eps": 1e-8}, fishers=True, paper="Lee et al. 2017 (mode-IMM)"
    ),
    "mean-imm": Method(_imm(False), {"alphas": None, "eps": 1e-8}, paper="Lee et al. 2017 (mean-IMM)"),
    "task-arithmetic": Method(
        _needs_base(task_arithmetic), {"lam": 1.0}, base=True, paper="Ilharco et al. 2023"
    ),
    # trim: "tensor" (mergekit) or "model" (Yadav et al.'s code); see tmerge.merge.task_vectors.
    "ties": Method(
        _needs_base(ties), {"k": 20.0, "lam": 1.0, "trim": "tensor"}, base=True, paper="Yadav et al. 2023"
    ),
    "dare": Method(_needs_base(dare), {"p": 0.5, "lam": 1.0, "seed": 0}, base=True, paper="Yu et al. 2024"),
    "dare-ties": Method(
        _needs_base(_dare_ties),
        {"p": 0.5, "k": 20.0, "lam": 1.0, "seed": 0, "trim": "tensor"},
        base=True,
        paper="Yu et al. 2024",
    ),
    "slerp": Method(_slerp, {"t": 0.5}, models=2, paper="Shoemake 1985 (as in mergekit)"),
}
