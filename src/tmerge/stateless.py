"""Calling a module with substituted parameters, shared (tied, aliased) ones included.

``torch.func.functional_call`` substitutes tensors by name. A module reachable under two names
(MONAI's ``DynUNet`` lists its encoder blocks again under ``skip_layers``; weight tying does the
same) has two names for one parameter, of which ``named_parameters()`` reports only the first.
With ``tie_weights=True`` functorch ties the names itself, but under ``vmap(grad(…))`` that path
leaves the module's parameters replaced by functorch wrappers without storage once the call
returns; every later use of the model is then wrong. Here the substitution is spelt out instead:
every *slot* (owning module and attribute) of a substituted tensor gets it, once, and
``tie_weights=False``, so that every use of a shared parameter sees the substituted tensor,
gradients add up over the uses, and the module comes back exactly as it was.
"""

from __future__ import annotations

from collections.abc import Mapping
from itertools import chain
from typing import Any

from torch import Tensor, nn
from torch.func import functional_call


def shared_names(module: nn.Module) -> dict[str, list[str]]:
    """First name → every other name of the same parameter or buffer (all paths, slots or not),
    e.g. to give a shared tensor one value under each of its keys in a state dict."""
    by_tensor: dict[int, list[str]] = {}
    named = chain(
        module.named_parameters(remove_duplicate=False), module.named_buffers(remove_duplicate=False)
    )
    for name, tensor in named:
        by_tensor.setdefault(id(tensor), []).append(name)
    return {names[0]: names[1:] for names in by_tensor.values() if len(names) > 1}


def alias_names(module: nn.Module) -> dict[str, list[str]]:
    """First name → the names of the *other slots* holding the same parameter or buffer.

    A slot is one (owning module, attribute) pair. A submodule reachable under two paths is one
    slot with two names: substituting it under either name reaches every use, and naming it
    twice would break the restore (the second name would save the substitute as "original" and
    put it back). A parameter tied into two modules (weight tying) is two slots, and both need
    the substitute. The first name is the one ``named_parameters()``/``named_buffers()`` report.
    """
    by_tensor: dict[int, list[str]] = {}
    slots: dict[int, set[tuple[int, str]]] = {}
    named = chain(
        module.named_parameters(remove_duplicate=False), module.named_buffers(remove_duplicate=False)
    )
    for name, tensor in named:
        owner_name, _, attr = name.rpartition(".")
        slot = (id(module.get_submodule(owner_name)), attr)
        seen = slots.setdefault(id(tensor), set())
        names = by_tensor.setdefault(id(tensor), [])
        if not names or slot not in seen:
            names.append(name)
        seen.add(slot)
    return {names[0]: names[1:] for names in by_tensor.values() if len(names) > 1}


def with_aliases(state: Mapping[str, Tensor], aliases: Mapping[str, list[str]]) -> dict[str, Tensor]:
    """``state`` with each tensor also under the other names of the parameter it replaces."""
    out = dict(state)
    for name, tensor in state.items():
        for other in aliases.get(name, ()):
            out.setdefault(other, tensor)
    return out


def stateless_call(
    module: nn.Module,
    state: Mapping[str, Tensor],
    args: Any,
    kwargs: Mapping[str, Any] | None = None,
    aliases: Mapping[str, list[str]] | None = None,
) -> Any:
    """``module(*args, **kwargs)`` with the tensors of ``state`` in place of the module's own.

    Args:
        module: the network.
        state: name (as ``named_parameters()``/``named_buffers()`` give it) → tensor.
        args: positional arguments (a tuple, or one argument).
        kwargs: keyword arguments.
        aliases: :func:`alias_names` of ``module``, if already known (computed otherwise).
    """
    aliases = alias_names(module) if aliases is None else aliases
    return functional_call(module, with_aliases(state, aliases), args, dict(kwargs or {}), tie_weights=False)
