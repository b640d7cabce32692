"""Merging by task vectors: task arithmetic, TIES, DARE and SLERP, on state dicts.

Every model to merge descends from one base θ₀ (for tmerge's sources: the random initialisation
M1 started from, since M2 starts from M1). The *task vector* of model t is τ_t = θ_t − θ₀.

* Task arithmetic (Ilharco et al. 2023, "Editing models with task arithmetic"):
  θ = θ₀ + λ Σ_t τ_t.
* TIES (Yadav et al. 2023, "TIES-Merging: resolving interference when merging models"): trim each
  τ_t to its k % largest-magnitude entries, elect per entry the sign of the summed trimmed mass
  γ = sgn(Σ_t τ̂_t), average the trimmed entries that agree with γ (disjoint mean), θ = θ₀ + λ τ_m.
  The trim is per tensor, as mergekit does it; Yadav et al.'s code ranks the whole flattened task
  vector at once, which lets large layers take most of the k %.
* DARE (Yu et al. 2024, "Language models are super Mario"): drop each entry of τ_t with
  probability p and rescale the rest by 1/(1 − p), which keeps E[τ̃_t] = τ_t; then merge the
  sparsified vectors by task arithmetic (``dare``) or TIES (``dare-ties``).
* SLERP (Shoemake 1985, as used for model merging by mergekit): per tensor, the spherical
  interpolation between two models at t ∈ [0, 1].

The functions take and return ``{name: Tensor}`` mappings and never modify their inputs. Tensors
that are not floating point (integer buffers) are copied from the first model. Shapes are
checked by :func:`check_state_dicts`; errors are ``ValueError`` naming the key.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor

StateDict = Mapping[str, Tensor]


def check_state_dicts(
    models: Sequence[StateDict], base: StateDict | None = None, what: str = "merge"
) -> list[str]:
    """The names every model (and the base) holds with one shape and dtype, in the first model's order.

    Raises:
        ValueError: no models, or a name missing from a model or the base, or of another shape or
            dtype there (the first such name is quoted with both shapes/dtypes).
    """
    if not models:
        raise ValueError(f"{what}: expected at least one model, got none")
    names = list(models[0])
    others = [(f"model {t}", m) for t, m in enumerate(models)][1:]
    if base is not None:
        others.append(("base", base))
    ref = models[0]
    for label, sd in others:
        missing = [n for n in names if n not in sd]
        if missing:
            raise ValueError(f"{what}: {label} lacks {missing[:3]}{' …' if len(missing) > 3 else ''}")
        extra = [n for n in sd if n not in ref]
        if extra:
            raise ValueError(
                f"{what}: {label} has keys model 0 lacks: {extra[:3]}{' …' if len(extra) > 3 else ''}"
            )
        for n in names:
            if sd[n].shape != ref[n].shape:
                raise ValueError(
                    f"{what}: {n!r} has shape {tuple(sd[n].shape)} in {label}, {tuple(ref[n].shape)} in model 0"
                )
            if sd[n].dtype != ref[n].dtype:
                raise ValueError(
                    f"{what}: {n!r} has dtype {sd[n].dtype} in {label}, {ref[n].dtype} in model 0"
                )
    return names


def _mergeable(t: Tensor) -> bool:
    return t.is_floating_point()


def _add_to_base(
    names: Sequence[str],
    models: Sequence[StateDict],
    base: StateDict,
    lam: float,
    merged_vector: Callable[[str, list[Tensor]], Tensor],
) -> dict[str, Tensor]:
    """θ₀ + λ · ``merged_vector(name, [τ_1, …, τ_T])`` per floating-point tensor (computed in
    float64, returned in the base's dtype); other tensors are copied from the first model."""
    out: dict[str, Tensor] = {}
    for n in names:
        if not _mergeable(base[n]):
            out[n] = models[0][n].clone()
            continue
        theta0 = base[n].to(torch.float64)
        taus = [m[n].to(torch.float64) - theta0 for m in models]
        out[n] = (theta0 + lam * merged_vector(n, taus)).to(base[n].dtype)
    return out


def task_arithmetic(models: Sequence[StateDict], base: StateDict, lam: float = 1.0) -> dict[str, Tensor]:
    """θ = θ₀ + λ Σ_t (θ_t − θ₀) (Ilharco et al. 2023).

    With one model and λ = 1 this returns the model; with T models and λ = 1/T, their mean.

    Args:
        models: T ≥ 1 state dicts descending from ``base``.
        base: θ₀.
        lam: λ, the scale of the summed task vector.
    """
    names = check_state_dicts(models, base, "task_arithmetic")
    return _add_to_base(names, models, base, lam, lambda _, taus: sum(taus[1:], taus[0]))


def trim(tau: Tensor, k: float) -> Tensor:
    """Keep the ``k`` % largest-magnitude entries of ``tau`` (ties at the threshold kept), zero the rest.

    Args:
        tau: a task-vector tensor of any shape.
        k: percentage in (0, 100]; 100 keeps everything.
    """
    if not 0 < k <= 100:
        raise ValueError(f"trim: k must be a percentage in (0, 100], got {k!r}")
    if k == 100 or tau.numel() == 0:
        return tau.clone()
    keep = max(1, math.ceil(tau.numel() * k / 100))
    threshold = tau.abs().flatten().kthvalue(tau.numel() - keep + 1).values
    return torch.where(tau.abs() >= threshold, tau, torch.zeros_like(tau))


def ties_vector(taus: Sequence[Tensor], k: float = 20.0) -> Tensor:
    """TIES' merged task vector τ_m for one tensor: trim, elect signs, disjoint mean.

    Args:
        taus: T task-vector tensors of one shape.
        k: percentage of entries kept per task vector (Yadav et al. use 20).

    Returns:
        τ_m: per entry, the mean of the trimmed values whose sign equals γ = sgn(Σ_t τ̂_t); 0 where
        none agrees (or all were trimmed).
    """
    trimmed = torch.stack([trim(t.to(torch.float64), k) for t in taus])
    gamma = torch.sign(trimmed.sum(0))
    agree = (torch.sign(trimmed) == gamma) & (trimmed != 0)
    count = agree.sum(0)
    total = torch.where(agree, trimmed, torch.zeros_like(trimmed)).sum(0)
    return torch.where(count > 0, total / count.clamp(min=1), torch.zeros_like(total)).to(taus[0].dtype)


def ties(
    models: Sequence[StateDict], base: StateDict, k: float = 20.0, lam: float = 1.0
) -> dict[str, Tensor]:
    """θ = θ₀ + λ · TIES(τ_1, …, τ_T) per tensor (Yadav et al. 2023); see :func:`ties_vector`."""
    names = check_state_dicts(models, base, "ties")
    return _add_to_base(names, models, base, lam, lambda _, taus: ties_vector(taus, k))


def mask_seed(seed: int, model: int, name: str) -> int:
    """The seed of one tensor's DARE mask: fixed by (seed, model index, tensor name), so a mask
    does not depend on which other tensors are merged with it or in which order. A 32-bit hash:
    torch's CPU generator (mt19937) keeps only the low 32 bits of a seed."""
    digest = hashlib.blake2b(f"{seed}/{model}/{name}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little")


def dare_vector(tau: Tensor, p: float, generator: torch.Generator) -> Tensor:
    """Drop each entry of ``tau`` with probability ``p``, rescale the kept ones by 1/(1 − p).

    The expectation over the drop mask is ``tau`` itself; ``p = 0`` returns ``tau`` exactly.
    """
    if not 0 <= p < 1:
        raise ValueError(f"dare: the drop probability p must lie in [0, 1), got {p!r}")
    if p == 0:
        return tau.clone()
    keep = torch.rand(tau.shape, generator=generator, device=tau.device) >= p
    return torch.where(keep, tau / (1 - p), torch.zeros_like(tau))


def dare(
    models: Sequence[StateDict],
    base: StateDict,
    p: float = 0.5,
    lam: float = 1.0,
    *,
    seed: int = 0,
    ties_k: float | None = None,
) -> dict[str, Tensor]:
    """DARE (Yu et al. 2024): sparsify every task vector (seeded), then merge.

    Args:
        models, base: as for :func:`task_arithmetic`.
        p: drop probability.
        lam: λ of the final merge.
        seed: of the drop masks; each tensor's mask is seeded by (seed, model, name)
            (:func:`mask_seed`).
        ties_k: None merges the sparsified vectors by task arithmetic (``dare``); a percentage
            merges them by TIES with that trim (``dare-ties``).
    """
    names = check_state_dicts(models, base, "dare")

    def sparse_tau(t: int, n: str) -> Tensor:
        g = torch.Generator().manual_seed(mask_seed(seed, t, n))
        return dare_vector(models[t][n].to(torch.float64) - base[n].to(torch.float64), p, g)

    sparse = [{n: sparse_tau(t, n) for n in names if _mergeable(base[n])} for t in range(len(models))]

    def merged(n: str, _: list[Tensor]) -> Tensor:
        taus = [s[n] for s in sparse]
        return sum(taus[1:], taus[0]) if ties_k is None else ties_vector(taus, ties_k)

    return _add_to_base(names, models, base, lam, merged)


def slerp_tensor(a: Tensor, b: Tensor, t: float, eps: float = 1e-8) -> Tensor:
    """Spherical interpolation between ``a`` and ``b`` (any shape, flattened) at ``t``.

    With ω the angle between the two: sin((1 − t)ω)/sin ω · a + sin(tω)/sin ω · b. Nearly
    parallel tensors (sin ω < ``eps``) fall back to linear interpolation.
    """
    if not 0 <= t <= 1:
        raise ValueError(f"slerp: t must lie in [0, 1], got {t!r}")
    x, y = a.to(torch.float64).flatten(), b.to(torch.float64).flatten()
    nx, ny = x.norm(), y.norm()
    if nx == 0 or ny == 0:
        return torch.lerp(a.to(torch.float64), b.to(torch.float64), t).to(a.dtype)
    cos = torch.clamp((x @ y) / (nx * ny), -1.0, 1.0)
    omega = torch.arccos(cos)
    sin = torch.sin(omega)
    if sin < eps:
        out = (1 - t) * x + t * y
    else:
        out = torch.sin((1 - t) * omega) / sin * x + torch.sin(t * omega) / sin * y
    return out.view(a.shape).to(a.dtype)


def slerp(models: Sequence[StateDict], t: float = 0.5) -> dict[str, Tensor]:
    """Per tensor, :func:`slerp_tensor` between exactly two models at ``t`` (0: the first, 1: the second)."""
    if len(models) != 2:
        raise ValueError(f"slerp merges exactly 2 models, got {len(models)}")
    names = check_state_dicts(models, None, "slerp")
    a, b = models
    return {n: slerp_tensor(a[n], b[n], t) if _mergeable(a[n]) else a[n].clone() for n in names}


def regmean(weights: Sequence[Tensor], grams: Sequence[Tensor], alpha: float = 1.0) -> Tensor:
    """RegMean for one linear map (Jin et al. 2023, "Dataless knowledge fusion by merging weights
    of language models"): the W that minimises Σ_t ‖X_t Wᵀ − X_t W_tᵀ‖², i.e.

        W = (Σ_t W_t G_t)(Σ_t G_t)⁻¹,   G_t = X_tᵀ X_t (the Gram matrix of model t's layer inputs).

    A convolution is a linear map of its unfolded input patches: flatten its weight to
    ``(C_out, C_in·k³)`` and take the Gram matrix of the unfolded inputs.

    Args:
        weights: T weight matrices ``(out, in)``.
        grams: T Gram matrices ``(in, in)`` of the inputs each model's layer saw.
        alpha: Jin et al.'s shrinkage of each G_t's off-diagonal entries,
            G̃_t = α G_t + (1 − α) diag(G_t), in [0, 1]; 1 keeps the Gram matrices as they are, and
            a smaller α regularises when the inputs do not span every direction.

    Returns:
        The merged ``(out, in)`` matrix, in the first weight's dtype.
    """
    if len(weights) != len(grams) or not weights:
        raise ValueError(
            f"regmean: expected as many Gram matrices as weights, got {len(grams)} and {len(weights)}"
        )
    for t, (w, g) in enumerate(zip(weights, grams, strict=True)):
        if w.ndim != 2 or g.shape != (w.shape[1], w.shape[1]):
            raise ValueError(
                f"regmean: weight {t} must be (out, in) with a Gram matrix (in, in), got {tuple(w.shape)} and {tuple(g.shape)}"
            )
    if not 0 <= alpha <= 1:
        raise ValueError(f"regmean: alpha must lie in [0, 1], got {alpha!r}")
    grams = [
        alpha * g.to(torch.float64) + (1 - alpha) * torch.diag(g.diagonal().to(torch.float64)) for g in grams
    ]
    total = sum(grams, torch.zeros(()))
    rhs = sum(
        (w.to(torch.float64) @ g.to(torch.float64) for w, g in zip(weights, grams, strict=True)),
        torch.zeros(()),
    )
    # W Σ G = Σ W_t G_t  ⇔  (Σ G) Wᵀ = (Σ W_t G_t)ᵀ, Σ G symmetric.
    return torch.linalg.solve(total, rhs.T).T.to(weights[0].dtype)
