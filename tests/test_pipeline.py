"""End to end through the CLI on tiny generated data: task1 → task2 → timm, the other
initialisations, skipping finished runs, and the errors a user meets on the way."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import nibabel as nib
import numpy as np
import pytest
import torch
from helpers.tiny_settings import TINY_ARGS, tiny_brats
from safetensors import safe_open
from safetensors.torch import load_file

from tmerge.cli import main
from tmerge.io import file_sha256

pytestmark = pytest.mark.slow

TINY = list(TINY_ARGS)


@pytest.fixture(scope="module")
def runs(tiny_default, tmp_path_factory):
    """task1 and task2 trained once for the whole module."""
    runs = tmp_path_factory.mktemp("runs")
    hcp = [f"data.root={tiny_default / 'hcp'}", f"runs_dir={runs}", *TINY]
    assert main(["task1", *hcp]) == 0
    assert main(["task2", *hcp]) == 0
    return runs


def brats_args(tiny_default, runs):
    return [*tiny_brats(tiny_default, runs), "adaption.max_epochs=1", *TINY]


def test_source_runs_write_their_artefacts(runs):
    for name in ("task1", "task2"):
        run = runs / name
        for f in (
            "model.ckpt",
            "net.safetensors",
            "fisher.safetensors",
            "splits.json",
            "config.yaml",
            "metrics.json",
        ):
            assert (run / f).is_file(), f"{run / f} missing"
        metrics = json.loads((run / "metrics.json").read_text())
        assert 0.0 <= metrics["val_dice"] <= 1.0
        assert len(metrics["val_dice_per_class"]) == 7
        fisher = load_file(str(run / "fisher.safetensors"))
        net = load_file(str(run / "net.safetensors"))
        # every fused parameter (convolutions except the heads) has a finite, non-negative Fisher
        assert set(fisher) == {n for n in net if not n.startswith("seg_heads") and n.endswith("conv.weight")}
        for name_, f in fisher.items():
            assert f.shape == net[name_].shape and torch.isfinite(f).all() and (f >= 0).all()
    assert json.loads((runs / "task1" / "metrics.json").read_text())["distance_from_init"] is None
    # θ₀ of the model trained from scratch, hash-linked from its trained weights.
    init = runs / "task1" / "init.safetensors"
    meta = json.loads(safe_open(str(runs / "task1" / "net.safetensors"), "pt").metadata()["tmerge"])
    assert meta["init_sha256"] == file_sha256(init) and not (runs / "task2" / "init.safetensors").exists()
    assert set(load_file(str(init))) == set(load_file(str(runs / "task1" / "net.safetensors")))


def test_task2_records_its_distance_from_task1(runs):
    """metrics.json of M2 holds, per fused layer, ‖θ₂ − θ₁‖/‖θ₁‖ and the cosine, computed here
    independently from the two weight files."""
    m1 = load_file(str(runs / "task1" / "net.safetensors"))
    m2 = load_file(str(runs / "task2" / "net.safetensors"))
    distance = json.loads((runs / "task2" / "metrics.json").read_text())["distance_from_init"]
    convs = {n[: -len(".weight")] for n in m1 if n.endswith("conv.weight") and not n.startswith("seg_heads")}
    assert distance["from"] == "task1" and set(distance["per_layer"]) == convs
    name = "encoder.1.context.block1.conv"  # a layer of one tensor (the convolutions have no bias)
    a, b = m1[f"{name}.weight"].flatten().double(), m2[f"{name}.weight"].flatten().double()
    got = distance["per_layer"][name]
    assert got["rel_distance"] == pytest.approx(float((b - a).norm() / a.norm()), rel=1e-6)
    assert got["cosine"] == pytest.approx(float(a @ b / (a.norm() * b.norm())), rel=1e-6)
    values = [v["rel_distance"] for v in distance["per_layer"].values()]
    assert distance["rel_distance_min"] == pytest.approx(min(values))
    assert distance["rel_distance_max"] == pytest.approx(max(values))


def test_task2_starts_from_task1(runs):
    """M2 is trained incrementally from M1: with one tiny epoch its fused weights stay close to
    M1's and far closer than to a fresh initialisation."""
    m1 = load_file(str(runs / "task1" / "net.safetensors"))
    m2 = load_file(str(runs / "task2" / "net.safetensors"))
    name = "encoder.1.conv.conv.weight"
    fresh = torch.nn.init.kaiming_normal_(torch.empty_like(m1[name]), a=0.01)
    assert (m2[name] - m1[name]).norm() < 0.5 * (fresh - m1[name]).norm()


