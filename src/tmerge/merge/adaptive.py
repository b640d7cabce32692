"""The T-IMM adaption-stage network: fused parameters computed from learned α on every forward.

:class:`AdaptiveMerge` wraps the target network. Its fused parameters P (the ``layers``) are not
used; on each forward they are recomputed by eq. 2 from the stacked source parameters, their Fishers
and α = :class:`~tmerge.merge.mixing.LayerwiseMixing` (δ), and substituted into the network with
``torch.func.functional_call`` — no copy of the network per step, and gradients reach δ. The other
parameters (S: norms, heads, re-initialised layers) are the network's own and stay trainable.

Everything that does not depend on α — the merge weights G = F + ε and the products G ⊙ θ — is
computed once at construction, so a step adds only two (T × L) mat-vecs and a division per layer to
a plain forward.

Bad arguments raise :class:`ValueError` (:class:`TypeError` for a layer given as a bare string), as
everywhere in :mod:`tmerge.merge`: the stages check the user's files before they get here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from tmerge.merge.imm import (
    check_fishers,
    check_layers,
    check_merge_args,
    combine_packed,
    fisher_weights,
    listed,
    pack_terms,
)
from tmerge.merge.mixing import LayerwiseMixing
from tmerge.stateless import alias_names, shared_names, stateless_call, with_aliases


class _Slot(NamedTuple):
    """Where one fused parameter lives inside its layer's flat buffer."""

    name: str
    offset: int
    numel: int
    shape: torch.Size


def _target_shapes(net: nn.Module | Mapping[str, Tensor]) -> dict[str, torch.Size]:
    if isinstance(net, nn.Module):
        return {n: p.shape for n, p in net.named_parameters()}
    return {n: t.shape for n, t in net.items()}


def mergeable_layers(
    net: nn.Module | Mapping[str, Tensor],
    sources: Sequence[Mapping[str, Tensor]],
    layers: Mapping[str, Sequence[str]],
) -> tuple[dict[str, list[str]], list[str]]:
    """Split ``layers`` into those whose shapes agree between every source and the target, and the rest.

    A typical mismatch is the first convolution when the sources saw 2 input channels and the
    target has 4: such a layer cannot be merged and is re-initialised and trained with S instead.

    Args:
        net: the target network (its parameters), or a state dict of it.
        sources: T source state dicts.
        layers: layer name → parameter names.

    Returns:
        ``(mergeable, mismatched)``: layer → parameter names for the layers every source matches
        (in ``layers``' order), and the names of the other layers.

    Raises:
        ValueError: if a parameter of ``layers`` is missing from the target or from a source, or
            ``layers`` is empty or lists a parameter twice (:func:`~tmerge.merge.imm.check_layers`).
        TypeError: a layer's parameter names given as one string.
    """
    layer_map = check_layers(layers)
    target = _target_shapes(net)
    mergeable: dict[str, list[str]] = {}
    mismatched: list[str] = []
    for layer, names in layer_map.items():
        missing = [n for n in names if n not in target]
        if missing:
            raise ValueError(f"layer {layer!r}: the target network has no parameter(s) {listed(missing)}")
        ok = True
        for t, sd in enumerate(sources):
            missing = [n for n in names if n not in sd]
            if missing:
                raise ValueError(f"layer {layer!r}: sources[{t}] lacks parameter(s) {listed(missing)}")
            ok = ok and all(sd[n].shape == target[n] for n in names)
        if ok:
            mergeable[layer] = names
        else:
            mismatched.append(layer)
    return mergeable, mismatched


