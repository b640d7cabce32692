"""Bad inputs a user meets between stages: each is one clear error (exit status 2) and nothing is
written into the run folder."""

from __future__ import annotations

import gzip
import re
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from helpers.sources import fake_source
from helpers.tiny_settings import TINY_NET
from safetensors import safe_open
from safetensors.torch import load_file

from tmerge.cli import main
from tmerge.io import write_safetensors

SMALL = list(TINY_NET)


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


# ---- the catalogue of bad data files (issue 24), through the CLI -------------------------------------

TRAIN = "MICCAI_BraTS_2018_Data_Training"
MODALITIES = ("t1", "t1ce", "t2", "flair")


def _edit(path: Path, change) -> None:
    img = nib.load(path)
    data, affine = change(np.asarray(img.dataobj).copy(), img.affine.copy())
    nib.save(nib.Nifti1Image(data, affine), path)


def _set_voxel(value):
    def change(d, a):
        d = d.astype(np.float32)
        d[16, 16, 16] = value
        return d, a

    return change


def _blank(fill: float):
    """The subject's t1 as a zero-filled sequence (0) or one value on the whole brain."""

    def breaker(folder: Path, sid: str) -> None:
        brain = np.any([np.asarray(nib.load(folder / f"{sid}_{m}.nii.gz").dataobj) != 0 for m in MODALITIES], axis=0)
        _edit(folder / f"{sid}_t1.nii.gz", lambda d, a: (np.where(brain, fill, 0).astype(np.float32), a))

    return breaker


def _truncated_nii(folder: Path, sid: str) -> None:
    gz = folder / f"{sid}_t2.nii.gz"
    (folder / f"{sid}_t2.nii").write_bytes(gzip.decompress(gz.read_bytes())[:400])
    gz.unlink()


def _all_zero(folder: Path, sid: str) -> None:
    for m in MODALITIES:
        _edit(folder / f"{sid}_{m}.nii.gz", lambda d, a: (np.zeros_like(d, dtype=np.float32), a))


#: name → (how every training subject is broken, the file the message names (a regex under the
#: subject folder), what the message says).
BAD_FILES = {
    "nan voxel": (lambda f, s: _edit(f / f"{s}_t1.nii.gz", _set_voxel(np.nan)), r"_t1\.nii\.gz", "NaN or Inf"),
    "inf voxel": (lambda f, s: _edit(f / f"{s}_flair.nii.gz", _set_voxel(np.inf)), r"_flair\.nii\.gz", "NaN or Inf"),
    "label 3": (
        lambda f, s: _edit(f / f"{s}_seg.nii.gz", lambda d, a: (np.where(d == 2, 3, d).astype(np.uint8), a)),
        r"_seg\.nii\.gz",
        "{3}",
    ),
    "label of another shape": (
        lambda f, s: _edit(f / f"{s}_seg.nii.gz", lambda d, a: (d[:-1], a)),
        r"_seg\.nii\.gz",
        "shape",
    ),
    "label of another affine": (
        lambda f, s: _edit(f / f"{s}_seg.nii.gz", lambda d, a: (d, a @ np.diag([1.0, 1.0, 1.2, 1.0]))),
        r"_seg\.nii\.gz",
        "affine",
    ),
    "fractional label map": (
        lambda f, s: _edit(f / f"{s}_seg.nii.gz", _set_voxel(0.5)),
        r"_seg\.nii\.gz",
        "label map holds non-integer",
    ),
    "truncated .nii.gz": (
        lambda f, s: (f / f"{s}_flair.nii.gz").write_bytes((f / f"{s}_flair.nii.gz").read_bytes()[:200]),
        r"_flair\.nii\.gz",
        "not a readable NIfTI",
    ),
    "truncated .nii": (_truncated_nii, r"_t2\.nii", "not a readable NIfTI"),
    "zero-byte file": (lambda f, s: (f / f"{s}_t1ce.nii.gz").write_bytes(b""), r"_t1ce\.nii\.gz", "not a readable"),
    "4-D image": (
        lambda f, s: _edit(f / f"{s}_t2.nii.gz", lambda d, a: (np.stack([d, d], axis=-1), a)),
        r"_t2\.nii\.gz",
        "expected a 3-D volume",
    ),
    "missing modality": (lambda f, s: (f / f"{s}_t2.nii.gz").unlink(), r"_t2\.nii\.gz", "not found"),
    "all-zero subject": (_all_zero, r"_t1\.nii\.gz", "are all zero; expected skull-stripped brain images"),
    "blank modality": (_blank(0.0), r"_t1\.nii\.gz", "this modality is blank (all zero)"),
    "constant modality": (_blank(7.0), r"_t1\.nii\.gz", "this modality is blank (constant 7 within the brain"),
}


def _broken_brats(tiny_default: Path, tmp_path: Path, breaker) -> Path:
    """A copy of the tiny BraTS set with every training subject broken by ``breaker``."""
    brats = Path(shutil.copytree(tiny_default / "brats", tmp_path / "brats"))
    for folder in sorted((brats / TRAIN).glob("*/*")):
        breaker(folder, folder.name)
    return brats


def _target(brats: Path, tmp_path: Path, *extra: str) -> list[str]:
    return [
        "target",
        "init=none",
        f"data.root={brats}",
        f"runs_dir={tmp_path / 'runs'}",
        f"data.cache_dir={tmp_path / 'cache'}",
        "portion=50",
        "data.test_size=8",
        "data.pool_size=16",
        "trainer.max_epochs=1",
        *SMALL,
        *extra,
    ]


