"""Parameter transfer: initialise a network from another model's weights where shapes match, average
tensors of several, and rebuild an input layer for other input channels. Pure code: a bad
argument is a ``ValueError``."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class TransferReport:
    """Which parameters were copied, kept at their fresh initialisation, or absent in the source."""

    copied: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # excluded on purpose (e.g. the heads)
    mismatched: list[str] = field(default_factory=list)  # shape differs (e.g. 2 vs 4 input channels)
    missing: list[str] = field(default_factory=list)  # not in the source state dict

    def summary(self) -> str:
        parts = [f"copied {len(self.copied)} tensors"]
        if self.skipped:
            parts.append(f"re-initialised {len(self.skipped)} by design")
        if self.mismatched:
            parts.append(
                f"re-initialised {len(self.mismatched)} of other shape ({', '.join(self.mismatched[:4])})"
            )
        if self.missing:
            parts.append(f"{len(self.missing)} absent from the source ({', '.join(self.missing[:4])})")
        return "; ".join(parts)


@torch.no_grad()
def transfer_parameters(
    net: nn.Module, source: Mapping[str, torch.Tensor], *, exclude: Iterable[str] = ()
) -> TransferReport:
    """Copy every tensor of ``source`` into ``net``'s state whose name and shape match.

    Args:
        net: the freshly initialised target network (modified in place).
        source: a state dict of a model of the same family.
        exclude: names kept at their fresh initialisation whatever their shape (the target
            task's heads, for instance).

    Returns:
        A :class:`TransferReport` listing what happened to every target tensor.
    """
    excluded = set(exclude)
    report = TransferReport()
    state = net.state_dict()
    for name, tensor in state.items():
        if name in excluded:
            report.skipped.append(name)
        elif name not in source:
            report.missing.append(name)
        elif source[name].shape != tensor.shape:
            report.mismatched.append(name)
        else:
            tensor.copy_(source[name])
            report.copied.append(name)
    return report


@torch.no_grad()
def average_parameters(
    net: nn.Module,
    sources: Sequence[Mapping[str, torch.Tensor]],
    names: Iterable[str],
    weights: Sequence[float] | None = None,
) -> list[str]:
    """Set each of ``names`` in ``net`` to the weighted mean of the sources' tensors of that name.

    Args:
        net: the target network (modified in place).
        sources: T ≥ 1 state dicts.
        names: parameter or buffer names of ``net``; those missing from a source or of another
            shape in one are left as they are.
        weights: T non-negative weights summing to 1; None: uniform (1/T).

    Returns:
        The names that were set.
    """
    if not sources:
        raise ValueError("average_parameters: expected at least one source state dict")
    w = [1.0 / len(sources)] * len(sources) if weights is None else [float(x) for x in weights]
    if len(w) != len(sources):
        raise ValueError(f"average_parameters: {len(w)} weights for {len(sources)} sources")
    state = net.state_dict()
    done = []
    for name in names:
        target = state[name]
        if not all(name in s and s[name].shape == target.shape for s in sources):
            continue
        mean = sum(wt * s[name].to(torch.float64) for wt, s in zip(w, sources, strict=True))
        target.copy_(mean.to(target.dtype))
        done.append(name)
    return done


def map_input_channels(
    tensors: Mapping[str, torch.Tensor],
    target: Mapping[str, torch.Tensor],
    channel_map: Sequence[int],
    *,
    rescale: bool,
    names: Iterable[str] | None = None,
) -> dict[str, torch.Tensor]:
    """Rebuild tensors whose input-channel axis (dim 1) differs from the target's by reusing the
    source channels named in ``channel_map``.

    Args:
        tensors: a source state dict or Fisher, name → ``(C_out, C_in_source, k, k, k)``, ….
        target: the target network's state dict (for the shapes).
        channel_map: ``C_in_target`` source-channel indices.
        rescale: divide each reused filter by the number of target channels that share its
            source channel, so the layer's response to inputs that look alike stays the same
            (weights yes; Fishers no).
        names: the input layer's tensors, mapped even where the source and target shapes agree
            (a reordering of as many channels); None: every tensor whose input-channel axis
            differs from the target's.

    Returns:
        A copy of ``tensors`` with the mapped tensors replaced.

    Raises:
        ValueError: the map names a source channel that does not exist (the message starts with
            ``channel_map:``, the config key of the same name; the stages raise it as its error).
    """
    if any(not isinstance(c, int) or c < 0 for c in channel_map):
        raise ValueError(f"channel_map: expected source-channel indices >= 0, got {list(channel_map)}")
    out = dict(tensors)
    index = torch.tensor(channel_map)
    copies = torch.bincount(index).clamp(min=1)
    chosen = None if names is None else set(names)
    for name, tensor in tensors.items():
        want = target.get(name)
        if want is None or tensor.ndim < 2:
            continue
        if (tensor.shape == want.shape) if chosen is None else (name not in chosen):
            continue
        if (
            tensor.shape[0] != want.shape[0]
            or tensor.shape[2:] != want.shape[2:]
            or want.shape[1] != len(channel_map)
        ):
            continue
        if int(index.max()) >= tensor.shape[1] or int(index.min()) < 0:
            raise ValueError(
                f"channel_map: {list(channel_map)} names source channel {int(index.max())}, "
                f"but {name} has {tensor.shape[1]} input channels (0…{tensor.shape[1] - 1})"
            )
        mapped = tensor.index_select(1, index)
        if rescale:
            mapped = mapped / copies[index].view(1, -1, *([1] * (tensor.ndim - 2))).to(mapped.dtype)
        out[name] = mapped
    return out
