"""Isensee2017: the paper's layer counts, shapes, other depths/widths, input checks, init."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tmerge.nets import Isensee2017, init_weights


def _count(net: nn.Module, kind: type[nn.Module]) -> int:
    return sum(isinstance(m, kind) for m in net.modules())


def test_paper_counts_at_depth_5() -> None:
    net = Isensee2017(in_channels=4, n_classes=3)
    assert _count(net, nn.Conv3d) == 30
    assert _count(net, nn.InstanceNorm3d) == 27
    assert len(net.seg_heads) == 3
    assert all(m.affine for m in net.modules() if isinstance(m, nn.InstanceNorm3d))
    # The paper's widths: 16 … 256.
    assert [lvl.conv.conv.out_channels for lvl in net.encoder] == [16, 32, 64, 128, 256]


def test_output_shape_and_logits() -> None:
    net = Isensee2017(in_channels=2, n_classes=5, base_filters=2).eval()
    x = torch.randn(2, 2, 32, 32, 32)
    with torch.no_grad():
        y = net(x)
    assert y.shape == (2, 5, 32, 32, 32)
    assert y.dtype == torch.float32 and torch.isfinite(y).all()


@pytest.mark.parametrize(
    ("depth", "base", "size", "heads"), [(3, 8, 8, 2), (4, 6, 16, 3), (6, 2, 32, 3), (2, 4, 4, 1)]
)
def test_other_depths_and_widths(depth: int, base: int, size: int, heads: int) -> None:
    net = Isensee2017(in_channels=1, n_classes=2, base_filters=base, depth=depth, upsample_mode="trilinear")
    assert len(net.seg_heads) == heads
    assert _count(net, nn.Conv3d) == 3 * depth + 3 * (depth - 1) + heads
    assert _count(net, nn.InstanceNorm3d) == 6 * depth - 3
    y = net(torch.randn(1, 1, size, size, 2 * size))
    assert y.shape == (1, 2, size, size, 2 * size)
    y.sum().backward()
    assert all(p.grad is not None for p in net.parameters())


def test_head_prefix_and_output_depends_on_every_head() -> None:
    assert Isensee2017.head_prefixes == ("seg_heads",)
    net = Isensee2017(in_channels=1, n_classes=2, base_filters=4, depth=4).eval()
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        base = net(x)
        for head in net.seg_heads:
            head.bias.add_(1.0)  # deep supervision: every head's output reaches the logits
            assert not torch.allclose(net(x), base)
            head.bias.sub_(1.0)


def test_dropout_only_in_training() -> None:
    net = Isensee2017(in_channels=1, n_classes=2, base_filters=4, depth=3, dropout=0.5)
    x = torch.randn(1, 1, 8, 8, 8)
    net.eval()
    with torch.no_grad():
        assert torch.equal(net(x), net(x))
    net.train()
    with torch.no_grad():
        assert not torch.equal(net(x), net(x))


def test_bad_input_shapes_raise_naming_the_shape() -> None:
    net = Isensee2017(in_channels=2, n_classes=2, base_filters=2, depth=3)
    with pytest.raises(ValueError, match=r"divisible by 4.*\(1, 2, 8, 8, 6\)"):
        net(torch.zeros(1, 2, 8, 8, 6))
    with pytest.raises(ValueError, match=r"in_channels=2.*\(1, 3, 8, 8, 8\)"):
        net(torch.zeros(1, 3, 8, 8, 8))
    with pytest.raises(ValueError, match=r"\(2, 8, 8, 8\)"):
        net(torch.zeros(2, 8, 8, 8))
    with pytest.raises(ValueError, match=r"above 4.*\(1, 2, 4, 4, 4\)"):
        net(torch.zeros(1, 2, 4, 4, 4))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"depth": 1}, "depth"),
        ({"base_filters": 0}, "base_filters"),
        ({"dropout": 1.0}, "dropout"),
        ({"upsample_mode": "cubic"}, "upsample_mode"),
    ],
)
def test_bad_config_raises(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Isensee2017(in_channels=1, n_classes=2, **kwargs)


def test_init_weights_reinitialises_a_part() -> None:
    torch.manual_seed(0)
    net = Isensee2017(in_channels=1, n_classes=2, base_filters=8, depth=3)
    conv = net.encoder[1].context.block1.conv
    fan_in = conv.weight[0].numel()
    # Kaiming normal for LeakyReLU(0.01): std = sqrt(2 / (1 + a²) / fan_in).
    expected = (2.0 / (1 + 0.01**2) / fan_in) ** 0.5
    assert conv.weight.std().item() == pytest.approx(expected, rel=0.1)
    assert all(torch.equal(h.bias, torch.zeros_like(h.bias)) for h in net.seg_heads)

    with torch.no_grad():
        for p in net.seg_heads.parameters():
            p.fill_(3.0)
        norm = net.encoder[0].conv.norm
        norm.weight.fill_(5.0)
        norm.bias.fill_(5.0)
    other = net.encoder[0].conv.conv.weight.clone()
    init_weights(net.seg_heads)
    init_weights(norm)
    assert all(torch.equal(h.bias, torch.zeros_like(h.bias)) for h in net.seg_heads)
    assert not torch.equal(net.seg_heads[0].weight, torch.full_like(net.seg_heads[0].weight, 3.0))
    assert torch.equal(norm.weight, torch.ones_like(norm.weight)) and torch.equal(
        norm.bias, torch.zeros_like(norm.bias)
    )
    assert torch.equal(net.encoder[0].conv.conv.weight, other)  # untouched outside the given part
