"""Parameter transfer: initialise a network from another model's weights where shapes match."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
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
