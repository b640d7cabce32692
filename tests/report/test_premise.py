"""The premise checks: the frozen-feature probe against random P, no transfer per portion, and
whether the sources converged."""

from __future__ import annotations

import json

import pytest

from tmerge.report.premise import premise_markdown, validation_curve
from tmerge.report.runs import discover
from tmerge.report.tables import table_rows


def _probe(run, init, score):
    stage = "adaption" if init == "timm" else "warmup"
    stages = json.loads((run / "stages.json").read_text()) if (run / "stages.json").is_file() else {}
    stages[stage] = {"epochs": 5, "test": {"dice_mean": score}}
    (run / "stages.json").write_text(json.dumps(stages))


def test_probe_against_random_p_and_sources(fake):
    probes = {"none": [0.30, 0.34], "m2": [0.40, 0.40], "timm": [0.35, 0.41]}
    for init, scores in probes.items():
        for seed, score in enumerate(scores):
            _probe(fake.target(4, init, seed=seed), init, score)
    source = fake.source("task1")
    (source / "logs").mkdir(exist_ok=True)
    (source / "logs" / "metrics.csv").write_text(
        "epoch,step,train/loss,val/dice\n0,1,,0.40\n0,1,0.9,\n1,2,,0.50\n2,3,,0.60\n3,4,,0.65\n"
    )
    index = discover(fake.root)
    text = premise_markdown(index, table_rows(index, []), ["none", "m2", "timm"])
    # m2 − none per seed: +0.10, +0.06 → 0.080 ± 0.028; timm: +0.05, +0.07 → 0.060 ± 0.014.
    # Two pairs: t_{0.975,1} = 12.706, t_{0.8,1} = 1.376; half-width 12.706 · sd/√2, MDE
    # (12.706 + 1.376) · sd/√2: m2 ±0.254 and 0.282, timm ±0.127 and 0.141.
    assert "| m2 | 0.400 ± 0.000 (2) | 0.080 ± 0.028 (2) | [-0.174, +0.334] | 0.282 |" in text
    assert "| timm | 0.380 ± 0.042 (2) | 0.060 ± 0.014 (2) | [-0.067, +0.187] | 0.141 |" in text
    assert "| none | 0.320 ± 0.028 (2) | — | — | — |" in text
    # task1: 0.40 → 0.65, the last three 0.50, 0.60, 0.65: +0.15, still rising
    assert "| task1 | 4 | 0.650 | 0.650 | +0.150 | still rising |" in text


def test_validation_curve_skips_training_rows(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text("epoch,val/dice,train/loss\n0,0.5,\n0,,1.0\n1,0.6,\n")
    assert validation_curve(path) == pytest.approx([0.5, 0.6])
    assert validation_curve(tmp_path / "missing.csv") == []


def _uniform(value: float) -> dict[str, dict[str, float]]:
    """Per-subject scores whose mean Dice is ``value`` for every subject."""
    subjects = [f"S{i}" for i in range(4)]
    scores = dict.fromkeys(("dice_ET", "dice_TC", "dice_WT", "dice_mean"), value)
    return {s: {**scores, "hd95_ET": 5.0, "hd95_TC": 5.0, "hd95_WT": 5.0} for s in subjects}


def test_shallow_against_none_paired_by_seed(fake):
    """The shallow baseline's difference to the CNN without transfer carries its interval and MDE;
    a seed only one of the two finished is left out of the pairs."""
    for seed, (none, shallow) in enumerate([(0.50, 0.40), (0.60, 0.44), (0.55, None)]):
        fake.target(4, "none", seed=seed, scores=_uniform(none))
        if shallow is not None:
            fake.target(4, "shallow", seed=seed, scores=_uniform(shallow))
    index = discover(fake.root)
    text = premise_markdown(index, table_rows(index, []), ["none"])
    # shallow − none: −0.10, −0.16 → −0.130 ± 0.042 over 2 pairs; half-width 12.706 · 0.0424/√2
    # = 0.381, MDE (12.706 + 1.376) · 0.0424/√2 = 0.422
    assert "| 4 %, seeds 0,1,2 | 0.420 ± 0.028 (2/3 seeds) | -0.130 ± 0.042 (2) | [-0.511, +0.251] | 0.422 |" in text
