"""Eq. 2 (IMM merge) against direct computations, its corner cases and its error messages."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from tmerge.merge import fisher_weights, imm_merge, merge_tensor


def _models(n_models: int = 2, seed: int = 0) -> tuple[list[dict[str, Tensor]], list[dict[str, Tensor]]]:
    """T small state dicts and strictly positive Fishers (well above eps)."""
    g = torch.Generator().manual_seed(seed)
    sds, fs = [], []
    for _ in range(n_models):
        sds.append(
            {
                "a.weight": torch.randn(3, 4, generator=g),
                "a.bias": torch.randn(3, generator=g),
                "b.weight": torch.randn(2, 2, 2, generator=g),
            }
        )
        fs.append({k: 0.5 + 2 * torch.rand(v.shape, generator=g) for k, v in sds[-1].items()})
    return sds, fs


LAYERS = {"a": ["a.weight", "a.bias"], "b": ["b.weight"]}


# ---------------------------------------------------------------------------------------------- eq. 2


def test_scalar_by_hand() -> None:
    # θ = (½·1·1 + ½·3·3) / (½·1 + ½·3) = 5 / 2
    out = merge_tensor(torch.tensor([1.0, 3.0]), torch.tensor([1.0, 3.0]), torch.tensor([0.5, 0.5]))
    assert out.shape == ()
    assert out.item() == pytest.approx(2.5, rel=1e-7)
    # α = (¼, ¾): (¼·1 + ¾·9) / (¼ + ¾·3) = 7 / 2.5
    out = merge_tensor(torch.tensor([1.0, 3.0]), torch.tensor([1.0, 3.0]), torch.tensor([0.25, 0.75]))
    assert out.item() == pytest.approx(2.8, rel=1e-6)


def test_eps_is_added_to_every_fisher() -> None:
    # With a visible eps the weights are F + eps: (½·1.5·1 + ½·3.5·3) / (½·1.5 + ½·3.5) = 6 / 2.5
    out = merge_tensor(torch.tensor([1.0, 3.0]), torch.tensor([1.0, 3.0]), torch.tensor([0.5, 0.5]), eps=0.5)
    assert out.item() == pytest.approx(2.4, rel=1e-6)
    assert torch.equal(fisher_weights(torch.tensor([0.0, 2.0]), 0.5), torch.tensor([0.5, 2.5]))


def test_eq2_against_direct_computation() -> None:
    sds, fs = _models(2)
    alpha = torch.tensor([0.3, 0.7])
    out = imm_merge(sds, fs, alpha)
    assert set(out) == set(sds[0])
    for k in sds[0]:
        num = 0.3 * fs[0][k] * sds[0][k] + 0.7 * fs[1][k] * sds[1][k]
        den = 0.3 * fs[0][k] + 0.7 * fs[1][k]
        torch.testing.assert_close(out[k], num / den, rtol=1e-6, atol=1e-6)
        assert out[k].shape == sds[0][k].shape


def test_three_models() -> None:
    sds, fs = _models(3, seed=1)
    alpha = torch.tensor([0.2, 0.5, 0.3])
    out = imm_merge(sds, fs, alpha)
    for k in sds[0]:
        num = sum(a * f[k] * s[k] for a, f, s in zip(alpha.tolist(), fs, sds, strict=True))
        den = sum(a * f[k] for a, f in zip(alpha.tolist(), fs, strict=True))
        torch.testing.assert_close(out[k], num / den, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("n_models", [2, 3])
def test_one_hot_returns_chosen_model(n_models: int) -> None:
    sds, fs = _models(n_models, seed=2)
    for t in range(n_models):
        alpha = torch.zeros(n_models)
        alpha[t] = 1.0
        out = imm_merge(sds, fs, alpha)
        for k in sds[t]:
            torch.testing.assert_close(out[k], sds[t][k], rtol=1e-6, atol=0.0)


def test_one_hot_with_zero_fisher_returns_chosen_model() -> None:
    sds, fs = _models(2, seed=3)
    # Model 0's Fisher is exactly zero on part of a.weight and everywhere on b.weight.
    fs[0]["a.weight"][0] = 0.0
    fs[0]["b.weight"].zero_()
    out = imm_merge(sds, fs, torch.tensor([1.0, 0.0]))
    for k in sds[0]:
        torch.testing.assert_close(out[k], sds[0][k], rtol=1e-6, atol=0.0)
    # Where every Fisher is zero the merge falls back to the α-weighted mean.
    fs[1]["b.weight"].zero_()
    out = imm_merge(sds, fs, torch.tensor([0.25, 0.75]))
    torch.testing.assert_close(out["b.weight"], 0.25 * sds[0]["b.weight"] + 0.75 * sds[1]["b.weight"])


def test_uniform_alpha_is_fisher_weighted_mean() -> None:
    sds, fs = _models(3, seed=4)
    out = imm_merge(sds, fs, torch.full((3,), 1 / 3))
    for k in sds[0]:
        expected = sum(f[k] * s[k] for f, s in zip(fs, sds, strict=True)) / sum(f[k] for f in fs)
        torch.testing.assert_close(out[k], expected, rtol=1e-6, atol=1e-6)


def test_equal_fishers_give_alpha_weighted_mean() -> None:
    sds, fs = _models(2, seed=5)
    same = [fs[0], {k: v.clone() for k, v in fs[0].items()}]
    out = imm_merge(sds, same, torch.tensor([0.1, 0.9]))
    for k in sds[0]:
        torch.testing.assert_close(out[k], 0.1 * sds[0][k] + 0.9 * sds[1][k], rtol=1e-6, atol=1e-6)


def test_mean_imm_without_fishers() -> None:
    sds, _ = _models(3, seed=6)
    alpha = torch.tensor([0.6, 0.3, 0.1])
    out = imm_merge(sds, None, alpha)
    for k in sds[0]:
        torch.testing.assert_close(
            out[k], 0.6 * sds[0][k] + 0.3 * sds[1][k] + 0.1 * sds[2][k], rtol=1e-6, atol=1e-6
        )


def test_fisher_floor_raises_small_entries() -> None:
    f = torch.tensor([[0.0, 4.0], [1.0, 1.0]])  # model 0: mean 2 → floor 0.5·2 = 1
    torch.testing.assert_close(
        fisher_weights(f, 0.0, fisher_floor=0.5), torch.tensor([[1.0, 4.0], [1.0, 1.0]])
    )


# ------------------------------------------------------------------------------------- per-layer α


def test_layer_mapping_and_matrix_forms_agree() -> None:
    sds, fs = _models(2, seed=7)
    a_map = {"a": torch.tensor([0.2, 0.8]), "b": torch.tensor([0.9, 0.1])}
    a_mat = torch.tensor([[0.2, 0.9], [0.8, 0.1]])  # columns in LAYERS order
    out_map = imm_merge(sds, fs, a_map, layers=LAYERS)
    out_mat = imm_merge(sds, fs, a_mat, layers=LAYERS)
    assert set(out_map) == set(out_mat) == {"a.weight", "a.bias", "b.weight"}
    for k in out_map:
        torch.testing.assert_close(out_map[k], out_mat[k], rtol=0, atol=0)
    # Each layer used its own ratio.
    single_a = imm_merge(sds, fs, torch.tensor([0.2, 0.8]))
    single_b = imm_merge(sds, fs, torch.tensor([0.9, 0.1]))
    torch.testing.assert_close(out_map["a.weight"], single_a["a.weight"])
    torch.testing.assert_close(out_map["b.weight"], single_b["b.weight"])


def test_names_select_what_is_merged() -> None:
    sds, fs = _models(2, seed=8)
    out = imm_merge(sds, fs, torch.tensor([0.5, 0.5]), layers={"a": ["a.weight", "a.bias"]})
    assert set(out) == {"a.weight", "a.bias"}
    out = imm_merge(sds, fs, torch.tensor([0.5, 0.5]), names=["b.weight"])
    assert set(out) == {"b.weight"}


def test_non_floating_entries_copied_from_first_model() -> None:
    sds, _ = _models(2, seed=9)
    sds[0]["bn.num_batches_tracked"] = torch.tensor(7)
    sds[1]["bn.num_batches_tracked"] = torch.tensor(9)
    out = imm_merge(sds, None, torch.tensor([0.5, 0.5]))
    assert out["bn.num_batches_tracked"].item() == 7


def test_differentiable_in_alphas_and_inputs_untouched() -> None:
    sds, fs = _models(2, seed=10)
    before = [{k: v.clone() for k, v in sd.items()} for sd in sds]
    a = torch.tensor([[0.3, 0.6], [0.7, 0.4]], requires_grad=True)
    out = imm_merge(sds, fs, a, layers=LAYERS)
    sum(v.square().sum() for v in out.values()).backward()
    assert a.grad is not None and torch.all(a.grad != 0)
    for sd, ref in zip(sds, before, strict=True):
        for k in sd:
            assert torch.equal(sd[k], ref[k])


# ------------------------------------------------------------------------------------------ errors


def test_needs_two_models() -> None:
    sds, fs = _models(2)
    with pytest.raises(ValueError, match="at least 2 models"):
        imm_merge(sds[:1], fs[:1], torch.tensor([1.0]))


def test_missing_keys_name_model_and_names() -> None:
    sds, fs = _models(2)
    del sds[1]["a.bias"]
    with pytest.raises(ValueError, match=r"state_dicts\[1\] lacks .*'a\.bias'"):
        imm_merge(sds, fs, torch.tensor([0.5, 0.5]))
    sds, fs = _models(2)
    sds[1]["extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"state_dicts\[1\] has names .*'extra\.weight'"):
        imm_merge(sds, fs, torch.tensor([0.5, 0.5]))


def test_shape_mismatch_names_parameter_and_shapes() -> None:
    sds, fs = _models(2)
    sds[1]["a.weight"] = torch.zeros(3, 5)
    with pytest.raises(ValueError, match=r"'a\.weight'.*\(3, 5\).*state_dicts\[1\].*\(3, 4\)"):
        imm_merge(sds, None, torch.tensor([0.5, 0.5]))


def test_fisher_errors() -> None:
    sds, fs = _models(2)
    del fs[0]["b.weight"]
    with pytest.raises(ValueError, match=r"fishers\[0\] lacks .*'b\.weight'"):
        imm_merge(sds, fs, torch.tensor([0.5, 0.5]))
    sds, fs = _models(2)
    fs[1]["a.bias"] = torch.ones(4)
    with pytest.raises(ValueError, match=r"fishers\[1\]\['a\.bias'\] has shape \(4,\), expected .*\(3,\)"):
        imm_merge(sds, fs, torch.tensor([0.5, 0.5]))
    sds, fs = _models(2)
    fs[1]["a.bias"][0] = -1.0
    with pytest.raises(ValueError, match="negative"):
        imm_merge(sds, fs, torch.tensor([0.5, 0.5]))
    with pytest.raises(ValueError, match="one Fisher per model"):
        imm_merge(sds, fs[:1], torch.tensor([0.5, 0.5]))


@pytest.mark.parametrize(
    ("alphas", "pattern"),
    [
        (torch.tensor([0.5, 0.3, 0.2]), r"expected shape \(2,\)"),
        (torch.tensor([1.2, -0.2]), "≥ 0"),
        (torch.tensor([0.5, 0.6]), "sum to 1"),
        (torch.tensor([float("nan"), 0.5]), "NaN"),
        (torch.ones(2, 2, 2), "expected shape"),
    ],
)
def test_bad_alphas(alphas: Tensor, pattern: str) -> None:
    sds, fs = _models(2)
    with pytest.raises(ValueError, match=pattern):
        imm_merge(sds, fs, alphas)


def test_bad_layer_alphas() -> None:
    sds, fs = _models(2)
    with pytest.raises(ValueError, match="`layers`"):
        imm_merge(sds, fs, {"a": torch.tensor([0.5, 0.5])})
    with pytest.raises(ValueError, match="`layers`"):
        imm_merge(sds, fs, torch.full((2, 2), 0.5))
    with pytest.raises(ValueError, match=r"expected shape \(2, 2\)"):
        imm_merge(sds, fs, torch.full((2, 3), 0.5), layers=LAYERS)
    with pytest.raises(ValueError, match="no mixing ratios for layer 'b'"):
        imm_merge(sds, fs, {"a": torch.tensor([0.5, 0.5])}, layers=LAYERS)
    with pytest.raises(ValueError, match="not in `layers`.*'c'"):
        imm_merge(
            sds,
            fs,
            {"a": torch.tensor([0.5, 0.5]), "b": torch.tensor([0.5, 0.5]), "c": torch.tensor([1.0, 0.0])},
            layers=LAYERS,
        )
    with pytest.raises(ValueError, match="layer 'b'.*sum to 1"):
        imm_merge(sds, fs, {"a": torch.tensor([0.5, 0.5]), "b": torch.tensor([0.5, 0.4])}, layers=LAYERS)
    with pytest.raises(ValueError, match="two layers"):
        imm_merge(sds, fs, torch.tensor([0.5, 0.5]), layers={"a": ["a.weight"], "b": ["a.weight"]})
    with pytest.raises(ValueError, match="belongs to no layer"):
        imm_merge(
            sds,
            fs,
            {"a": torch.tensor([0.5, 0.5])},
            layers={"a": ["a.weight"]},
            names=["a.weight", "b.weight"],
        )
    with pytest.raises(ValueError, match="eps"):
        imm_merge(sds, fs, torch.tensor([0.5, 0.5]), eps=0.0)


def test_wrong_kinds_of_argument_are_type_errors() -> None:
    """A bare string where a list of names belongs, or ratios that are not numbers, are the
    caller's mistake of kind (TypeError), and the message shows what was passed."""
    sds, fs = _models(2)
    with pytest.raises(
        TypeError, match="layer 'a': expected a list of parameter names, got the string 'a.weight'"
    ):
        imm_merge(sds, fs, torch.tensor([0.5, 0.5]), layers={"a": "a.weight"})
    with pytest.raises(TypeError, match=r"alphas: expected a tensor of mixing ratios, got \['x', 'y'\]"):
        imm_merge(sds, fs, ["x", "y"])  # type: ignore[arg-type]


def test_messages_show_the_received_value() -> None:
    sds, fs = _models(2)
    with pytest.raises(ValueError, match=r"nothing to merge .*got names=\[\] and 3 entries"):
        imm_merge(sds, fs, torch.tensor([0.5, 0.5]), names=[])
    with pytest.raises(ValueError, match=r"layer 'b' has no parameters.*got \[\]"):
        imm_merge(sds, fs, torch.tensor([0.5, 0.5]), layers={"a": ["a.weight"], "b": []})
    fs[1]["a.bias"][0] = -2.5
    with pytest.raises(ValueError, match=r"fishers\[1\]\['a\.bias'\] has negative entries.*got min -2\.5"):
        imm_merge(sds, fs, torch.tensor([0.5, 0.5]))
    fs[1]["a.bias"][0] = float("inf")
    with pytest.raises(
        ValueError, match=r"fishers\[1\]\['a\.bias'\] has NaN or infinite.*got 1 of 3 non-finite"
    ):
        imm_merge(sds, fs, torch.tensor([0.5, 0.5]))