def test_finished_run_is_skipped(runs, tiny_default, caplog):
    hcp = [f"data.root={tiny_default / 'hcp'}", f"runs_dir={runs}", *TINY]
    before = (runs / "task1" / "metrics.json").stat().st_mtime_ns
    assert main(["task1", *hcp]) == 0
    assert (runs / "task1" / "metrics.json").stat().st_mtime_ns == before


def test_changed_config_is_refused(runs, tiny_default, capsys):
    hcp = [f"data.root={tiny_default / 'hcp'}", f"runs_dir={runs}", *TINY, "optim.lr=0.1"]
    assert main(["task1", *hcp]) == 2
    assert "different config" in capsys.readouterr().err


def test_timm_end_to_end(runs, tiny_default):
    assert main(["timm", *brats_args(tiny_default, runs)]) == 0
    run = runs / "brats" / "p50" / "timm"
    summary = json.loads((run / "test_summary.json").read_text())
    assert set(summary) == {"n", "dice", "hd95"} and summary["n"] == 8
    assert set(summary["dice"]) == {"ET", "TC", "WT", "mean"} and set(summary["hd95"]) == {"ET", "TC", "WT"}
    assert all(0.0 <= v <= 1.0 for v in summary["dice"].values())
    assert all(v >= 0.0 for v in summary["hd95"].values())
    alphas = json.loads((run / "alphas.json").read_text())
    assert alphas["sources"] == ["task1", "task2"]
    assert alphas["eps"] == 1e-8  # adaption.eps, with which forgetting's T-IMM row merges
    for pair in alphas["alphas"].values():
        assert len(pair) == 2 and abs(sum(pair) - 1) < 1e-5 and min(pair) >= 0
    stages = json.loads((run / "stages.json").read_text())
    assert {"adaption", "finetune"} <= set(stages)
    assert stages["protocol"] == "fixed"  # the embedded default (experiments/brats.yaml)
    # α after every adaption epoch; the final α are the last epoch's (no selection under the
    # fixed protocol; under the paper's, those of the best epoch).
    assert len(alphas["trajectory"]) == stages["adaption"]["epochs"] >= 1
    kept = alphas["best_epoch"] if alphas["best_epoch"] is not None else stages["adaption"]["epochs"]
    best = next(e for e in alphas["trajectory"] if e["epoch"] == kept)
    for layer, pair in alphas["alphas"].items():
        assert best["alphas"][layer] == pytest.approx(pair), layer
    assert stages["specific"] == "reinit" and stages["fisher_normalize"] == "per_tensor"
    rows = (run / "test_per_subject.csv").read_text().splitlines()
    assert rows[0] == "subject,dice_ET,dice_TC,dice_WT,dice_mean,hd95_ET,hd95_TC,hd95_WT" and len(rows) == 9
    # One label map per test subject, in the geometry of the subject's own files.
    subjects = [r.split(",")[0] for r in rows[1:]]
    assert sorted(p.name for p in (run / "predictions").glob("*.nii.gz")) == [f"{s}.nii.gz" for s in subjects]
    [image] = (tiny_default / "brats").glob(f"*/*/{subjects[0]}/{subjects[0]}_t1.nii.gz")
    written, original = nib.load(run / "predictions" / f"{subjects[0]}.nii.gz"), nib.load(image)
    assert written.shape == original.shape and np.allclose(written.affine, original.affine)
    assert set(np.unique(np.asarray(written.dataobj))) <= {0, 1, 2, 4}
    assert not (run / "predictions" / "validation").exists()  # only the 100 % portion has one