class AdaptiveMerge(nn.Module):
    """Target network whose fused layers are the eq.-2 merge of T sources under learned α.

    Args:
        net: the target network. Its parameters named in ``layers`` are frozen
            (``requires_grad=False``) and ignored by :meth:`forward`; all its other parameters (S)
            stay as they are and are trained with δ.
        sources: T ≥ 2 source state dicts holding (at least) every parameter of ``layers``.
        fishers: T diagonal Fishers keyed like the sources, or None for mean-IMM (F = 1).
        layers: layer name → parameter names; one mixing ratio per layer per model. Every layer
            must have the same shapes in the sources and the target (filter with
            :func:`mergeable_layers` first).
        eps: > 0, added to every Fisher entry (see :mod:`tmerge.merge.imm`).
        fisher_floor: relative Fisher floor, see :func:`~tmerge.merge.imm.fisher_weights`.

    Buffers (non-persistent, so they follow ``.to(device)`` but stay out of checkpoints; rebuild
    the module from the sources to load a checkpoint): per layer i, ``[G ⊙ θ, G]`` of shape
    ``(T, 2, L_i)`` (θ of shape ``(T, L_i)`` for mean-IMM), L_i the layer's number of elements.
    The state dict holds ``mixing.delta`` and the net's parameters.

    Raises:
        ValueError: fewer than 2 sources; a layer parameter missing from the net, a source or a
            Fisher; shapes that differ between sources; layers whose source shapes differ from the
            target's (all such layers are listed).
        TypeError: a layer's parameter names given as one string.
    """

    def __init__(
        self,
        net: nn.Module,
        sources: Sequence[Mapping[str, Tensor]],
        fishers: Sequence[Mapping[str, Tensor]] | None,
        layers: Mapping[str, Sequence[str]],
        *,
        eps: float = 1e-8,
        fisher_floor: float = 0.0,
    ) -> None:
        super().__init__()
        n_models = len(sources)
        check_merge_args("AdaptiveMerge", "source model", n_models, fishers, eps, fisher_floor)
        layer_map = check_layers(layers)
        params = dict(net.named_parameters())

        # Validate names and shapes before building anything; shape mismatches with the target are
        # collected so that one error lists every layer the caller has to exclude.
        for layer, names in layer_map.items():
            missing = [n for n in names if n not in params]
            if missing:
                raise ValueError(f"layer {layer!r}: the target network has no parameter(s) {listed(missing)}")
            for t, sd in enumerate(sources):
                missing = [n for n in names if n not in sd]
                if missing:
                    raise ValueError(f"layer {layer!r}: sources[{t}] lacks parameter(s) {listed(missing)}")
                for n in names:
                    if t > 0 and sd[n].shape != sources[0][n].shape:
                        raise ValueError(
                            f"parameter {n!r}: shape {tuple(sd[n].shape)} in sources[{t}] differs from "
                            f"{tuple(sources[0][n].shape)} in sources[0]"
                        )
        mismatched = []
        for layer, names in layer_map.items():
            diffs = [
                f"{n}: source {tuple(sources[0][n].shape)} vs target {tuple(params[n].shape)}"
                for n in names
                if sources[0][n].shape != params[n].shape
            ]
            if diffs:
                mismatched.append(f"{layer!r} ({', '.join(diffs)})")
        if mismatched:
            raise ValueError(
                f"{len(mismatched)} layer(s) have different shapes in the sources and the target and cannot be "
                f"merged: {'; '.join(mismatched)}. Exclude them from `layers` (see tmerge.merge.mergeable_layers) "
                "and train them with the task-specific parameters."
            )
        if fishers is not None:
            check_fishers(fishers, {n: sources[0][n].shape for ns in layer_map.values() for n in ns})

        self.net = net
        self._aliases = alias_names(net)  # modules reachable under two names (see tmerge.stateless)
        self.n_models = n_models
        self.layers: dict[str, list[str]] = layer_map
        self.eps = eps
        self.fisher_floor = fisher_floor
        self.mixing = LayerwiseMixing(n_models, list(layer_map))
        self.mean_imm = fishers is None

        # Remember the flags we override so release() can restore them.
        self._saved_requires_grad = {n: params[n].requires_grad for ns in layer_map.values() for n in ns}
        for n in self._saved_requires_grad:
            params[n].requires_grad_(False)

        self._slots: list[list[_Slot]] = []
        self._packed_names: list[str] = []
        self._sizes: list[list[int]] = []
        with torch.no_grad():
            for i, names in enumerate(layer_map.values()):
                ref = params[names[0]]
                dtype, device = ref.dtype, ref.device
                # One contiguous block per layer, [G ⊙ θ, G] over the layer's flattened parameters:
                # the per-step merge of a layer is then a single (T,) @ (T, 2·L_i) mat-vec.
                wthetas, weights, slots, offset = [], [], [], 0
                for n in names:
                    theta = torch.stack([sd[n].detach() for sd in sources]).to(device=device, dtype=dtype)
                    if fishers is None:
                        wthetas.append(theta.reshape(n_models, -1))
                    else:
                        f = torch.stack([fi[n].detach() for fi in fishers]).to(device=device, dtype=dtype)
                        g = fisher_weights(f, eps, fisher_floor)
                        wthetas.append((g * theta).reshape(n_models, -1))
                        weights.append(g.reshape(n_models, -1))
                    slots.append(_Slot(n, offset, theta[0].numel(), params[n].shape))
                    offset += theta[0].numel()
                packed = pack_terms(
                    torch.cat(wthetas, dim=1), None if fishers is None else torch.cat(weights, dim=1)
                )
                self.register_buffer(f"_packed_{i}", packed, persistent=False)
                self._packed_names.append(f"_packed_{i}")
                self._slots.append(slots)
                self._sizes.append([s.numel for s in slots])

    # ------------------------------------------------------------------------------------------------

    @property
    def layer_names(self) -> list[str]:
        """The N layer names, in the column order of α."""
        return self.mixing.layer_names

    @property
    def fused_names(self) -> list[str]:
        """Names of the net's parameters that are merged (P)."""
        return [n for ns in self.layers.values() for n in ns]

    def alphas(self) -> Tensor:
        """Current mixing ratios α, shape ``(T, N)`` (differentiable in δ)."""
        return self.mixing()

    def merged_parameters(self, alpha: Tensor | None = None) -> dict[str, Tensor]:
        """Fused parameters by eq. 2 for ``alpha`` (default: the current α).

        Args:
            alpha: mixing ratios, shape ``(T, N)``; None uses :meth:`alphas`.

        Returns:
            name → merged parameter (the net parameter's shape), differentiable in α.
        """
        if alpha is None:
            alpha = self.mixing()
        if alpha.shape != (self.n_models, len(self._slots)):
            raise ValueError(
                f"AdaptiveMerge: alpha must have shape ({self.n_models}, {len(self._slots)}), got {tuple(alpha.shape)}"
            )
        alpha_t = alpha.t()  # (N, T): row i mixes layer i
        # Give each merged tensor the memory layout of the net's own parameter: with
        # channels-last activations, a contiguous-format conv weight costs a layout conversion in
        # every convolution (measured on 2 CPU cores, base 8, 2×48³: 1.38× a plain step unmatched, 1.08× matched).
        formats = {
            n: torch.channels_last_3d
            for n, p in self.net.named_parameters()
            if p.ndim == 5 and not p.is_contiguous() and p.is_contiguous(memory_format=torch.channels_last_3d)
        }
        out: dict[str, Tensor] = {}
        for i, slots in enumerate(self._slots):
            packed = self._buffers[self._packed_names[i]]
            flat = combine_packed(alpha_t[i].to(packed.dtype), packed)  # (L_i,)
            # Views into the layer's flat result, no copies. split (not slicing) so that the backward
            # concatenates the parameters' gradients instead of zero-padding each to L_i and summing.
            # They carry the buffers' dtype, which follows the module's .to()/.double() like the net's.
            for s, part in zip(slots, flat.split(self._sizes[i]), strict=True):
                merged = part.view(s.shape)
                out[s.name] = (
                    merged.contiguous(memory_format=formats[s.name]) if s.name in formats else merged
                )
        return out

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Run the net with its fused parameters replaced by the merge under the current α.

        Arguments are passed to the wrapped network unchanged (e.g. ``x`` of shape
        ``(B, C, D, H, W)``); the network's output is returned.
        """
        return stateless_call(self.net, self.merged_parameters(), args, kwargs, self._aliases)

    @torch.no_grad()
    def materialize(self) -> dict[str, Tensor]:
        """Full state dict for ``net``: merged P under the current α (detached) and the net's own S.

        Returns:
            name → tensor, loadable with ``net.load_state_dict(...)`` (strict).
        """
        sd = {k: v.detach().clone() for k, v in self.net.state_dict().items()}
        # A shared parameter appears under each of its names in a state dict; all get the merge.
        merged = with_aliases(self.merged_parameters(), shared_names(self.net))
        for n, v in merged.items():
            sd[n] = v.detach().clone()
        return sd

    def release(self) -> nn.Module:
        """Load :meth:`materialize` into the wrapped net, restore its fused parameters' ``requires_grad``.

        Returns:
            The wrapped network, ready for the fine-tune stage. This module must not be used afterwards.
        """
        self.net.load_state_dict(self.materialize())
        params = dict(self.net.named_parameters())
        for n, flag in self._saved_requires_grad.items():
            params[n].requires_grad_(flag)
        return self.net

    def extra_repr(self) -> str:
        kind = (
            "mean-IMM"
            if self.mean_imm
            else f"Fisher-weighted, eps={self.eps:g}, fisher_floor={self.fisher_floor:g}"
        )
        return f"n_models={self.n_models}, n_layers={len(self._slots)}, {kind}"
