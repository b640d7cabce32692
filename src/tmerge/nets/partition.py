"""Split a network's parameters into the fused set P and the task-specific set S.

Generic over any :class:`torch.nn.Module`:

* parameters of normalisation layers (batch/instance/group/layer/RMS norm) are task-specific;
* parameters of modules under one of the *head prefixes* (the model's ``head_prefixes`` class
  attribute by default, e.g. ``("seg_heads",)`` for :class:`~tmerge.nets.Isensee2017`,
  ``("output_block",)`` for :class:`~tmerge.nets.DynUNet`) are task-specific;
* everything else is fused, and is grouped into *layers* by the module that owns it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

from torch import nn
from torch.nn.modules.batchnorm import _NormBase

_NORM_TYPES: tuple[type[nn.Module], ...] = (_NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm)
if hasattr(nn, "RMSNorm"):  # torch >= 2.4
    _NORM_TYPES = (*_NORM_TYPES, nn.RMSNorm)


class Partition(NamedTuple):
    """Parameter names split into the fused set P and the task-specific set S.

    Both lists follow ``model.named_parameters()`` order and together hold every parameter once.
    """

    fused: list[str]
    specific: list[str]


def parameter_owners(model: nn.Module) -> dict[str, str]:
    """Map each parameter name to the qualified name of the module that directly owns it.

    Args:
        model: Any module.

    Returns:
        ``{"encoder.0.conv.conv.weight": "encoder.0.conv.conv", …}`` in ``named_parameters()``
        order. A parameter registered on ``model`` itself has owner ``""``. A parameter shared by
        several modules is attributed to the first one, as ``named_parameters()`` lists it once.
    """
    owners: dict[str, str] = {}
    for module_name, module in model.named_modules():
        for param_name, _ in module.named_parameters(recurse=False):
            full = f"{module_name}.{param_name}" if module_name else param_name
            owners.setdefault(full, module_name)
    # Re-key in named_parameters() order, which also drops duplicate names of shared tensors.
    return {name: owners[name] for name, _ in model.named_parameters()}


def _under(module_name: str, prefix: str) -> bool:
    return module_name == prefix or module_name.startswith(prefix + ".")


def partition(model: nn.Module, head_prefixes: Sequence[str] | None = None) -> Partition:
    """Split ``model``'s parameters into fused (P) and task-specific (S) names.

    Args:
        model: Any module.
        head_prefixes: Qualified module names (e.g. ``"seg_heads"``) whose parameters, and those
            of all modules below them, are task-specific. ``None`` uses
            ``getattr(model, "head_prefixes", ())``. A bare string is treated as one prefix.

    Returns:
        ``Partition(fused, specific)``: parameter names in ``named_parameters()`` order.

    Raises:
        ValueError: If a head prefix names no module of ``model`` (a typo would otherwise
            silently merge the heads).

    Example:
        >>> from tmerge.nets import Isensee2017
        >>> fused, specific = partition(Isensee2017(4, 3, base_filters=4))
        >>> len(fused), "seg_heads.0.weight" in specific
        (27, True)
    """
    if head_prefixes is None:
        head_prefixes = getattr(model, "head_prefixes", ())
    if isinstance(head_prefixes, str):
        head_prefixes = (head_prefixes,)
    prefixes = tuple(p.rstrip(".") for p in head_prefixes)
    modules = dict(model.named_modules())
    for prefix in prefixes:
        if not any(_under(name, prefix) for name in modules):
            raise ValueError(f"partition: head prefix {prefix!r} matches no module of {type(model).__name__}")

    fused: list[str] = []
    specific: list[str] = []
    for name, owner in parameter_owners(model).items():
        is_norm = isinstance(modules[owner], _NORM_TYPES)
        is_head = any(_under(owner, prefix) for prefix in prefixes)
        (specific if is_norm or is_head else fused).append(name)
    return Partition(fused, specific)


def layer_groups(model: nn.Module, names: Sequence[str]) -> dict[str, list[str]]:
    """Group parameter names by the module that owns them (one group = one "layer" of eq. 2).

    Args:
        model: The module the names belong to.
        names: Parameter names of ``model`` (typically the fused names from :func:`partition`).

    Returns:
        ``{module_name: [parameter names]}`` in ``named_parameters()`` order, e.g.
        ``{"encoder.0.conv.conv": ["encoder.0.conv.conv.weight"], …}``; 27 groups for the fused
        set of ``Isensee2017(depth=5)``.

    Raises:
        ValueError: If a name is not a parameter of ``model``.
    """
    owners = parameter_owners(model)
    wanted = set(names)
    unknown = [n for n in names if n not in owners]
    if unknown:
        raise ValueError(
            f"layer_groups: {len(unknown)} name(s) are not parameters of {type(model).__name__}: "
            f"{', '.join(unknown[:5])}{' …' if len(unknown) > 5 else ''}"
        )
    groups: dict[str, list[str]] = {}
    for name, owner in owners.items():
        if name in wanted:
            groups.setdefault(owner, []).append(name)
    return groups


def head_names(net: nn.Module, specific: Sequence[str]) -> list[str]:
    """The task-specific parameters that belong to the segmentation heads (re-created for every
    new task, unlike the instance norms, which a transfer may keep): those under the network's
    ``head_prefixes``."""
    prefixes = tuple(p.rstrip(".") + "." for p in getattr(net, "head_prefixes", ()))
    return [n for n in specific if prefixes and n.startswith(prefixes)]


def input_names(net: nn.Module, fused: Sequence[str]) -> list[str]:
    """The parameters of the input layer: the layer group (:func:`layer_groups`) of the first
    fused convolution weight (``ndim >= 3``) in ``named_parameters()`` order; empty if none."""
    params = dict(net.named_parameters())
    groups = layer_groups(net, fused)
    for names in groups.values():
        if any(params[n].ndim >= 3 for n in names):
            return list(names)
    return []
