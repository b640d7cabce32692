"""LayerwiseMixing: the σ-reparametrisation of the mixing ratios α."""

from __future__ import annotations

import pytest
import torch

from tmerge.merge import LayerwiseMixing, mixing_ratios


def test_zero_delta_is_uniform_imm() -> None:
    mix = LayerwiseMixing(3, ["conv1", "conv2"])
    alpha = mix()
    assert mix.delta.shape == (3, 2) and torch.all(mix.delta == 0)
    torch.testing.assert_close(alpha, torch.full((3, 2), 1 / 3))
    assert mix.layer_names == ["conv1", "conv2"]


@pytest.mark.parametrize("n_models", [2, 3, 5])
def test_random_delta_gives_valid_ratios(n_models: int) -> None:
    mix = LayerwiseMixing(n_models, 7)
    with torch.no_grad():
        mix.delta.copy_(torch.randn(n_models, 7, generator=torch.Generator().manual_seed(0)) * 20)
    alpha = mix()
    assert alpha.shape == (n_models, 7)
    assert torch.all(alpha >= 0)
    torch.testing.assert_close(alpha.sum(0), torch.ones(7))


def test_formula_by_hand() -> None:
    delta = torch.tensor([[0.0, 2.0], [1.0, -1.0]])
    s = 1 / (1 + torch.exp(-delta))
    expected = torch.stack([s[0] / (s[0] + s[1]), s[1] / (s[0] + s[1])])
    torch.testing.assert_close(mixing_ratios(delta), expected)


def test_gradient_reaches_delta() -> None:
    mix = LayerwiseMixing(2, 3)
    target = torch.tensor([[1.0, 0.0, 0.3], [0.0, 1.0, 0.7]])
    (mix() - target).square().sum().backward()
    assert mix.delta.grad is not None and torch.all(mix.delta.grad[:, :2] != 0)


def test_alphas_dict_and_names() -> None:
    mix = LayerwiseMixing(2, 2)
    assert mix.layer_names == ["0", "1"]
    d = mix.alphas_dict()
    assert d == {"0": [0.5, 0.5], "1": [0.5, 0.5]}
    assert all(isinstance(v, float) for vs in d.values() for v in vs)


@pytest.mark.parametrize(
    ("n_models", "layers", "error", "pattern"),
    [
        (1, 3, ValueError, "n_models.*got 1"),
        (2.0, 3, TypeError, "n_models.*got 2.0"),
        (True, 3, TypeError, "n_models.*got True"),
        (2, 0, ValueError, "≥ 1"),
        (2, [], ValueError, "empty"),
        (2, ["a", "a"], ValueError, "duplicate"),
        (2, "conv", TypeError, "string"),
    ],
)
def test_invalid_construction(n_models: int, layers: object, error: type[Exception], pattern: str) -> None:
    with pytest.raises(error, match=pattern):
        LayerwiseMixing(n_models, layers)  # type: ignore[arg-type]