def test_full_portion_exports_the_unlabelled_set(runs, tiny_default):
    """portion=100: the test subjects validate, and the unlabelled BraTS validation set is
    predicted into predictions/validation/ under the submission naming <Brats18_ID>.nii.gz, which
    `tmerge score` grades against the held-out labels."""
    args = [a.replace("portion=50", "portion=100") for a in brats_args(tiny_default, runs)]
    assert main(["target", "init=none", *args]) == 0
    run = runs / "brats" / "p100" / "none"
    exported = sorted(p.name for p in (run / "predictions" / "validation").glob("*.nii.gz"))
    validation = tiny_default / "brats" / "MICCAI_BraTS_2018_Data_Validation"
    folders = sorted(p.name for p in validation.iterdir() if p.is_dir() and not p.name.startswith("."))
    assert exported == [f"{f}.nii.gz" for f in folders] and len(exported) == 2
    assert json.loads((run / "test_summary.json").read_text())["n"] == 8
    # The embedded online set is graded like a leaderboard submission, with the held-out labels.
    labels = tiny_default / "brats-validation-labels"
    out = run / "leaderboard"
    assert main(["score", f"predictions={run / 'predictions' / 'validation'}", f"labels={labels}", f"out={out}"]) == 0
    graded = json.loads((out / "scores_summary.json").read_text())
    assert graded["n"] == 2 and set(graded["dice"]) == {"ET", "TC", "WT", "mean"}


@pytest.mark.parametrize("init", ["none", "m2", "imm", "mean-imm"])
def test_other_initialisations(runs, tiny_default, init):
    assert main(["target", f"init={init}", *brats_args(tiny_default, runs)]) == 0
    assert (runs / "brats" / "p50" / init / "test_summary.json").is_file()


def test_task_vector_init_chooses_its_grid_on_validation(runs, tiny_default):
    """ties with k ∈ {20, 100}: each candidate's P is frozen while S adapts; the one with the lower
    validation loss is fine-tuned, and selection.json says so."""
    args = [*brats_args(tiny_default, runs), "init=ties", "merge.k=[20,100]"]
    assert main(["target", *args]) == 0
    run = runs / "brats" / "p50" / "ties"
    selection = json.loads((run / "selection.json").read_text())
    assert [c["params"]["k"] for c in selection["candidates"]] == [20, 100]
    best = min(selection["candidates"], key=lambda c: c["val_loss"])
    assert selection["chosen"] == best["params"]
    assert json.loads((run / "stages.json").read_text())["merge"]["params"] == best["params"]
    assert (run / "test_summary.json").is_file()


def test_missing_source_is_one_clear_error(tiny_default, tmp_path, capsys):
    args = brats_args(tiny_default, tmp_path)
    assert main(["timm", *args]) == 2
    err = capsys.readouterr().err
    assert "task1" in err and "net.safetensors" in err and "Traceback" not in err
    assert not (tmp_path / "brats").exists()  # nothing written into a run folder


def test_task2_without_task1_is_one_clear_error(tiny_default, tmp_path, capsys):
    assert main(["task2", f"data.root={tiny_default / 'hcp'}", f"runs_dir={tmp_path}", *TINY]) == 2
    err = capsys.readouterr().err
    assert "task1" in err and "make task1" in err
    assert not (tmp_path / "task2").exists()


