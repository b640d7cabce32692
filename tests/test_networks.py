"""MONAI's networks end to end through the CLI on tiny generated data: task1 → task2 → timm with
``net.name=dynunet``, ``segresnet`` and ``unet``, then ``tmerge merge`` of the sources, Table 4
(``tmerge forgetting``) and the architecture check between a source of one network and a target
of another."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from helpers.tiny_settings import TINY_SCHEDULE
from safetensors import safe_open
from safetensors.torch import load_file

from tmerge.cli import main
from tmerge.nets import layer_groups, partition
from tmerge.nets.config import NetConfig

pytestmark = pytest.mark.slow

# The tiny schedule, with each network at a size that downsamples 16³ patches to 4³.
SCHEDULE = list(TINY_SCHEDULE)
NETS = {
    "dynunet": ["net.name=dynunet", "net.filters=[4,8,16]", "net.strides=[2,2]"],
    "segresnet": [
        "net.name=segresnet",
        "net.init_filters=8",
        "net.blocks_down=[1,1,1]",
        "net.blocks_up=[1,1]",
    ],
    "unet": ["net.name=unet", "net.filters=[4,8,16]", "net.strides=[2,2]", "net.res_units=1"],
}


def net_config(name: str) -> NetConfig:
    sizes = dict(item.removeprefix("net.").split("=") for item in NETS[name])
    return NetConfig(**{k: yaml.safe_load(v) for k, v in sizes.items()})


@pytest.fixture(scope="module", params=list(NETS))
def pipeline(request, tiny_default, tmp_path_factory):
    """task1, task2 and timm with one network, once per network for the whole module."""
    name = request.param
    runs = tmp_path_factory.mktemp(f"runs-{name}")
    tiny = [*NETS[name], *SCHEDULE]
    hcp = [f"data.root={tiny_default / 'hcp'}", f"runs_dir={runs}", *tiny]
    assert main(["task1", *hcp]) == 0
    assert main(["task2", *hcp]) == 0
    brats = [
        f"data.root={tiny_default / 'brats'}",
        f"runs_dir={runs}",
        "portion=50",
        "data.test_size=8",
        "data.pool_size=16",
        "adaption.max_epochs=1",
        *tiny,
    ]
    assert main(["timm", *brats]) == 0
    return name, runs, brats


def test_sources_record_the_network_and_its_fisher(pipeline):
    name, runs, _ = pipeline
    cfg = net_config(name)
    net = cfg.build(2, 8)
    fused, _ = partition(net)
    for run in ("task1", "task2"):
        path = runs / run / "net.safetensors"
        meta = json.loads(safe_open(str(path), "pt").metadata()["tmerge"])
        assert meta["arch"] == cfg.arch and {k: meta[k] for k in cfg.architecture()} == cfg.architecture()
        weights = load_file(str(path))
        assert set(weights) == set(net.state_dict())  # each tensor once (no skip_layers aliases)
        fisher = load_file(str(runs / run / "fisher.safetensors"))
        assert set(fisher) == set(fused)
        assert all(torch.isfinite(f).all() and (f >= 0).all() for f in fisher.values())
        assert sum(float(f.sum()) for f in fisher.values()) > 0
        # The best epoch's validation Dice: a score, the mean of the per-class scores beside it.
        marker = json.loads((runs / run / "metrics.json").read_text())
        per_class = marker["val_dice_per_class"]
        assert set(per_class) and all(0.0 <= d <= 1.0 for d in per_class.values())
        assert marker["val_dice"] == pytest.approx(sum(per_class.values()) / len(per_class), abs=1e-6)


def test_timm_writes_scores_and_alphas(pipeline):
    name, runs, _ = pipeline
    run = runs / "brats" / "p50" / "timm"
    summary = json.loads((run / "test_summary.json").read_text())
    assert set(summary) == {"n", "dice", "hd95"} and summary["n"] == 8
    assert set(summary["dice"]) == {"ET", "TC", "WT", "mean"} and set(summary["hd95"]) == {"ET", "TC", "WT"}
    assert all(0.0 <= v <= 1.0 for v in summary["dice"].values())
    assert all(v >= 0.0 for v in summary["hd95"].values())
    alphas = json.loads((run / "alphas.json").read_text())
    assert alphas["sources"] == ["task1", "task2"]
    # One α per source for every fused layer the sources share with the target (all but the
    # input layers: HCP has 2 channels, BraTS 4), each in [0, 1], summing to 1 per layer.
    target, source = net_config(name).build(4, 3), net_config(name).build(2, 8)
    fused, _ = partition(target)
    shapes = {n: p.shape for n, p in source.named_parameters()}
    shared = [
        layer
        for layer, names in layer_groups(target, fused).items()
        if all(target.get_parameter(n).shape == shapes[n] for n in names)
    ]
    assert alphas["layers"] == shared and len(shared) < len(layer_groups(target, fused))
    assert not any(layer.startswith("skip_layers.") for layer in shared)
    for pair in alphas["alphas"].values():
        assert len(pair) == 2 and abs(sum(pair) - 1) < 1e-5 and min(pair) >= 0
    meta = json.loads(safe_open(str(run / "net.safetensors"), "pt").metadata()["tmerge"])
    assert meta["name"] == name and meta["init"] == "timm"


def test_source_of_another_network_is_refused(pipeline, capsys):
    name, runs, brats = pipeline
    other = "segresnet" if name == "dynunet" else "dynunet"
    args = [a for a in brats if not a.startswith("net.")] + NETS[other] + ["init=imm"]
    assert main(["target", *args]) == 2
    err = capsys.readouterr().err
    assert "another architecture" in err and f"name={name!r}" in err and "net.safetensors" in err
    assert not (runs / "brats" / "p50" / "imm").exists()


def test_merge_recipe_on_the_sources(pipeline, tmp_path):
    name, runs, _ = pipeline
    out = tmp_path / "m1-m2-imm.safetensors"
    recipe = tmp_path / "imm.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "method": "imm",
                "models": [str(runs / "task1"), str(runs / "task2")],
                "params": {"alphas": [0.5, 0.5]},
                "output": str(out),
            }
        )
    )
    assert main(["merge", str(recipe)]) == 0
    merged = load_file(str(out))
    m1 = load_file(str(runs / "task1" / "net.safetensors"))
    assert set(merged) == set(m1)
    net = net_config(name).build(2, 8)
    net.load_state_dict(merged)  # loads into the network (DynUNet: its aliases filled in)
    with torch.no_grad():
        assert torch.isfinite(net.eval()(torch.randn(1, 2, 16, 16, 16))).all()


def test_forgetting_table(pipeline, tiny_default):
    """Table 4 (P of M1, M2, IMM, T-IMM with each source's S) with the network's own P/S split."""
    name, runs, _ = pipeline
    args = [f"data.root={tiny_default / 'hcp'}", f"runs_dir={runs}", "portion=50", *NETS[name], *SCHEDULE[:1]]
    assert main(["forgetting", *args, "loss.sw_roi=32"]) == 0
    table = json.loads((runs / "forgetting" / "p50" / "table4.json").read_text())
    assert {"M1", "M2", "IMM", "T-IMM"} <= set(table)
    for row in table.values():
        assert set(row) == {"labels 1:7", "labels 8:14"} and all(0.0 <= v <= 1.0 for v in row.values())
