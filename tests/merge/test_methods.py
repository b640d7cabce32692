"""tmerge.merge.methods.check_params: a recipe's parameters are refused before anything merges."""

from __future__ import annotations

import pytest

from tmerge.merge.methods import check_params


def test_valid_alphas_pass() -> None:
    check_params("imm", {"alphas": [0.25, 0.75]}, 2)
    check_params("mean-imm", {"alphas": [1 / 3, 1 / 3, 1 / 3]}, 3)
    check_params("mean-imm", {"alphas": None}, 2)  # the default: uniform


@pytest.mark.parametrize(
    ("alphas", "pattern"),
    [
        ([0.7, 0.2], r"mean-imm: alphas: mixing ratios must sum to 1 over the 2 models, got sum 0\.9"),
        ([1.2, -0.2], r"mean-imm: alphas: mixing ratios must be ≥ 0, got \[1\.2"),
        ([float("nan"), 1.0], r"mean-imm: alphas: contains NaN"),
        (["a", "b"], r"mean-imm: alphas must be numbers, got \['a', 'b'\]"),
        ([0.5, 0.3, 0.2], r"alphas must have one entry per model \(2\), got \[0\.5, 0\.3, 0\.2\]"),
    ],
)
def test_bad_alphas_are_refused_as_value_errors(alphas: list, pattern: str) -> None:
    # ValueError: the merge stage turns it into a ConfigError naming the recipe key.
    with pytest.raises(ValueError, match=pattern):
        check_params("mean-imm", {"alphas": alphas}, 2)


def test_trim_scope_is_a_parameter_of_ties_and_dare_ties() -> None:
    check_params("ties", {"trim": "model"}, 2)
    check_params("dare-ties", {"trim": "tensor", "k": 50}, 2)
    with pytest.raises(ValueError, match=r"ties: trim must be one of tensor, model, got 'layer'"):
        check_params("ties", {"trim": "layer"}, 2)
    with pytest.raises(ValueError, match=r"dare takes p, lam, seed; unknown trim"):
        check_params("dare", {"trim": "model"}, 2)