def test_timm_under_ddp_agrees_across_ranks(runs, tiny_default, tmp_path):
    """Adaption and fine-tuning on two CPU processes: both ranks end with the same α, and every
    test subject is scored exactly once."""
    ddp_runs = tmp_path / "runs"
    for name in ("task1", "task2"):
        shutil.copytree(runs / name, ddp_runs / name)
    cmd = [
        sys.executable,
        "-m",
        "tmerge.cli",
        "timm",
        *brats_args(tiny_default, ddp_runs),
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "trainer.strategy=ddp",
    ]
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    run = ddp_runs / "brats" / "p50" / "timm"
    alphas = json.loads((run / "alphas.json").read_text())
    assert alphas["world_size"] == 2 and alphas["ranks_agree"] is True
    rows = (run / "test_per_subject.csv").read_text().splitlines()[1:]
    subjects = [r.split(",")[0] for r in rows]
    assert len(subjects) == len(set(subjects)) == 8


def test_all_hcp_baseline_is_named_by_its_labels(tiny_default, runs):
    """``tmerge source labels=8-14 split=all`` trains on all 46 training subjects → runs/all-hcp-8-14."""
    hcp = [f"data.root={tiny_default / 'hcp'}", f"runs_dir={runs}", *TINY]
    assert main(["source", "labels=8-14", "split=all", *hcp]) == 0
    run = runs / "all-hcp-8-14"
    splits = json.loads((run / "splits.json").read_text())
    assert len(splits["train"]) == 36 and len(splits["val"]) == 10
    assert (run / "fisher.safetensors").is_file()


def test_forgetting_table(tiny_default, runs):
    """Table 4 from the trained sources (and the T-IMM α when the timm run exists)."""
    args = [
        f"data.root={tiny_default / 'hcp'}",
        f"runs_dir={runs}",
        "portion=50",
        *TINY[:3],
        "loss.sw_roi=32",
    ]
    assert main(["forgetting", *args]) == 0
    table = json.loads((runs / "forgetting" / "p50" / "table4.json").read_text())
    assert {"M1", "M2", "IMM"} <= set(table)
    for row in table.values():
        assert set(row) == {"labels 1:7", "labels 8:14"} and all(0.0 <= v <= 1.0 for v in row.values())
    assert "| M1 |" in (runs / "forgetting" / "p50" / "table4.md").read_text()
    # Fig. 3's example: one axial slice of one test subject, every candidate per source task
    with np.load(runs / "forgetting" / "p50" / "examples.npz") as examples:
        meta = json.loads(str(examples["meta"]))
        assert [t["name"] for t in meta["tasks"]] == ["task1", "task2"]
        for task in ("task1", "task2"):
            image = examples[f"{task}/image"]
            assert image.ndim == 2 and examples[f"{task}/truth"].shape == image.shape
            for row in table:
                assert examples[f"{task}/{row}"].shape == image.shape


def test_timm_with_channel_map_merges_the_first_layer(runs, tiny_default):
    """With channel_map the 2-channel HCP input layer feeds the 4 BraTS channels and stays in P."""
    args = [a.replace("portion=50", "portion=25") for a in brats_args(tiny_default, runs)]
    assert main(["timm", "channel_map=[0,0,1,1]", *args]) == 0
    alphas = json.loads((runs / "brats" / "p25" / "timm" / "alphas.json").read_text())
    # depth 3: 9 encoder + 6 decoder convolutions are fused, the input layer now among them
    assert "encoder.0.conv.conv" in alphas["layers"] and len(alphas["layers"]) == 15


