"""Shared parameters through every functional_call path: a module reachable under two names and
a weight tied into two modules. The Fisher (vmap and loop) equals a brute-force loop, AdaptiveMerge
substitutes every use, and the model comes back intact."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tmerge.fisher import empirical_fisher
from tmerge.merge import AdaptiveMerge
from tmerge.stateless import alias_names, stateless_call


class Aliased(nn.Module):
    """``enc`` is also ``path.0`` (one module, two names, as DynUNet's skip layers); ``dec2.weight``
    is ``dec.weight`` (one parameter in two modules, as weight tying)."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Conv3d(1, 3, 3, padding=1)
        self.path = nn.ModuleList([self.enc])
        self.dec = nn.Conv3d(3, 3, 3, padding=1)
        self.dec2 = nn.Conv3d(3, 3, 3, padding=1)
        self.dec2.weight = self.dec.weight
        self.head = nn.Conv3d(3, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.path[0](x))
        h = torch.tanh(self.dec(h))
        return self.head(torch.tanh(self.dec2(h)) + h)


def data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(4, 1, 6, 6, 6, generator=g), torch.randint(0, 2, (4, 6, 6, 6), generator=g)


def brute_force(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """Plain .backward() per sample on the real module: shared parameters sum their uses' gradients."""
    acc = {n: torch.zeros_like(p) for n, p in net.named_parameters()}
    for i in range(len(x)):
        net.zero_grad()
        F.cross_entropy(net(x[i : i + 1]), y[i : i + 1]).backward()
        for n, p in net.named_parameters():
            acc[n] += p.grad**2
    net.zero_grad()
    return {n: a / len(x) for n, a in acc.items()}


def test_alias_names_lists_other_slots_only() -> None:
    net = Aliased()
    # path.0.* is the same slot as enc.* (one module); dec2.weight is another slot of dec.weight.
    assert alias_names(net) == {"dec.weight": ["dec2.weight"]}


@pytest.mark.parametrize("method", ["vmap", "loop"])
def test_fisher_of_shared_parameters_equals_brute_force_and_leaves_the_model_intact(method: str) -> None:
    torch.manual_seed(0)
    net = Aliased().eval()
    before = {n: p.detach().clone() for n, p in net.named_parameters(remove_duplicate=False)}
    x, y = data()
    fisher = empirical_fisher(net, [(x, y)], F.cross_entropy, method=method)
    # Intact: real tensors with storage, the same values, still shared.
    for n, p in net.named_parameters(remove_duplicate=False):
        assert p.data_ptr() and torch.equal(p.detach(), before[n]), n
    assert net.dec2.weight is net.dec.weight and net.path[0] is net.enc
    reference = brute_force(net, x, y)
    assert list(fisher) == list(reference)
    for n, ref in reference.items():
        torch.testing.assert_close(fisher[n], ref, rtol=1e-4, atol=1e-12 * float(ref.abs().max()))
        assert float(ref.abs().sum()) > 0, n


def test_adaptive_merge_substitutes_every_use_of_a_shared_parameter() -> None:
    torch.manual_seed(0)
    net = Aliased()
    layers = {"enc": ["enc.weight", "enc.bias"], "dec": ["dec.weight", "dec.bias"]}
    sources = [{k: torch.randn_like(v) for k, v in net.state_dict().items()} for _ in range(2)]
    adaptive = AdaptiveMerge(net, sources, None, layers)
    adaptive.mixing.delta.data = torch.tensor([[1.0, -0.5], [0.0, 2.0]])
    x, _ = data()
    out = adaptive(x)
    # The same network with the merged weights loaded: the tied dec2.weight follows dec.weight.
    plain = Aliased()
    plain.load_state_dict(adaptive.materialize())
    assert plain.dec2.weight is plain.dec.weight
    torch.testing.assert_close(out, plain(x))
    out.square().mean().backward()
    assert adaptive.mixing.delta.grad is not None and bool((adaptive.mixing.delta.grad != 0).all())
    assert net.dec2.weight is net.dec.weight and net.dec.weight.data_ptr()


def test_stateless_call_restores_the_module() -> None:
    net = Aliased()
    x, _ = data()
    zeros = {n: torch.zeros_like(p) for n, p in net.named_parameters()}
    assert torch.equal(stateless_call(net, zeros, (x,)), torch.zeros(4, 2, 6, 6, 6))
    assert not torch.equal(net(x), torch.zeros(4, 2, 6, 6, 6))  # its own weights are back
