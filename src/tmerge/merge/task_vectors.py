"""Merging by task vectors: task arithmetic, TIES, DARE and SLERP, on state dicts.

Every model to merge descends from one base θ₀ (for tmerge's sources: the random initialisation
M1 started from, since M2 starts from M1). The *task vector* of model t is τ_t = θ_t − θ₀.

* Task arithmetic (Ilharco et al. 2023, "Editing models with task arithmetic"):
  θ = θ₀ + λ Σ_t τ_t.
* TIES (Yadav et al. 2023, "TIES-Merging: resolving interference when merging models"): trim each
  τ_t to its k % largest-magnitude entries, elect per entry the sign of the summed trimmed mass
  γ = sgn(Σ_t τ̂_t), average the trimmed entries that agree with γ (disjoint mean), θ = θ₀ + λ τ_m.
  Where the libraries differ, tmerge states its choice:

  - *trim scope* (``trim=``, :data:`TRIM_SCOPES`): ``"tensor"`` (default) ranks each tensor of τ_t
    on its own, as mergekit does; ``"model"`` ranks all of τ_t's entries at once — every
    floating-point tensor of the call (a target run's merged layers P; a ``tmerge merge`` recipe's
    tensors, per override group) concatenated — as Yadav et al.'s code and fusion-bench do, which
    lets large layers take most of the k %;
  - *kept count* (:func:`kept_count`): ⌈n·k/100⌉ entries of n, at least 1, and every entry tied
    with the smallest kept magnitude. mergekit keeps ⌊n·k/100⌋ (and refuses 0); Yadav et al.'s code
    keeps ⌊n·k/100⌋ + 1 (its threshold is the (n − ⌊n·k/100⌋)-th smallest magnitude, kept with ≥).
    tmerge and Yadav et al. agree where n·k/100 is not a whole number (n = 10, k = 25: both keep
    3, mergekit 2), tmerge and mergekit where it is (n = 10, k = 20: both 2, Yadav et al. 3);
  - *sign election*: an entry whose trimmed values sum to exactly 0 keeps none of them (0);
    mergekit elects + there, Yadav et al.'s code the sign of the whole vector's sum;
  - *merge*: the disjoint mean, as Yadav et al. and mergekit's ``ties``; fusion-bench's default
    ``merge_func`` is the disjoint sum (its ``mean`` is this).
* DARE (Yu et al. 2024, "Language models are super Mario"): drop each entry of τ_t with
  probability p and rescale the rest by 1/(1 − p), which keeps E[τ̃_t] = τ_t; then merge the
  sparsified vectors by task arithmetic (``dare``) or TIES (``dare-ties``). p = 0 is exactly task
  arithmetic (``dare``) or TIES (``dare-ties``). The name ``dare-ties`` means three algorithms:

  - tmerge: DARE per tensor, then the whole of TIES as above (trim by magnitude to k %, with
    ``trim`` scope; sign election; disjoint mean);
  - mergekit ``dare_ties``: DARE, then sign election and the disjoint *sum* — no magnitude trim
    (tmerge with k = 100 and the mean instead of the sum);
  - fusion-bench ``DareTiesMerging``: DARE, then its TIES over the whole model (tmerge with
    ``trim="model"``, with the disjoint sum by default).
* SLERP (Shoemake 1985, as used for model merging by mergekit and fusion-bench): per tensor, the
  spherical interpolation between two models at t ∈ [0, 1], with both references' special cases:
  nearly (anti)parallel tensors, |cos ω| > 0.9995, are interpolated linearly, and a tensor of norm
  ≤ 1e-8 has no direction and counts as orthogonal to the other (ω = π/2: an all-zero ``a`` gives
  sin(tπ/2)·``b``, not (1 − t)·0 + t·``b``).

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

#: Where TIES ranks magnitudes: each tensor on its own (mergekit) or the whole task vector (Yadav
#: et al.'s code, fusion-bench).
TRIM_SCOPES = ("tensor", "model")


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


def kept_count(n: int, k: float) -> int:
    """How many of ``n`` entries TIES keeps at ``k`` %: ⌈n·k/100⌉, at least 1 (and 0 of 0).

    n·k/100 is rounded to 9 decimals first, so that a whole number that float arithmetic puts a
    hair above itself (1500 · 2.2/100 = 33.00000000000001) is not rounded up past it. mergekit
    keeps ⌊n·k/100⌋, Yadav et al.'s code ⌊n·k/100⌋ + 1 (module docstring).

    >>> kept_count(10, 25), kept_count(10, 20), kept_count(7, 1), kept_count(1500, 2.2)
    (3, 2, 1, 33)
    """
    check_k(k)
    if n == 0:
        return 0
    return max(1, math.ceil(round(n * k / 100, 9)))


def check_k(k: float) -> None:
    """Refuse a TIES percentage outside (0, 100] (``ValueError`` naming it)."""
    if not 0 < k <= 100:
        raise ValueError(f"trim: k must be a percentage in (0, 100], got {k!r}")


def _threshold(magnitudes: Tensor, k: float) -> Tensor | None:
    """The smallest magnitude among the :func:`kept_count` largest of ``magnitudes`` (1-D), or None
    when everything is kept."""
    n = magnitudes.numel()
    keep = kept_count(n, k)
    if keep >= n:
        return None
    return magnitudes.kthvalue(n - keep + 1).values


def trim(tau: Tensor, k: float) -> Tensor:
    """Keep the ``k`` % largest-magnitude entries of ``tau`` (ties at the threshold kept), zero the rest.

    Args:
        tau: a task-vector tensor of any shape.
        k: percentage in (0, 100]; 100 keeps everything. :func:`kept_count` entries are kept,
            more where magnitudes tie with the smallest of them.
    """
    check_k(k)
    threshold = _threshold(tau.abs().flatten(), k)
    if threshold is None:
        return tau.clone()
    return torch.where(tau.abs() >= threshold, tau, torch.zeros_like(tau))


def trim_model(tau: Mapping[str, Tensor], k: float) -> dict[str, Tensor]:
    """TIES' trim over a whole task vector: the ``k`` % largest magnitudes of all its tensors
    ranked together (Yadav et al.'s code, fusion-bench), ties at the threshold kept.

    Args:
        tau: one model's task vector, ``{name: tensor}`` of any shapes; N entries in all.
        k: percentage in (0, 100]; :func:`kept_count` (N, k) entries are kept in all.

    Returns:
        ``{name: tensor}`` of the same shapes, the entries below the common threshold zeroed.
    """
    check_k(k)
    if not tau:
        return {}
    threshold = _threshold(torch.cat([t.abs().flatten() for t in tau.values()]), k)
    if threshold is None:
        return {n: t.clone() for n, t in tau.items()}
    return {n: torch.where(t.abs() >= threshold, t, torch.zeros_like(t)) for n, t in tau.items()}


def elect_and_merge(trimmed: Sequence[Tensor]) -> Tensor:
    """TIES after the trim, for one tensor: elect γ = sgn(Σ_t τ̂_t) per entry, then the disjoint
    mean of the τ̂_t whose sign is γ.

    Args:
        trimmed: T trimmed task-vector tensors τ̂_t of one shape.

    Returns:
        τ_m of that shape: the mean of the non-zero values with sign γ; 0 where none agrees, all
        were trimmed, or the values sum to exactly 0 (γ = 0).
    """
    stacked = torch.stack([t.to(torch.float64) for t in trimmed])
    gamma = torch.sign(stacked.sum(0))
    agree = (torch.sign(stacked) == gamma) & (stacked != 0)
    count = agree.sum(0)
    total = torch.where(agree, stacked, torch.zeros_like(stacked)).sum(0)
    merged = torch.where(count > 0, total / count.clamp(min=1), torch.zeros_like(total))
    return merged.to(trimmed[0].dtype)


def ties_vector(taus: Sequence[Tensor], k: float = 20.0) -> Tensor:
    """TIES' merged task vector τ_m for one tensor, trimmed per tensor: :func:`trim` each τ_t,
    then :func:`elect_and_merge`.

    Args:
        taus: T task-vector tensors of one shape.
        k: percentage of entries kept per task vector (Yadav et al. use 20).
    """
    return elect_and_merge([trim(t.to(torch.float64), k) for t in taus]).to(taus[0].dtype)


def check_trim(scope: str) -> str:
    """Return ``scope`` if it is one of :data:`TRIM_SCOPES`, else raise ``ValueError`` naming it."""
    if scope not in TRIM_SCOPES:
        raise ValueError(f"ties: trim must be one of {TRIM_SCOPES}, got {scope!r}")
    return scope


def _ties_of(
    names: Sequence[str], taus: Sequence[Mapping[str, Tensor]], k: float, scope: str
) -> Callable[[str, list[Tensor]], Tensor]:
    """``merged_vector`` for :func:`_add_to_base`: TIES of the given per-model task vectors
    ``taus`` (``{name: τ_t}`` of the floating-point ``names``), trimmed at ``scope``."""
    if check_trim(scope) == "model":
        trimmed = [trim_model({n: t[n] for n in names if n in t}, k) for t in taus]
        return lambda n, _: elect_and_merge([t[n] for t in trimmed])
    return lambda n, _: ties_vector([t[n] for t in taus], k)


def ties(
    models: Sequence[StateDict], base: StateDict, k: float = 20.0, lam: float = 1.0, trim: str = "tensor"
) -> dict[str, Tensor]:
    """θ = θ₀ + λ · TIES(τ_1, …, τ_T) (Yadav et al. 2023).

    Args:
        models, base: as for :func:`task_arithmetic`.
        k: percentage of each task vector's entries kept (:func:`kept_count`).
        lam: λ.
        trim: ``"tensor"``: each tensor ranked on its own (:func:`ties_vector`, mergekit);
            ``"model"``: every floating-point tensor of the call ranked together
            (:func:`trim_model`, Yadav et al.'s code).
    """
    check_trim(trim)
    names = check_state_dicts(models, base, "ties")
    floating = [n for n in names if _mergeable(base[n])]
    taus = [{n: m[n].to(torch.float64) - base[n].to(torch.float64) for n in floating} for m in models]
    return _add_to_base(names, models, base, lam, _ties_of(floating, taus, k, trim))


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
    trim: str = "tensor",
) -> dict[str, Tensor]:
    """DARE (Yu et al. 2024): sparsify every task vector (seeded), then merge.

    Args:
        models, base: as for :func:`task_arithmetic`.
        p: drop probability.
        lam: λ of the final merge.
        seed: of the drop masks; each tensor's mask is seeded by (seed, model, name)
            (:func:`mask_seed`).
        ties_k: None merges the sparsified vectors by task arithmetic (``dare``); a percentage
            merges them by TIES with that trim (``dare-ties``; see the module docstring for what
            mergekit and fusion-bench call dare-ties).
        trim: TIES' trim scope for ``dare-ties`` (:func:`ties`).
    """
    check_trim(trim)
    names = check_state_dicts(models, base, "dare")

    def sparse_tau(t: int, n: str) -> Tensor:
        g = torch.Generator().manual_seed(mask_seed(seed, t, n))
        return dare_vector(models[t][n].to(torch.float64) - base[n].to(torch.float64), p, g)

    floating = [n for n in names if _mergeable(base[n])]
    sparse = [{n: sparse_tau(t, n) for n in floating} for t in range(len(models))]
    if ties_k is not None:
        return _add_to_base(names, models, base, lam, _ties_of(floating, sparse, ties_k, trim))

    def summed(n: str, _: list[Tensor]) -> Tensor:
        taus = [s[n] for s in sparse]
        return sum(taus[1:], taus[0])

    return _add_to_base(names, models, base, lam, summed)


def slerp_tensor(a: Tensor, b: Tensor, t: float, dot_threshold: float = 0.9995, eps: float = 1e-8) -> Tensor:
    """Spherical interpolation between ``a`` and ``b`` (any shape, flattened) at ``t``.

    With ω the angle between the two: sin((1 − t)ω)/sin ω · a + sin(tω)/sin ω · b, computed in
    float64. The special cases are mergekit's and fusion-bench's:

    * |cos ω| > ``dot_threshold`` (nearly parallel or antiparallel): (1 − t)·a + t·b;
    * a tensor of norm ≤ ``eps`` is not normalised, so its cosine with the other is ~0 (exactly
      0 for an all-zero tensor): ω = π/2, and an all-zero ``a`` gives sin(tπ/2)·``b``.

    Args:
        a, b: tensors of one shape; the result has ``a``'s dtype.
        t: in [0, 1]; 0 gives ``a``, 1 gives ``b``.
    """
    if not 0 <= t <= 1:
        raise ValueError(f"slerp: t must lie in [0, 1], got {t!r}")
    x, y = a.to(torch.float64).flatten(), b.to(torch.float64).flatten()
    nx, ny = x.norm(), y.norm()
    ux = x / nx if nx > eps else x
    uy = y / ny if ny > eps else y
    cos = ux @ uy
    if cos.abs() > dot_threshold:
        out = (1 - t) * x + t * y
    else:
        omega = torch.arccos(cos)
        out = (torch.sin((1 - t) * omega) * x + torch.sin(t * omega) * y) / torch.sin(omega)
    return out.view(a.shape).to(a.dtype)


def slerp(models: Sequence[StateDict], t: float = 0.5) -> dict[str, Tensor]:
    """Per tensor, :func:`slerp_tensor` between exactly two models at ``t`` (0: the first, 1: the second)."""
    if len(models) != 2:
        raise ValueError(f"slerp merges exactly 2 models, got {len(models)}")
    names = check_state_dicts(models, None, "slerp")
    a, b = models
    return {n: slerp_tensor(a[n], b[n], t) if _mergeable(a[n]) else a[n].clone() for n in names}