def test_wandb_agent_call_is_one_run_per_process(runs, tiny_default, tmp_path):
    """The sweep YAML's command, rendered by wandb's own agent code for one grid point and run
    as the agent runs it (WANDB_SWEEP_ID / WANDB_RUN_ID / WANDB_SWEEP_PARAM_PATH set, offline):
    T-IMM's adaption and fine-tune stages log into the one run the agent pinned, under their
    stage prefixes, and the run folder is the per-seed one."""
    import yaml
    from wandb.sdk.launch.sweeps.utils import create_sweep_command, create_sweep_command_args
    from wandb.sdk.lib import config_util

    sweep = yaml.safe_load(open("experiments/sweeps/brats.yaml"))
    point = {"init": "timm", "seed": 1, "portion": 50}
    assert all(point[k] in sweep["parameters"][k]["values"] for k in ("init", "seed")), "not on the grid"
    fixed = {k: p["value"] for k, p in sweep["parameters"].items() if "value" in p}
    fixed["logger.wandb.mode"] = "offline"  # the test's only change: nothing leaves the machine
    tiny = dict(a.split("=", 1) for a in brats_args(tiny_default, runs) if not a.startswith("portion="))
    args = {k: {"value": v} for k, v in {**point, **fixed, **tiny}.items()}
    sweep_vars = create_sweep_command_args({"args": args})
    command = []
    for part in create_sweep_command(sweep["command"]):
        command += sweep_vars[part[2:-1]] if part.startswith("${") else [part]
    assert command[:2] == ["tmerge", "target"] and "init=timm" in command and "seed_folder=True" in command
    command[0] = os.path.join(os.path.dirname(sys.executable), "tmerge")
    params = tmp_path / "sweep-params.yaml"
    config_util.save_config_file_from_dict(str(params), args)
    env = {
        **os.environ,
        "WANDB_MODE": "offline",
        "WANDB_SWEEP_ID": "sw33p1d",
        "WANDB_RUN_ID": "agentrun1",
        "WANDB_SWEEP_PARAM_PATH": str(params),
        "WANDB_DIR": str(tmp_path),
        "OMP_NUM_THREADS": "1",
    }
    proc = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    run = runs / "brats" / "p50" / "seed1" / "timm"
    assert (run / "test_summary.json").is_file() and (run / "alphas.json").is_file()
    folders = list((runs / "wandb").glob("offline-run-*"))
    assert [f.name.rsplit("-", 1)[1] for f in folders] == ["agentrun1"], "one run, the agent's"
    path = folders[0] / "run-agentrun1.wandb"
    for _ in range(150):  # wandb's service may still be flushing the record
        if b"test/per_subject" in path.read_bytes():
            break
        time.sleep(0.2)
    record = path.read_bytes()
    # the fixed protocol (the default) never validates: the stages log training losses and α
    keys = (b"adaption/train/loss", b"finetune/train/loss", b"finetune/test/dice", b"adaption/alphas")
    for key in (*keys, b"test/per_subject", b"sw33p1d"):
        assert key in record, key
    artifacts = [r.artifact for r in _wandb_records(path) if r.WhichOneof("record_type") == "artifact"]
    [artifact] = [a for a in artifacts if a.type != "run_table"]  # W&B keeps tables as artifacts too
    assert (artifact.name, artifact.type) == ("brats-p50-timm-seed1", "target-model")
    hashes = json.loads(artifact.metadata)["sha256"]
    assert hashes == {f: file_sha256(run / f) for f in ("net.safetensors", "stages.json", "test_summary.json")}


