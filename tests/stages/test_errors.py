"""Bad inputs a user meets between stages: each is one clear error (exit status 2) and nothing is
written into the run folder."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from tmerge.cli import main
from tmerge.io import write_safetensors
from tmerge.nets import Isensee2017, partition
from tmerge.runs import save_net

SMALL = ["net.base_filters=4", "net.depth=3", "data.patch_size=16"]


def fake_source(runs, name, *, base_filters=4, fisher_drop=0, in_channels=2):
    """A source run folder with weights (and a Fisher) of a small Isensee2017."""
    net = Isensee2017(in_channels, 8, base_filters=base_filters, depth=3)
    meta = {
        "arch": "Isensee2017",
        "in_channels": in_channels,
        "n_classes": 8,
        "base_filters": base_filters,
        "depth": 3,
    }
    save_net(runs / name / "net.safetensors", net, meta)
    fused, _ = partition(net)
    fisher = {n: torch.rand_like(p) for n, p in net.named_parameters() if n in fused[fisher_drop:]}
    write_safetensors(runs / name / "fisher.safetensors", fisher)
    (runs / name / "metrics.json").write_text("{}")  # a finished run


def run(args, capsys):
    status = main(args)
    err = capsys.readouterr().err
    return status, err


def test_task2_refuses_task1_of_another_architecture(tmp_path, capsys):
    fake_source(tmp_path, "task1", base_filters=8)
    status, err = run(["task2", f"runs_dir={tmp_path}", *SMALL], capsys)
    assert status == 2
    assert "another architecture" in err and "base_filters" in err and "net.safetensors" in err
    assert not (tmp_path / "task2").exists()


def test_timm_refuses_source_of_another_architecture(tmp_path, capsys):
    fake_source(tmp_path, "task1")
    fake_source(tmp_path, "task2", base_filters=8)
    status, err = run(["timm", f"runs_dir={tmp_path}", "portion=4", *SMALL], capsys)
    assert status == 2 and "task2" in err and "another architecture" in err
    assert not (tmp_path / "brats").exists()


def test_timm_refuses_fisher_missing_keys(tmp_path, capsys):
    fake_source(tmp_path, "task1")
    fake_source(tmp_path, "task2", fisher_drop=2)
    status, err = run(["timm", f"runs_dir={tmp_path}", "portion=4", *SMALL], capsys)
    assert status == 2 and "fisher.safetensors" in err and "lacks 2 expected" in err
    assert not (tmp_path / "brats").exists()


def test_truncated_weights_are_one_clear_error(tmp_path, capsys):
    fake_source(tmp_path, "task1")
    path = tmp_path / "task1" / "net.safetensors"
    path.write_bytes(path.read_bytes()[:100])
    status, err = run(["task2", f"runs_dir={tmp_path}", *SMALL], capsys)
    assert status == 2 and str(path) in err and "Traceback" not in err


@pytest.mark.parametrize("init", ["imm", "timm"])
def test_merging_needs_two_sources(tmp_path, capsys, init):
    fake_source(tmp_path, "task1")
    status, err = run(
        ["target", f"init={init}", "sources=[task1]", f"runs_dir={tmp_path}", "portion=4", *SMALL], capsys
    )
    assert status == 2 and "at least 2" in err


def test_truncated_nifti_mid_stage_leaves_no_run_folder(tiny_default, tmp_path, capsys):
    """A data error met while preprocessing (inside Lightning's prepare_data) is still one line
    with exit status 2, and the run folder the stage had begun is removed again."""
    import shutil

    brats = tmp_path / "brats"
    shutil.copytree(tiny_default / "brats", brats)
    for victim in (brats / "MICCAI_BraTS_2018_Data_Training").glob("*/*/*_flair.nii.gz"):
        victim.write_bytes(victim.read_bytes()[:200])
    runs = tmp_path / "runs"
    args = ["target", "init=none", f"data.root={brats}", f"runs_dir={runs}", "portion=50"]
    status, err = run(
        [*args, "data.test_size=8", "data.pool_size=16", "trainer.max_epochs=1", *SMALL], capsys
    )
    assert status == 2, err
    assert "_flair.nii.gz" in err and "Traceback" not in err
    # Nothing left behind: no run folder, no lock file, no empty folders made for them.
    assert not (runs / "brats").exists(), sorted(str(p) for p in runs.rglob("*"))


def test_unfinished_source_is_refused(tmp_path, capsys):
    """A source run killed after its weights but before its marker (e.g. during the Fisher)."""
    fake_source(tmp_path, "task1")
    fake_source(tmp_path, "task2")
    (tmp_path / "task2" / "metrics.json").unlink()
    status, err = run(["timm", f"runs_dir={tmp_path}", "portion=4", *SMALL], capsys)
    assert status == 2 and "task2 is unfinished (no metrics.json)" in err and "make task2" in err
    assert not (tmp_path / "brats").exists()


def test_bad_fisher_settings_are_refused_before_anything_is_written(tmp_path, capsys):
    status, err = run(["task1", f"runs_dir={tmp_path}", "fisher.method=fast", *SMALL], capsys)
    assert status == 2 and "fisher.method" in err and "'fast'" in err
    assert not (tmp_path / "task1").exists()


def test_source_missing_a_parameter_is_refused(tmp_path, capsys):
    """Weights of the right architecture keys that lack a parameter of the target network."""
    fake_source(tmp_path, "task1")
    fake_source(tmp_path, "task2")
    path = tmp_path / "task2" / "net.safetensors"
    with safe_open(str(path), framework="pt") as handle:
        meta = handle.metadata()
    state = load_file(str(path))
    dropped = next(n for n in state if n.endswith("conv.weight"))
    write_safetensors(path, {n: v for n, v in state.items() if n != dropped}, meta)
    status, err = run(["imm", f"runs_dir={tmp_path}", "portion=4", *SMALL], capsys)
    assert status == 2 and "weights of another network" in err and repr(dropped) in err
    assert "Traceback" not in err and not (tmp_path / "brats").exists()


def test_negative_fisher_is_refused(tmp_path, capsys):
    fake_source(tmp_path, "task1")
    fake_source(tmp_path, "task2")
    fisher_path = tmp_path / "task1" / "fisher.safetensors"
    fisher = load_file(str(fisher_path))
    first = next(iter(fisher))
    fisher[first] = -fisher[first] - 1.0
    write_safetensors(fisher_path, fisher)
    status, err = run(["imm", f"runs_dir={tmp_path}", "portion=4", *SMALL], capsys)
    assert status == 2 and "has negative entries" in err and str(fisher_path) in err
    assert "Traceback" not in err and not (tmp_path / "brats").exists()
