"""The adaption stage's log line states its scores as they are."""

from __future__ import annotations

from tmerge.stages.adaption import scores_text


def test_a_dice_of_zero_is_logged_as_zero_not_nan() -> None:
    """A Dice of exactly 0 (nothing segmented yet, common after one epoch) and a loss of 0 are
    scores, not missing ones."""
    assert scores_text({"val_dice": 0.0, "val_loss": 0.0}, fixed=False) == "val Dice 0.000, val loss 0.0000"
    assert scores_text({"val_dice": 0.25, "val_loss": 0.5}, fixed=False) == "val Dice 0.250, val loss 0.5000"
    # None: the stage measured nothing (a fit without validation batches)
    assert scores_text({"val_dice": None, "val_loss": None}, fixed=False) == "val Dice nan, val loss nan"
    fixed = scores_text({"test": {"dice_mean": 0.0}}, fixed=True)
    assert fixed == "no validation (fixed protocol), probe test Dice 0.000"