def _left_behind(tmp_path: Path) -> list[str]:
    """What a failed run left: anything under the run root, any cache entry."""
    runs = sorted(str(p) for p in (tmp_path / "runs").rglob("*"))
    return runs + sorted(str(p) for p in (tmp_path / "cache").rglob("*.npz"))


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_data_file_is_one_line_exit_2_and_leaves_nothing(case, tiny_default, tmp_path, capsys, monkeypatch):
    """Each bad file of the catalogue: exit status 2, one error line naming the file and what is
    wrong, no traceback, and nothing left behind: no run folder, no lock, no cache entry."""
    monkeypatch.delenv("TMERGE_DEBUG", raising=False)
    breaker, file_pattern, phrase = BAD_FILES[case]
    brats = _broken_brats(tiny_default, tmp_path, breaker)
    status, err = run(_target(brats, tmp_path), capsys)
    assert status == 2, err
    errors = [line for line in err.splitlines() if line.startswith("tmerge target: error: ")]
    assert len(errors) == 1 and errors[0] == err.strip().splitlines()[-1] and "Traceback" not in err
    assert phrase in errors[0]
    # The file by its path, or (geometry, an all-zero subject) by its name after the subject's.
    path = re.escape(str(brats / TRAIN)) + r"/[HL]GG/(Brats18_\w+)/\1" + file_pattern
    name = r"subject (Brats18_\w+): .*\b\1" + file_pattern
    assert re.search(path, errors[0]) or re.search(name, errors[0]), errors[0]
    assert not _left_behind(tmp_path)


def _fake_target_run(root: Path, runs: Path) -> Path:
    """A finished target run (config, weights, marker) of a small network, as predict reads it."""
    from tmerge.config import compose, save_config
    from tmerge.nets import Isensee2017
    from tmerge.runs import CONFIG_FILE, NET_FILE, TARGET_MARKER, save_net
    from tmerge.stages.configs import TargetStageConfig

    run_dir = runs / "brats" / "p50" / "none"
    settings = ["init=none", f"data.root={root}", "data.portion=50", "data.n4=false", "loss.sw_roi=32"]
    cfg = compose(TargetStageConfig, None, [*settings, *SMALL])
    save_config(cfg, run_dir / CONFIG_FILE)
    net = Isensee2017(4, 3, base_filters=4, depth=3)
    meta = {"arch": "Isensee2017", "in_channels": 4, "n_classes": 3, "base_filters": 4, "depth": 3}
    save_net(run_dir / NET_FILE, net, meta)
    (run_dir / TARGET_MARKER).write_text("{}")
    return run_dir


def test_predict_names_a_case_with_a_blank_modality_and_skips_it(tiny_default, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("TMERGE_DEBUG", raising=False)
    run_dir = _fake_target_run(tiny_default / "brats", tmp_path / "runs")
    cases = tmp_path / "cases"
    good, bad = sorted((tiny_default / "brats" / TRAIN).glob("*/*"))[:2]
    for folder in (good, bad):
        shutil.copytree(folder, cases / folder.name)
    _blank(0.0)(cases / bad.name, bad.name)
    out = tmp_path / "out"
    status, err = run(["predict", f"run={run_dir}", f"input={cases}", f"output={out}"], capsys)
    assert status == 2 and "Traceback" not in err
    t1 = cases / bad.name / f"{bad.name}_t1.nii.gz"
    assert f"predict: {bad.name} skipped: {t1} (subject {bad.name}): this modality is blank (all zero)" in err
    assert "set allow_blank_modality=true to accept it" in err  # predict's own key
    assert "1 of 2 case(s) could not be read" in err.strip().splitlines()[-1]
    assert sorted(p.name for p in out.iterdir()) == [f"{good.name}.nii.gz"]
    # Accepted on request: both cases predicted.
    status, err = run(
        ["predict", f"run={run_dir}", f"input={cases}", f"output={out}", "allow_blank_modality=true"], capsys
    )
    assert status == 0, err
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{f.name}.nii.gz" for f in (good, bad))


@pytest.mark.slow
def test_a_corrected_run_after_refused_ones_works(tiny_default, tmp_path, capsys, monkeypatch):
    """After a trainer setting and a blank modality were refused (leaving nothing), the same
    data with the settings corrected and the blank sequence accepted trains and tests."""
    monkeypatch.delenv("TMERGE_DEBUG", raising=False)
    brats = _broken_brats(tiny_default, tmp_path, _blank(0.0))
    quick = ["trainer.limit_train_batches=1", "trainer.limit_val_batches=1", "loss.sw_roi=32", "data.n4=false"]
    status, err = run(_target(brats, tmp_path, *quick, "trainer.accelerator=cpu", "trainer.devices=[0]"), capsys)
    assert status == 2 and "trainer.devices: got [0]" in err and not _left_behind(tmp_path)
    status, err = run(_target(brats, tmp_path, *quick), capsys)
    assert status == 2 and "this modality is blank" in err and not _left_behind(tmp_path)
    status, err = run(_target(brats, tmp_path, *quick, "data.allow_blank_modality=true"), capsys)
    assert status == 0, err
    assert (tmp_path / "runs" / "brats" / "p50" / "none" / "test_summary.json").is_file()
