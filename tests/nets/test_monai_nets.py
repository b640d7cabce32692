"""MONAI's networks (DynUNet, SegResNet, UNet): the declared P/S split, aliasing, state dicts, the
Fisher and the adaptive merge on the aliased DynUNet."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _NormBase
from torch.nn.modules.conv import _ConvNd

from tmerge.fisher import empirical_fisher
from tmerge.io import write_safetensors
from tmerge.merge import AdaptiveMerge
from tmerge.nets import DynUNet, SegResNet, UNet, head_names, layer_groups, partition
from tmerge.nets.config import NetConfig

NORMS = (_NormBase, nn.GroupNorm)

#: (net.name, the heads it declares, P tensors / layers and S tensors at the default sizes).
DEFAULTS = [
    ("dynunet", ("output_block",), 22, 22, 38),
    ("segresnet", ("conv_final",), 31, 31, 52),
    ("unet", ("model.2",), 42, 21, 38),
]


def _under(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def check_split(net: nn.Module, heads: tuple[str, ...]) -> tuple[list[str], list[str]]:
    """The split is the declared one, derived here from the module types: every parameter of a
    norm or of a module under a head is in S, every convolution outside the heads is in P, the
    two are disjoint and together every parameter, once."""
    fused, specific = partition(net)
    names = [n for n, _ in net.named_parameters()]
    assert len(names) == len(set(names))
    assert not set(fused) & set(specific)
    assert sorted(fused + specific) == sorted(names)
    for module_name, module in net.named_modules():
        own = [f"{module_name}.{p}" for p, _ in module.named_parameters(recurse=False)]
        if isinstance(module, NORMS) or _under(module_name, heads):
            assert set(own) <= set(specific), module_name
        elif isinstance(module, _ConvNd):
            assert set(own) <= set(fused), module_name
    # Nothing but convolutions in P; nothing in S but norms and heads.
    modules = dict(net.named_modules())
    for name in fused:
        owner = name.rpartition(".")[0]
        assert isinstance(modules[owner], _ConvNd) and not _under(owner, heads), name
    for name in specific:
        owner = name.rpartition(".")[0]
        assert isinstance(modules[owner], NORMS) or _under(owner, heads), name
    # Each head is in S entirely, with at least one convolution; head_names lists exactly them.
    for head in heads:
        head_params = [n for n in names if _under(n.rpartition(".")[0], (head,))]
        assert head_params and set(head_params) <= set(specific)
    assert set(head_names(net, specific)) == {n for n in names if _under(n.rpartition(".")[0], heads)}
    # One layer per fused convolution; every fused parameter in one group, in order.
    groups = layer_groups(net, fused)
    assert [n for g in groups.values() for n in g] == fused
    assert all(isinstance(modules[k], _ConvNd) for k in groups)
    return fused, specific


@pytest.mark.parametrize(("name", "heads", "n_fused", "n_layers", "n_specific"), DEFAULTS)
def test_declared_split_at_default_sizes(name, heads, n_fused, n_layers, n_specific) -> None:
    net = NetConfig(name=name).build(4, 3)
    assert tuple(net.head_prefixes) == heads
    fused, specific = check_split(net, heads)
    assert (len(fused), len(layer_groups(net, fused)), len(specific)) == (n_fused, n_layers, n_specific)


@pytest.mark.parametrize(
    "net",
    [
        DynUNet(2, 5, filters=[4, 8, 16], strides=[2, 2], res_block=True),
        DynUNet(2, 5, filters=[4, 8, 16, 32], strides=[2, 2, 2], deep_supervision=True, deep_supr_num=2),
        SegResNet(2, 5, init_filters=8, blocks_down=[1, 1, 1], blocks_up=[1, 1]),
        UNet(2, 5, filters=[4, 8, 16], strides=[2, 2], res_units=0),
        UNet(2, 5, filters=[4, 8, 16], strides=[2, 1], kernel_size=5, res_units=1),
    ],
    ids=["dynunet-res", "dynunet-deep-supervision", "segresnet-small", "unet-plain", "unet-k5"],
)
def test_declared_split_at_other_sizes(net) -> None:
    check_split(net, tuple(net.head_prefixes))


def test_dynunet_deep_supervision_heads_are_specific() -> None:
    net = DynUNet(2, 5, filters=[4, 8, 16, 32], strides=[2, 2, 2], deep_supervision=True, deep_supr_num=2)
    _, specific = partition(net)
    heads = {n for n, _ in net.named_parameters() if n.startswith("deep_supervision_heads.")}
    assert len(heads) == 4 and heads <= set(specific)
    assert heads <= set(head_names(net, specific))


def test_dynunet_aliases_are_listed_once() -> None:
    """The encoder blocks are also reachable under skip_layers: partition, layer_groups and the
    state dict give each parameter once, under its first name."""
    net = DynUNet(2, 3, filters=[4, 8, 16], strides=[2, 2])
    assert net.skip_layers.downsample is net.input_block  # the alias exists
    every = [n for n, _ in net.named_parameters(remove_duplicate=False)]
    assert any(n.startswith("skip_layers.") for n in every)
    fused, specific = partition(net)
    assert not any(n.startswith("skip_layers.") for n in fused + specific)
    assert len(fused) + len(specific) == len(set(map(id, net.parameters())))
    assert not any(k.startswith("skip_layers.") for k in layer_groups(net, fused))
    assert list(net.state_dict()) == [n for n, _ in net.named_parameters()]  # no buffers here


def test_dynunet_state_dict_round_trips_with_and_without_aliases(tmp_path) -> None:
    from monai.networks.nets import DynUNet as MonaiDynUNet

    torch.manual_seed(0)
    monai_net = MonaiDynUNet(
        3, 2, 3, [3, 3, 3], [1, 2, 2], [2, 2], filters=[4, 8, 16], norm_name=("INSTANCE", {"affine": True})
    )
    net = DynUNet(2, 3, filters=[4, 8, 16], strides=[2, 2])
    net.load_state_dict(monai_net.state_dict())  # MONAI's state dict, skip_layers keys included
    x = torch.randn(1, 2, 16, 16, 16)
    with torch.no_grad():
        assert torch.allclose(net.eval()(x), monai_net.eval()(x))
    path = write_safetensors(tmp_path / "net.safetensors", net.state_dict())  # shared tensors refused
    from safetensors.torch import load_file

    again = DynUNet(2, 3, filters=[4, 8, 16], strides=[2, 2])
    again.load_state_dict(load_file(str(path)))
    assert again.skip_layers.downsample is again.input_block
    with torch.no_grad():
        assert torch.equal(again.eval()(x), net(x))
    wrapper = nn.ModuleDict({"net": net})  # a prefix, as in the LightningModule
    assert not any(".skip_layers." in k for k in wrapper.state_dict())
    nn.ModuleDict({"net": DynUNet(2, 3, filters=[4, 8, 16], strides=[2, 2])}).load_state_dict(
        wrapper.state_dict()
    )
    with pytest.raises(RuntimeError, match="Missing key"):
        DynUNet(2, 3, filters=[4, 8, 16], strides=[2, 2]).load_state_dict(
            dict(list(net.state_dict().items())[1:])
        )


@pytest.mark.parametrize("name", ["dynunet", "segresnet", "unet"])
def test_forward_shape_and_divisor(name) -> None:
    cfg = NetConfig(name=name, filters=[4, 8, 16], strides=[2, 2], blocks_down=[1, 1, 1], blocks_up=[1, 1])
    net = cfg.build(2, 5).eval()
    assert net.divisor == 4
    with torch.no_grad():
        y = net(torch.randn(2, 2, 16, 16, 16))
    assert y.shape == (2, 5, 16, 16, 16) and torch.isfinite(y).all()


@pytest.mark.parametrize(
    ("cls", "kwargs", "match"),
    [
        (DynUNet, {"filters": [4]}, "filters"),
        (DynUNet, {"filters": [4, 8], "strides": [2, 2]}, "strides"),
        (DynUNet, {"kernel_size": 2}, "kernel_size"),
        (SegResNet, {"init_filters": 4}, "init_filters"),
        (SegResNet, {"blocks_up": [1]}, "blocks_up"),
        (UNet, {"res_units": -1}, "res_units"),
        (UNet, {"dropout": 1.0}, "dropout"),
        (UNet, {"n_classes": 0}, "n_classes"),
    ],
)
def test_bad_sizes_are_value_errors(cls, kwargs, match) -> None:
    args = {"in_channels": 2, "n_classes": 3, **kwargs}
    with pytest.raises(ValueError, match=match):
        cls(**args)


def _loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out, y)


def test_fisher_loop_and_vmap_agree_on_dynunet() -> None:
    """The vmap path substitutes every name of the aliased encoder blocks (tmerge.stateless)."""
    torch.manual_seed(0)
    net = DynUNet(2, 3, filters=[4, 8, 16], strides=[2, 2])
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(2, 2, 8, 8, 8, generator=g), torch.randint(0, 3, (2, 8, 8, 8), generator=g))]
    fused, _ = partition(net)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    loop = empirical_fisher(net, batches, _loss, names=fused, method="loop")
    vmap = empirical_fisher(net, batches, _loss, names=fused, method="vmap")
    assert set(loop) == set(vmap) == set(fused)
    for n in fused:
        assert torch.allclose(loop[n], vmap[n], rtol=1e-3, atol=1e-5 * float(loop[n].max())), n
        assert loop[n].abs().sum() > 0, n
    # The model comes back as it was: same tensors, still aliased.
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert net.skip_layers.downsample is net.input_block


def test_adaptive_merge_runs_on_dynunet() -> None:
    """Eq. 2 in the forward of the aliased DynUNet: the gradient reaches δ through the aliases."""
    torch.manual_seed(0)
    sources = [DynUNet(2, 3, filters=[4, 8, 16], strides=[2, 2]).state_dict() for _ in range(2)]
    net = DynUNet(2, 3, filters=[4, 8, 16], strides=[2, 2])
    fused, _ = partition(net)
    layers = layer_groups(net, fused)
    fishers = [{n: torch.ones_like(sd[n]) for n in fused} for sd in sources]
    merged = AdaptiveMerge(net, sources, fishers, layers)
    out = merged(torch.randn(1, 2, 8, 8, 8))
    out.sum().backward()
    grads = [p.grad for n, p in merged.named_parameters() if n.startswith("mixing.")]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)
