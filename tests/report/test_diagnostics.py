"""The mixing-ratio and source-distance sections of ``report.md``, Fig. 5b, and Table 2 with
``mean-timm``, read from fake run folders (old and new ``alphas.json`` formats)."""

from __future__ import annotations

import csv
import json
import statistics

import matplotlib.image
import pytest

from tmerge.errors import RunError
from tmerge.report import ReportConfig, run_report
from tmerge.report.diagnostics import (
    distance_summary,
    first_source_alphas,
    summarise_alphas,
    trajectory,
    trajectory_run,
)
from tmerge.report.document import mixing_section, sources_section
from tmerge.report.panels import trajectory_panels
from tmerge.report.runs import discover, init_order
from tmerge.report.tables import table2_markdown, table_inits, table_rows

DISTANCE = {
    "from": "task1",
    "rel_distance_min": 0.31,
    "rel_distance_median": 0.42,
    "rel_distance_max": 0.61,
    "cosine_min": 0.71,
    "cosine_median": 0.9,
    "cosine_max": 0.98,
    "per_layer": {
        "a": {"rel_distance": 0.31, "cosine": 0.98},
        "b": {"rel_distance": 0.42, "cosine": 0.9},
        "c": {"rel_distance": 0.61, "cosine": 0.71},
    },
}


def alphas_of(path):
    return json.loads((path / "alphas.json").read_text())


def losses_of(alphas) -> list[float]:
    return [e["val_loss"] for e in alphas["trajectory"]]


def best_of(alphas) -> int:
    """The epoch with the lowest validation loss, found here without the report's code."""
    losses = losses_of(alphas)
    return alphas["trajectory"][losses.index(min(losses))]["epoch"]


def md_rows(text: str, first_header: str) -> list[list[str]]:
    """The body rows of the Markdown table whose header starts with ``| first_header``."""
    block = text.split(f"| {first_header} |")[1]
    lines = []
    for ln in block.splitlines()[2:]:
        if not ln.startswith("| "):
            break
        lines.append([c.strip() for c in ln.strip("|").split("|")])
    return lines


def test_old_alphas_json_without_trajectory_is_read(fake):
    path = fake.target(4, "timm")
    alphas = alphas_of(path)
    assert "trajectory" not in alphas
    layers = alphas["layers"]
    first = [alphas["alphas"][layer][0] for layer in layers]  # read here, not by the report
    summary = summarise_alphas(alphas)
    assert (summary.low, summary.high) == (min(first), max(first))
    assert summary.mean == pytest.approx(statistics.fmean(first))
    assert summary.source == "task1" and summary.n_sources == 2 and summary.n_layers == 3
    assert summary.epochs is None and summary.best_epoch is None
    assert trajectory(alphas) is None
    assert list(first_source_alphas(alphas)) == layers


def test_trajectory_is_read_per_epoch_and_layer(fake):
    alphas = alphas_of(fake.target(8, "mean-timm", 0, trajectory=True))
    layers, n_epochs = alphas["layers"], len(alphas["trajectory"])
    path = trajectory(alphas)
    assert path is not None and path.epochs == [e["epoch"] for e in alphas["trajectory"]]
    assert path.layers == layers and path.values.shape == (n_epochs, len(layers))
    for e, entry in enumerate(alphas["trajectory"]):
        assert path.values[e].tolist() == [entry["alphas"][layer][0] for layer in layers]
    assert path.val_loss == losses_of(alphas) and path.best_epoch() == best_of(alphas)
    assert 0 < best_of(alphas) < n_epochs - 1  # the fake's losses fall, then rise
    summary = summarise_alphas(alphas)
    assert summary.epochs == n_epochs and summary.best_epoch == best_of(alphas)
    # a trajectory without losses (null) has no epoch kept
    for entry in alphas["trajectory"]:
        entry["val_loss"] = None
    assert trajectory(alphas).best_epoch() is None


