"""Learning curves in the report: start, area under the curve and end, per init over seeds."""

from __future__ import annotations

import json

import pytest

from tmerge.report.curves import curves_markdown, normalised_area
from tmerge.report.runs import discover
from tmerge.report.tables import table_rows


def test_normalised_area_by_hand():
    # trapezoids over 1→2→4: (1·(0.2+0.4) + 2·(0.4+0.5))/2 = 1.2, over a span of 3 → 0.4
    assert normalised_area([1, 2, 4], [0.2, 0.4, 0.5]) == pytest.approx(0.4)
    assert normalised_area([3], [0.7]) == 0.7
    with pytest.raises(ValueError, match="must increase"):
        normalised_area([2, 1], [0.1, 0.2])


def test_curve_table_over_seeds(fake):
    curves = {0: [0.1, 0.3, 0.5], 1: [0.3, 0.5, 0.7]}
    for seed, scores in curves.items():
        run = fake.target(4, "none", seed=seed)
        points = [{"epoch": e, "global_step": e, "scores": {"dice_mean": s}} for e, s in zip([1, 2, 4], scores, strict=True)]
        (run / "curve.json").write_text(json.dumps({"max_epochs": 4, "points": points}))
    fake.target(4, "timm", seed=0)  # a paper-protocol run: no curve
    index = discover(fake.root)
    text = curves_markdown(index, table_rows(index, []), ["none", "timm"])
    # start 0.1/0.3, area (1·0.4 + 2·0.8)/2/3 = 1/3 and (1·0.8 + 2·1.2)/2/3 = 0.5333, end 0.5/0.7
    line = next(ln for ln in text.splitlines() if "| none |" in ln)
    assert "| 2 | 0.200 ± 0.141 | 0.433 ± 0.141 | 0.600 ± 0.141 |" in line
    assert "| timm |" not in text


def _curve(run, scores, epochs=(1, 2, 4)):
    points = [{"epoch": e, "global_step": e, "scores": {"dice_mean": s}} for e, s in zip(epochs, scores, strict=True)]
    (run / "curve.json").write_text(json.dumps({"max_epochs": epochs[-1], "points": points}))


def test_curve_criteria_against_none_paired_by_seed(fake):
    """Start, area and end of an init minus none's, paired by seed, with the t interval and MDE;
    a seed only one of them finished is left out."""
    none = {0: [0.1, 0.3, 0.5], 1: [0.3, 0.5, 0.7], 2: [0.2, 0.2, 0.2]}
    m2 = {0: [0.3, 0.4, 0.5], 1: [0.4, 0.5, 0.6]}
    for seed, scores in none.items():
        _curve(fake.target(4, "none", seed=seed), scores)
    for seed, scores in m2.items():
        _curve(fake.target(4, "m2", seed=seed), scores)
    index = discover(fake.root)
    text = curves_markdown(index, table_rows(index, []), ["none", "m2"])
    paired = text.split("paired by seed\n", 1)[1]
    line = next(ln for ln in paired.splitlines() if "| m2 |" in ln)
    # start: +0.2, +0.1 → 0.150 ± 0.071; half-width 12.706 · 0.0707/√2 = 0.635, MDE (12.706 + 1.376) · 0.05 = 0.704
    assert "| 0.150 ± 0.071 (2) | [-0.485, +0.785] | 0.704 |" in line
    # area: m2 (0.7 + 1.8)/6 = 0.4167 and (0.9 + 2.2)/6 = 0.5167 against 1/3 and 0.5333:
    # +0.0833, −0.0167 → 0.033 ± 0.071
    assert "| 0.033 ± 0.071 (2) |" in line
    # end: 0.0, −0.1 → −0.050 ± 0.071
    assert "| -0.050 ± 0.071 (2) | [-0.685, +0.585] | 0.704 |" in line
    assert "| none |" not in paired


def test_per_source_alphas_read_the_negative_control():
    from tmerge.report.diagnostics import per_source_alphas

    alphas = {"sources": ["task1", "task2", "noise"], "alphas": {"a": [0.5, 0.4, 0.1], "b": [0.2, 0.7, 0.1], "c": [0.3, 0.3, 0.4]}}
    found = per_source_alphas(alphas)
    assert found["noise"] == (pytest.approx(0.2), pytest.approx(1 / 3))
    assert found["task2"][1] == pytest.approx(1 / 3) and found["task1"][0] == pytest.approx(1 / 3)
    assert per_source_alphas({"sources": ["a"], "alphas": {"x": [0.5, 0.5]}}) is None
