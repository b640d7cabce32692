"""The fixed protocol end to end on tiny data: a fixed budget, the final weights, no validation,
the same warm-up for every init, and learning-curve points that leave the training unchanged."""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch
from helpers.tiny_settings import TINY_ARGS, tiny_brats

from tmerge.cli import main
from tmerge.data.target import TargetDataModule
from tmerge.nets import input_names, partition
from tmerge.runs import best_state_dict

pytestmark = pytest.mark.slow



@pytest.fixture(scope="module")
def runs(tiny_sources):
    """task1 and task2, trained tiny once for this module (tests/conftest.py)."""
    return tiny_sources


def fixed_args(tiny_default, runs, *extra):
    return [
        *tiny_brats(tiny_default, runs),
        "protocol=fixed",
        "fixed.epochs=2",
        "fixed.warmup_epochs=1",
        *TINY_ARGS,
        *extra,
    ]


@pytest.fixture(scope="module")
def never_validates():
    """Fail any run that reads the validation split."""
    mp = pytest.MonkeyPatch()

    def refuse(self):
        raise AssertionError("the fixed protocol read the validation split")

    mp.setattr(TargetDataModule, "val_dataloader", refuse)
    yield
    mp.undo()


def test_fixed_protocol_trains_a_fixed_budget_and_tests_the_final_weights(runs, tiny_default, never_validates):
    assert main(["target", "init=none", *fixed_args(tiny_default, runs)]) == 0
    run = runs / "brats" / "p50" / "none"
    stages = json.loads((run / "stages.json").read_text())
    assert stages["protocol"] == "fixed"
    assert stages["warmup"]["epochs"] == 1 and stages["finetune"]["epochs"] == 2
    # the tested checkpoint is the last epoch's: model.ckpt holds what last.ckpt holds
    best, last = best_state_dict(run / "model.ckpt"), best_state_dict(run / "last.ckpt")
    assert all(torch.equal(best[k], last[k]) for k in best)
    curve = json.loads((run / "curve.json").read_text())
    assert [p["epoch"] for p in curve["points"]] == [1, 2]
    summary = json.loads((run / "test_summary.json").read_text())
    # the last curve point is the final test's Dice (the final weights on the test subjects)
    assert curve["points"][-1]["scores"] == {f"dice_{c}": v for c, v in summary["dice"].items()}
    assert curve["points"][-1]["global_step"] == 2 * curve["points"][0]["global_step"]


def test_warm_up_freezes_exactly_p_but_the_input_layer(runs, tiny_default):
    """init=none: after the warm-up, every fused parameter but the input layer is bitwise the
    seeded initialisation (the frozen-feature probe), and S has moved."""
    run = runs / "brats" / "p50" / "none"
    warmed = best_state_dict(run / "warmup" / "model.ckpt")
    from tmerge.config import compose
    from tmerge.stages.configs import TargetStageConfig

    cfg = compose(TargetStageConfig, None, files=[run / "config.yaml"])
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    fresh = cfg.net.build(4, 3)
    fused, specific = partition(fresh)
    first = set(input_names(fresh, fused))
    state = fresh.state_dict()
    assert first and all(torch.equal(warmed[n], state[n]) for n in fused if n not in first)
    assert any(not torch.equal(warmed[n], state[n]) for n in first)
    assert any(not torch.equal(warmed[n], state[n]) for n in specific)


def test_every_init_gets_the_same_warm_up(runs, tiny_default, never_validates):
    assert main(["timm", *fixed_args(tiny_default, runs)]) == 0
    assert main(["target", "init=m2", *fixed_args(tiny_default, runs)]) == 0
    stages = {i: json.loads((runs / "brats" / "p50" / i / "stages.json").read_text()) for i in ("none", "m2", "timm")}
    assert stages["timm"]["adaption"]["epochs"] == stages["m2"]["warmup"]["epochs"] == stages["none"]["warmup"]["epochs"] == 1
    assert {s["finetune"]["epochs"] for s in stages.values()} == {2}


def test_curve_points_leave_the_training_unchanged(runs, tiny_default, never_validates):
    """The same run without curve points ends with bitwise the same weights and scores."""
    other = runs.parent / f"{runs.name}-nocurve"
    other.mkdir()
    for source in ("task1", "task2"):
        (other / source).symlink_to(runs / source)
    args = [a.replace(f"runs_dir={runs}", f"runs_dir={other}") for a in fixed_args(tiny_default, runs)]
    assert main(["target", "init=none", "fixed.curve=false", *args]) == 0
    mine, theirs = other / "brats" / "p50" / "none", runs / "brats" / "p50" / "none"
    assert not (mine / "curve.json").exists()
    assert (mine / "test_per_subject.csv").read_text() == (theirs / "test_per_subject.csv").read_text()
    a, b = best_state_dict(mine / "model.ckpt"), best_state_dict(theirs / "model.ckpt")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_negative_control_merges_a_noise_source(runs, tiny_default, never_validates):
    """`tmerge noise-source` makes a finished source run whose P is seeded noise with task1's
    Fisher; T-IMM merges it as a third source."""
    from safetensors.torch import load_file

    assert main(["noise-source", "from=task1", "name=noise", "seed=3", f"runs_dir={runs}"]) == 0
    trained, noise = load_file(runs / "task1" / "net.safetensors"), load_file(runs / "noise" / "net.safetensors")
    fisher = load_file(runs / "noise" / "fisher.safetensors")
    assert (runs / "noise" / "fisher.safetensors").read_bytes() == (runs / "task1" / "fisher.safetensors").read_bytes()
    for name, t in trained.items():
        if name in fisher:  # P: noise of the trained tensor's scale
            assert not torch.equal(noise[name], t)
            assert float(noise[name].std()) == pytest.approx(float(t.std()), rel=0.5)
        else:  # S kept
            assert torch.equal(noise[name], t)
    assert main(["noise-source", "from=task1", "name=noise", f"runs_dir={runs}"]) == 2  # exists
    args = [a.replace("portion=50", "portion=25") for a in fixed_args(tiny_default, runs)]
    assert main(["timm", "sources=[task1,task2,noise]", *args]) == 0
    alphas = json.loads((runs / "brats" / "p25" / "timm" / "alphas.json").read_text())
    assert alphas["sources"] == ["task1", "task2", "noise"]
    assert all(len(a) == 3 and abs(sum(a) - 1) < 1e-5 for a in alphas["alphas"].values())


def test_shallow_baseline_is_a_column_of_its_own(runs, tiny_default):
    """`tmerge shallow`: the per-voxel baseline on the same splits, written as a target run."""
    args = [a for a in fixed_args(tiny_default, runs) if not a.startswith(("protocol", "fixed"))]
    assert main(["shallow", *args]) == 0
    run = runs / "brats" / "p50" / "shallow"
    summary = json.loads((run / "test_summary.json").read_text())
    assert summary["n"] == 8 and 0.0 <= summary["dice"]["mean"] <= 1.0
    splits = json.loads((run / "splits.json").read_text())
    assert splits["test"] == json.loads((runs / "brats" / "p50" / "none" / "splits.json").read_text())["test"]
    assert (run / "test_regions.csv").read_text().startswith("subject,truth_ET,truth_TC,truth_WT,pred_ET")