def test_malformed_alphas_name_the_file(fake):
    alphas = alphas_of(fake.target(4, "timm"))
    with pytest.raises(RunError, match=r"runs/x/alphas.json: .*no \"alphas\" table"):
        summarise_alphas({"sources": ["a"]}, "runs/x/alphas.json")
    broken = {**alphas, "alphas": {**alphas["alphas"], alphas["layers"][1]: ["x", 0.5]}}
    with pytest.raises(RunError, match="not a number"):
        first_source_alphas(broken, "f.json")
    with pytest.raises(RunError, match=r"f.json: \"trajectory\"\[0\]"):
        trajectory({**alphas, "trajectory": [{"epoch": 0}]}, "f.json")


def test_mixing_section_lists_every_portion_and_seed(fake):
    fake.target(4, "timm")  # old format
    for seed in (0, 1):
        fake.target(8, "timm", seed, trajectory=True)
        fake.target(8, "mean-timm", seed, trajectory=seed == 0)
    fake.target(8, "imm", 0)  # learns no α: not listed
    broken = fake.target(8, "timm", 2)
    (broken / "alphas.json").write_text(json.dumps({"alphas": {}}))
    new = alphas_of(fake.root / "brats" / "p8" / "seed0" / "timm")
    text = mixing_section(discover(fake.root))
    rows = md_rows(text, "portion")
    assert [r[:3] for r in rows] == [
        ["4 %", "—", "timm"],
        ["8 %", "0", "mean-timm"],
        ["8 %", "0", "timm"],
        ["8 %", "1", "mean-timm"],
        ["8 %", "1", "timm"],
        ["8 %", "2", "timm"],
    ]
    assert rows[0][3:] == ["task1", "0.300–0.500", "0.400", "3", "— (no trajectory)"]
    assert rows[1][7] == f"{len(new['trajectory'])}, lowest val loss at epoch {best_of(new)}"
    assert rows[3][7] == "— (no trajectory)"
    assert str(broken / "alphas.json") in rows[5][3]


def test_mixing_section_without_runs(fake):
    fake.target(4, "none")
    assert "No finished mean-timm or timm run." in mixing_section(discover(fake.root))


def test_sources_section_reads_distance_from_init(fake):
    fake.source("task1", distance_from_init=None)  # trained from scratch
    fake.source("task2", distance_from_init=DISTANCE)
    fake.source("all-hcp")  # a metrics.json from before the distance was recorded
    text = sources_section(discover(fake.root))
    assert md_rows(text, "run") == [["`task2`", "task1", "3", "0.420 (0.310–0.610)", "0.900 (0.710–0.980)"]]
    assert "No distance recorded" in text and "all-hcp, task1" in text


def test_distance_summary_falls_back_to_per_layer(fake):
    per_layer = {"a": {"rel_distance": 0.2, "cosine": 0.9}, "b": {"rel_distance": 0.6, "cosine": 0.5}}
    fake.source("task2", distance_from_init={"from": "task1", "per_layer": per_layer})
    d = distance_summary(discover(fake.root).sources[0])
    assert d is not None and d.rel_distance == pytest.approx((0.2, 0.4, 0.6))
    assert d.cosine == pytest.approx((0.5, 0.7, 0.9)) and d.n_layers == 2


def test_broken_distance_is_named_not_fatal(fake):
    path = fake.source("task2", distance_from_init={"from": "task1"})
    text = sources_section(discover(fake.root))
    assert f"- {path / 'metrics.json'}: distance_from_init: no rel_distance" in text
    assert "No source run records" in text


