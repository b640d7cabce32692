"""SLURM: the sbatch and job-array templates render the commands they promise, and a run that
SLURM signals (SIGUSR1) and kills resumes from Lightning's requeue checkpoint."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tmerge.cli import main

ROOT = Path(__file__).resolve().parents[1]
TEMPLATES = ROOT / "experiments" / "slurm"
INITS = ["none", "m1", "m2", "imm", "mean-imm", "mean-timm", "timm"]


@pytest.fixture
def stub_bin(tmp_path):
    """A PATH folder whose ``srun`` prints the command it was given, one argument per line."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    srun = bin_dir / "srun"
    srun.write_text('#!/bin/bash\nprintf "%s\\n" "$@"\n')
    srun.chmod(0o755)
    return bin_dir


def _render(template: str, stub_bin: Path, args=(), **env) -> subprocess.CompletedProcess:
    environ = {"PATH": f"{stub_bin}:{os.environ['PATH']}", "HOME": os.environ.get("HOME", "/tmp"), **env}
    return subprocess.run(
        ["bash", str(TEMPLATES / template), *args], capture_output=True, text=True, env=environ, check=False
    )


@pytest.mark.parametrize("template", ["ddp.sbatch", "array.sbatch"])
def test_templates_are_valid_bash_with_requeue_settings(template):
    subprocess.run(["bash", "-n", str(TEMPLATES / template)], check=True)
    text = (TEMPLATES / template).read_text()
    assert "#SBATCH --signal=SIGUSR1@" in text and "#SBATCH --requeue" in text


def test_array_covers_the_grid_once(stub_bin):
    seen = []
    for task in range(len(INITS) * 3):
        proc = _render("array.sbatch", stub_bin, SLURM_ARRAY_TASK_ID=str(task))
        assert proc.returncode == 0, proc.stderr
        argv = proc.stdout.splitlines()
        assert argv[:2] == ["tmerge", "target"]
        overrides = dict(a.split("=", 1) for a in argv[2:])
        assert overrides["seed_folder"] == "true" and overrides["portion"] == "4"
        seen.append((overrides["init"], int(overrides["seed"])))
    assert sorted(seen) == sorted((i, s) for i in INITS for s in (0, 1, 2))
    # The first seven tasks are seed 0, in the order of INITS: a partial array still compares.
    assert seen[:7] == [(i, 0) for i in INITS]


def test_array_task_outside_the_grid_fails_with_a_message(stub_bin):
    proc = _render("array.sbatch", stub_bin, SLURM_ARRAY_TASK_ID="6", INITS="timm ties", SEEDS="0 1 2")
    assert proc.returncode == 2 and "outside the grid of 2 inits × 3 seeds (0-5)" in proc.stderr
    assert _render("array.sbatch", stub_bin).returncode != 0  # not an array job at all


def test_rendered_array_command_is_a_valid_tmerge_config(stub_bin, capsys):
    proc = _render("array.sbatch", stub_bin, ["data.batch_size=1"], SLURM_ARRAY_TASK_ID="13", PORTION="8")
    argv = proc.stdout.splitlines()
    assert argv[-1] == "data.batch_size=1"  # extra sbatch arguments pass through
    assert main([*argv[1:], "--show-config"]) == 0
    shown = capsys.readouterr().out
    assert "init: timm" in shown and "seed: 1" in shown  # 13 = 1 × 7 + 6 and "seed_folder: true" in shown
    assert "portion: 8" in shown and "accelerator: gpu" in shown


def test_ddp_template_runs_one_process_per_gpu(stub_bin, capsys):
    env = {"SLURM_NTASKS_PER_NODE": "2", "SLURM_NNODES": "3"}
    argv = _render("ddp.sbatch", stub_bin, **env).stdout.splitlines()
    assert argv == [
        "tmerge",
        "timm",
        "portion=4",
        "trainer.accelerator=gpu",
        "trainer.strategy=ddp",
        "trainer.devices=2",
        "trainer.num_nodes=3",
    ]
    argv = _render("ddp.sbatch", stub_bin, ["target", "init=imm", "portion=8"], **env).stdout.splitlines()
    assert argv[1:4] == ["target", "init=imm", "portion=8"]
    assert main([*argv[1:], "--show-config"]) == 0
    shown = capsys.readouterr().out
    assert "num_nodes: 3" in shown and "strategy: ddp" in shown and "init: imm" in shown


@pytest.mark.slow
def test_sigusr1_requeue_resumes_from_the_hpc_checkpoint(tmp_path):
    """SLURM signals the job (SIGUSR1) before its limit, Lightning saves hpc_ckpt_1.ckpt and calls
    ``scontrol requeue``, SLURM kills the job; the requeued job resumes from that checkpoint
    (after step 6, mid-epoch 2), not from the older last.ckpt of epoch 1."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "scontrol.calls"
    scontrol = bin_dir / "scontrol"
    scontrol.write_text(f'#!/bin/bash\necho "$@" >> {calls}\n')
    scontrol.chmod(0o755)
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NAME": "tmerge",
        "SLURM_NTASKS": "1",
        "SLURM_NTASKS_PER_NODE": "1",
        "SLURM_NNODES": "1",
        "SLURM_PROCID": "0",
        "SLURM_LOCALID": "0",
        "SLURM_NODEID": "0",
        "OMP_NUM_THREADS": "1",
    }
    worker = [sys.executable, str(ROOT / "tests" / "helpers" / "slurm_requeue_worker.py"), str(tmp_path / "run")]
    first = subprocess.run([*worker, "6"], capture_output=True, text=True, env=env, timeout=300, check=False)
    assert first.returncode == 137, first.stdout[-2000:] + first.stderr[-2000:]
    assert "preempted after step 6" in first.stdout
    assert sorted(p.name for p in (tmp_path / "run").glob("*.ckpt")) == ["hpc_ckpt_1.ckpt", "last.ckpt", "model.ckpt"]
    assert calls.read_text().split() == ["requeue", "4242"]

    second = subprocess.run(worker, capture_output=True, text=True, env=env, timeout=300, check=False)
    assert second.returncode == 0, second.stdout[-2000:] + second.stderr[-2000:]
    assert "hpc_ckpt_1.ckpt (saved in epoch 2, after step 6)" in second.stdout, second.stdout[-2000:]
    assert "finished after 3 epochs" in second.stdout