def _wandb_records(path):
    """The protobuf records of an offline run's ``.wandb`` file (a LevelDB-style log: a 7-byte
    header, then 32 KiB blocks of chunks with a 7-byte header: crc, length, type)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, block, buf = path.read_bytes(), 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        if kind == 0:
            break
        buf += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last chunk of one
            record = pb.Record()
            record.ParseFromString(buf)
            yield record
            buf = b""


def test_sources_logged_as_artifacts_resolve_offline(tiny_default, tmp_path, monkeypatch):
    """task1 and task2 in an offline W&B run log their weights, Fisher, θ₀ and marker as artifacts
    with their sha256; read back from the run record, the staged files are the run's. Put into
    the local artifact cache (as `wandb artifact get` would), they serve as sources by reference."""
    from tmerge.artifacts import RECORD, cache_dir

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "wandb-data"))
    runs = tmp_path / "runs"
    hcp = [f"data.root={tiny_default / 'hcp'}", f"runs_dir={runs}", *TINY]
    assert main(["task1", *hcp]) == 0 and main(["task2", *hcp]) == 0
    refs = []
    for record_file in sorted((runs / "wandb").glob("offline-run-*/run-*.wandb")):
        for record in _wandb_records(record_file):
            if record.WhichOneof("record_type") != "artifact" or record.artifact.type == "run_table":
                continue
            artifact = record.artifact
            assert artifact.type == "source-model"
            files = {e.path: e.local_path for e in artifact.manifest.contents}
            # θ₀ (init.safetensors) is task1's: task2 starts from task1 and has none of its own.
            extra = ["init.safetensors"] if artifact.name == "task1" else []
            assert sorted(files) == sorted(["fisher.safetensors", "metrics.json", "net.safetensors", *extra])
            metadata = json.loads(artifact.metadata)
            assert metadata["base_filters"] == 4 and metadata["fisher_sha256"] == metadata["sha256"]["fisher.safetensors"]
            for name, staged in files.items():
                assert file_sha256(staged) == file_sha256(runs / artifact.name / name) == metadata["sha256"][name]
            ref = f"wandb:lab/tmerge/{artifact.name}:v0"
            folder = cache_dir(runs, ref)
            folder.mkdir(parents=True)
            for name, staged in files.items():
                shutil.copyfile(staged, folder / name)
            (folder / RECORD).write_text(json.dumps({"ref": ref, "version": "v0", "metadata": metadata}))
            refs.append(ref)
    assert sorted(refs) == ["wandb:lab/tmerge/task1:v0", "wandb:lab/tmerge/task2:v0"]
    for name in ("task1", "task2"):
        shutil.rmtree(runs / name)  # the references alone must do
    args = brats_args(tiny_default, runs)
    assert main(["target", "init=imm", f"sources=[{','.join(refs)}]", *args]) == 0
    stages = json.loads((runs / "brats" / "p50" / "imm" / "stages.json").read_text())
    assert stages["sources"] == refs


def test_a_registered_initialisation_runs_in_a_sweep(runs, tiny_default, monkeypatch):
    """Adding an initialisation is one registry entry: here M1's P at half scale (S fresh), run
    by name in a sweep beside `none`, with nothing else changed."""
    from tmerge.nets import partition
    from tmerge.stages import inits

    calls = []

    def half_m1(ctx):
        calls.append([s.name for s in ctx.sources])
        fused, _ = partition(ctx.net)
        state, source = ctx.net.state_dict(), ctx.sources[0].state
        halved = {n: 0.5 * source[n] for n in fused if source[n].shape == state[n].shape}
        ctx.net.load_state_dict({**state, **halved})
        return inits.Initialised(ctx.net)

    monkeypatch.setitem(inits.INITS, "half-m1", inits.Initialisation(half_m1, inits.nth_source(0)))
    assert main(["sweep", "inits=[none,half-m1]", *brats_args(tiny_default, runs)]) == 0
    assert calls == [["task1"]]  # built once, from the source the entry named
    run = runs / "brats" / "p50" / "half-m1"
    assert json.loads((run / "stages.json").read_text())["init"] == "half-m1"
    assert json.loads((run / "test_summary.json").read_text())["n"] == 8


def _finished_target(runs, tiny_default):
    """A finished target run of the module's sources (none: the quickest)."""
    assert main(["target", "init=none", *brats_args(tiny_default, runs)]) == 0  # skipped if finished
    return runs / "brats" / "p50" / "none"