def test_trajectory_panels_pick_the_single_run_else_the_lowest_seed(fake):
    alphas = alphas_of(fake.target(4, "timm", trajectory=True))
    fake.target(4, "timm", 0, trajectory=True)
    fake.target(8, "timm", 1, trajectory=True)
    fake.target(8, "timm", 2, trajectory=True)
    fake.target(100, "timm")  # old format: noted, not drawn
    index = discover(fake.root)
    assert trajectory_run(index, 4, "timm").seed is None
    assert trajectory_run(index, 8, "timm").seed == 1
    panels, notes = trajectory_panels(index, "timm")
    assert [p.title.split(":")[0] for p in panels] == ["4 % (single run)", "8 % (seed 1)"]
    assert panels[0].best_epoch == best_of(alphas)
    assert panels[0].values.shape == (len(alphas["trajectory"]), len(alphas["layers"]))
    assert notes == ["100 %: no timm alphas.json with a trajectory (written before it was recorded)"]


def test_report_has_the_new_sections_and_figure(fake):
    fake.target(4, "none")
    fake.target(4, "timm", offset=0.03, trajectory=True)
    fake.target(4, "mean-timm", offset=0.02)
    fake.source("task1", distance_from_init=None)
    fake.source("task2", distance_from_init=DISTANCE)
    out = run_report(ReportConfig(runs_dir=str(fake.root), bootstrap=50))
    report = (out / "report.md").read_text()
    assert "## Mixing ratios\n" in report and "## Sources\n" in report
    assert "![fig5_alpha_trajectory.png](fig5_alpha_trajectory.png)" in report
    height, width = matplotlib.image.imread(out / "fig5_alpha_trajectory.png").shape[:2]
    assert height > 200 and width > 400
    assert "| `task2` | task1 | 3 | 0.420 (0.310–0.610) | 0.900 (0.710–0.980) |" in report


def test_table2_sweep_with_mean_timm_is_mean_and_sd_over_seeds(fake):
    for seed in (0, 1, 2):
        fake.target(8, "mean-timm", seed, offset=0.01 * seed)
        fake.target(8, "timm", seed, offset=0.02 * seed)
    fake.target(8, "mean-imm", 0)
    index = discover(fake.root)
    inits = table_inits(index, ["none", "timm"])
    assert inits == ["none", "mean-imm", "mean-timm", "timm"]
    order = init_order()
    assert order.index("mean-imm") < order.index("mean-timm") < order.index("timm")
    text = table2_markdown(index, table_rows(index, [8]), inits)
    header = "| portion | n | seeds | none | mean-imm | mean-timm | timm |"
    assert header in text
    block = text.split("## Dice, mean of ET, TC and WT")[1].split("\n## ")[0]
    sweep = next(ln for ln in block.splitlines() if ln.startswith("| 8 %, seeds 0,1,2 |"))
    cells = [c.strip() for c in sweep.strip("|").split("|")]
    for init in ("mean-timm", "timm"):
        per_seed = []
        for seed in (0, 1, 2):
            path = fake.root / "brats" / "p8" / f"seed{seed}" / init / "test_per_subject.csv"
            with open(path) as f:
                per_seed.append(statistics.fmean(float(r["dice_mean"]) for r in csv.DictReader(f)))
        expected = f"{statistics.fmean(per_seed):.3f} ± {statistics.stdev(per_seed):.3f}"
        assert cells[header.strip("| ").split(" | ").index(init)] == expected
    assert cells[2] == "3"  # seeds
    single = cells[header.strip("| ").split(" | ").index("mean-imm")]
    assert single.endswith(" (1/3 seeds)") and "±" not in single  # one seed: no sd to give


def test_methods_table_says_what_each_method_uses():
    from tmerge.report.document import methods_section

    text = methods_section(["none", "timm", "ties", "unknown-init"])
    rows = {line.split(" | ")[0].strip("| `"): line for line in text.splitlines() if line.startswith("| `")}
    assert set(rows) == {"none", "timm", "ties"}
    # timm: Fisher, target labels, learned per layer; ties: a base θ₀ and a grid on validation.
    assert rows["timm"].split(" | ")[2:] == ["yes", "", "yes", "yes |"]
    assert rows["ties"].split(" | ")[2:] == ["", "yes", "grid", " |"]
    assert methods_section(["unknown-init"]) == ""
