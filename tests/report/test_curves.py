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


def test_per_source_alphas_read_the_negative_control():
    from tmerge.report.diagnostics import per_source_alphas

    alphas = {"sources": ["task1", "task2", "noise"], "alphas": {"a": [0.5, 0.4, 0.1], "b": [0.2, 0.7, 0.1], "c": [0.3, 0.3, 0.4]}}
    found = per_source_alphas(alphas)
    assert found["noise"] == (pytest.approx(0.2), pytest.approx(1 / 3))
    assert found["task2"][1] == pytest.approx(1 / 3) and found["task1"][0] == pytest.approx(1 / 3)
    assert per_source_alphas({"sources": ["a"], "alphas": {"x": [0.5, 0.5]}}) is None
