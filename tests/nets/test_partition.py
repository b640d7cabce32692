"""partition / layer_groups: the fused set P and the task-specific set S."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tmerge.nets import Isensee2017, head_names, layer_groups, partition


def test_isensee_partition_depth_5() -> None:
    net = Isensee2017(in_channels=4, n_classes=3, base_filters=4)
    fused, specific = partition(net)
    names = [n for n, _ in net.named_parameters()]
    # Disjoint, complete, in named_parameters() order.
    assert sorted(fused + specific) == sorted(names)
    assert fused == [n for n in names if n in set(fused)]
    assert specific == [n for n in names if n in set(specific)]
    # S = 27 norms × (weight, bias) + 3 heads × (weight, bias).
    assert len(specific) == 27 * 2 + 3 * 2
    assert all(n.startswith("seg_heads.") or ".norm." in n for n in specific)
    assert not any(n.startswith("seg_heads.") or ".norm." in n for n in fused)

    groups = layer_groups(net, fused)
    assert len(groups) == 27
    assert list(groups)[0] == "encoder.0.conv.conv"
    assert groups["encoder.0.conv.conv"] == ["encoder.0.conv.conv.weight"]
    modules = dict(net.named_modules())
    assert all(isinstance(modules[k], nn.Conv3d) for k in groups)
    assert [n for g in groups.values() for n in g] == fused


def test_other_depth_counts() -> None:
    net = Isensee2017(in_channels=1, n_classes=2, base_filters=2, depth=3)
    fused, specific = partition(net)
    assert len(layer_groups(net, fused)) == 6 * 3 - 3
    assert sum(n.startswith("seg_heads.") for n in specific) == 2 * 2


class _Generic(nn.Module):
    """A module with no head_prefixes: BatchNorm, GroupNorm, LayerNorm, a nested head, a bare parameter."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1))
        self.body = nn.Sequential(
            nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.GroupNorm(2, 4), nn.Linear(4, 4), nn.LayerNorm(4)
        )
        self.out = nn.ModuleDict({"cls": nn.Linear(4, 2)})


def test_generic_module() -> None:
    model = _Generic()
    fused, specific = partition(model)
    assert fused == [
        "scale",
        "body.0.weight",
        "body.0.bias",
        "body.3.weight",
        "body.3.bias",
        "out.cls.weight",
        "out.cls.bias",
    ]
    assert specific == [
        "body.1.weight",
        "body.1.bias",
        "body.2.weight",
        "body.2.bias",
        "body.4.weight",
        "body.4.bias",
    ]

    fused, specific = partition(model, head_prefixes=["out"])
    assert "out.cls.weight" in specific and "out.cls.bias" in specific
    assert partition(model, head_prefixes="out.cls") == partition(model, head_prefixes=["out"])

    groups = layer_groups(model, fused)
    assert groups == {
        "": ["scale"],
        "body.0": ["body.0.weight", "body.0.bias"],
        "body.3": ["body.3.weight", "body.3.bias"],
    }


def test_prefix_is_a_module_boundary_not_a_string_prefix() -> None:
    model = nn.ModuleDict({"head": nn.Linear(2, 2), "headless": nn.Linear(2, 2)})
    fused, specific = partition(model, head_prefixes=["head"])
    assert specific == ["head.weight", "head.bias"]
    assert fused == ["headless.weight", "headless.bias"]


def test_head_names_stop_at_a_module_boundary() -> None:
    class Net(nn.Module):
        head_prefixes = ("head",)

        def __init__(self) -> None:
            super().__init__()
            self.head = nn.Linear(2, 2)
            self.head2 = nn.LayerNorm(2)  # in S as a norm, but not a head

    net = Net()
    _, specific = partition(net)
    assert specific == ["head.weight", "head.bias", "head2.weight", "head2.bias"]
    assert head_names(net, specific) == ["head.weight", "head.bias"]


def test_errors_name_the_culprit() -> None:
    net = Isensee2017(in_channels=1, n_classes=2, base_filters=2, depth=3)
    with pytest.raises(ValueError, match="'seg_head'"):
        partition(net, head_prefixes=["seg_head"])
    with pytest.raises(ValueError, match="nope.weight"):
        layer_groups(net, ["encoder.0.conv.conv.weight", "nope.weight"])