def test_predict_reproduces_the_runs_predictions_and_skips_a_bad_case(runs, tiny_default, tmp_path, capsys):
    """`tmerge predict` on the run's test cases writes what the run wrote, voxel for voxel; a
    truncated case is named and skipped, the others go on, and the exit status says so."""
    run = _finished_target(runs, tiny_default)
    test_cases = json.loads((run / "splits.json").read_text())["test"]
    cases = tmp_path / "cases"
    for case in test_cases:
        [folder] = (tiny_default / "brats").glob(f"*/*/{case}")
        shutil.copytree(folder, cases / case)
    bad = cases / "Brats18_BAD_0001_1"
    shutil.copytree(cases / test_cases[0], bad)
    for f in list(bad.iterdir()):
        f.rename(bad / f.name.replace(test_cases[0], bad.name))
    t1 = bad / f"{bad.name}_t1.nii.gz"
    t1.write_bytes(t1.read_bytes()[:200])
    out = tmp_path / "out"
    assert main(["predict", f"run={run}", f"input={cases}", f"output={out}"]) == 2
    err = capsys.readouterr().err
    assert str(t1) in err and "1 of 9 case(s) could not be read" in err and "Traceback" not in err
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{c}.nii.gz" for c in test_cases)
    for case in test_cases:
        mine, theirs = nib.load(out / f"{case}.nii.gz"), nib.load(run / "predictions" / f"{case}.nii.gz")
        assert np.array_equal(mine.affine, theirs.affine), case
        assert np.array_equal(np.asarray(mine.dataobj), np.asarray(theirs.dataobj)), case
    # One case by one of its files, with mirroring TTA: a label map of the case's own geometry.
    one = cases / test_cases[1] / f"{test_cases[1]}_flair.nii.gz"
    assert main(["predict", f"run={run}", f"input={one}", f"output={tmp_path / 'tta'}", "tta=true"]) == 0
    written = nib.load(tmp_path / "tta" / f"{test_cases[1]}.nii.gz")
    assert written.shape == nib.load(one).shape and np.array_equal(written.affine, nib.load(one).affine)
    assert set(np.unique(np.asarray(written.dataobj))) <= {0, 1, 2, 4}
    # The same case as a BraTS 2023 folder: the same map, in that layout's values (3 = enhancing).
    case = "BraTS-GLI-00001-000"
    (tmp_path / "brats2023" / case).mkdir(parents=True)
    for old, new in {"t1": "t1n", "t1ce": "t1c", "t2": "t2w", "flair": "t2f"}.items():
        source = cases / test_cases[0] / f"{test_cases[0]}_{old}.nii.gz"
        shutil.copyfile(source, tmp_path / "brats2023" / case / f"{case}-{new}.nii.gz")
    assert main(["predict", f"run={run}", f"input={tmp_path / 'brats2023' / case}", f"output={tmp_path / 'p23'}"]) == 0
    as_2023 = np.asarray(nib.load(tmp_path / "p23" / f"{case}.nii.gz").dataobj)
    as_2018 = np.asarray(nib.load(run / "predictions" / f"{test_cases[0]}.nii.gz").dataobj)
    assert (as_2018 == 4).any(), "the check below needs enhancing voxels"
    assert np.array_equal(as_2023, np.where(as_2018 == 4, 3, as_2018)) and not (as_2023 == 4).any()


def test_export_round_trip_gives_the_checkpoints_logits(runs, tiny_default, tmp_path):
    from tmerge.nets import Isensee2017
    from tmerge.runs import best_state_dict

    run = _finished_target(runs, tiny_default)
    out = tmp_path / "export"
    assert main(["export", f"run={run}", f"out={out}"]) == 0
    spec = json.loads((out / "model.json").read_text())
    assert spec["channels"] == ["t1", "t1ce", "t2", "flair"] and spec["output_mode"] == "sigmoid"
    assert set(spec["label_map"]) == {"0", "1", "2", "4"} and spec["classes"] == ["ET", "TC", "WT"]
    assert spec["sha256"]["model.pt"] == file_sha256(out / "model.pt")
    # Independently of the exporter: a fresh network with the run's best checkpoint.
    net = Isensee2017(4, 3, base_filters=4, depth=3).eval()
    net.load_state_dict(best_state_dict(run / "model.ckpt"))
    traced = torch.jit.load(str(out / "model.pt"))
    x = torch.randn(2, 4, 32, 32, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(traced(x), net(x))
    weights = load_file(str(out / "model.safetensors"))
    assert all(torch.equal(weights[k], v) for k, v in net.state_dict().items())
