"""Crashes, pre-emption and odd files: resuming after a kill, SIGTERM, locks, NaN guards, safe
loading, bad sources, and reproducible runs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers.sources import fake_source
from helpers.tiny_settings import TINY_NET

from tmerge.callbacks import NonFiniteGuard
from tmerge.cli import main
from tmerge.errors import NonFiniteError, RunError
from tmerge.resume import checkpoint_progress, run_lock
from tmerge.runs import best_state_dict

# Seconds per epoch on two cores, several epochs to interrupt.
TINY = [
    *TINY_NET,
    "data.batch_size=2",
    "data.samples_per_volume=1",
    "trainer.limit_train_batches=3",
    "trainer.limit_val_batches=1",
    "trainer.patience=100",
    "loss.sw_roi=32",
]


def hcp_args(tiny_default: Path, runs: Path, epochs: int) -> list[str]:
    return [f"data.root={tiny_default / 'hcp'}", f"runs_dir={runs}", f"trainer.max_epochs={epochs}", *TINY]


def start_cli(args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "tmerge.cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 240) -> None:
    end = time.monotonic() + timeout
    while not path.is_file():
        if proc.poll() is not None:
            raise AssertionError(f"process ended before {path} appeared:\n{proc.stderr.read()[-3000:]}")
        if time.monotonic() > end:
            proc.kill()
            raise AssertionError(f"{path} did not appear in {timeout} s")
        time.sleep(0.05)


# ---- resume ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_killed_training_resumes_and_finishes(tiny_default, tmp_path, capsys):
    runs = tmp_path / "runs"
    args = ["task1", *hcp_args(tiny_default, runs, epochs=6)]
    proc = start_cli(args)
    last = runs / "task1" / "last.ckpt"
    wait_for(last, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    epoch, step = checkpoint_progress(last)
    assert 0 <= epoch < 5 and step > 0 and not (runs / "task1" / "metrics.json").exists()

    assert main(args) == 0
    err = capsys.readouterr().err
    assert f"resuming from {last} (saved in epoch {epoch + 1}, after step {step})" in err
    metrics = json.loads((runs / "task1" / "metrics.json").read_text())
    assert metrics["epochs"] == 6  # the epoch count continued rather than restarting
    assert checkpoint_progress(last)[0] == 5  # 0-based: the sixth epoch
    record = json.loads((runs / "task1" / "run.json").read_text())
    assert len(record["attempts"]) == 2 and record["seed"] == 0
    # A third call finds the finished run and skips it.
    assert main(args) == 0
    assert "is finished" in capsys.readouterr().err


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_exits_143(tiny_default, tmp_path):
    runs = tmp_path / "runs"
    proc = start_cli(["task1", *hcp_args(tiny_default, runs, epochs=40)])
    last = runs / "task1" / "last.ckpt"
    wait_for(last, proc)  # training is under way
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-3000:]
    assert f"stopped by SIGTERM; {last} saved" in err
    assert checkpoint_progress(last)[0] < 39
    assert not (runs / "task1" / "metrics.json").exists()


# ---- safe loading -----------------------------------------------------------------------------


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {_Evil.marker}",))


def test_malicious_pickle_is_refused(tmp_path):
    _Evil.marker = tmp_path / "pwned"
    path = tmp_path / "last.ckpt"
    torch.save({"epoch": 3, "state_dict": {"net.w": _Evil()}}, path)
    with pytest.raises(RunError, match=str(path)):
        checkpoint_progress(path)
    with pytest.raises(RunError, match=str(path)):
        best_state_dict(str(path))
    assert not _Evil.marker.exists()


def test_truncated_checkpoint_is_one_clear_error(tmp_path):
    path = tmp_path / "last.ckpt"
    torch.save({"epoch": 2, "state_dict": {"net.w": torch.ones(1000)}}, path)
    assert checkpoint_progress(path) == (2, 0)
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(RunError, match=r"cannot resume from this checkpoint .*force=true"):
        checkpoint_progress(path)


# ---- guards -----------------------------------------------------------------------------------


def test_guard_names_the_step_and_subjects_on_cpu():
    guard = NonFiniteGuard(every=4)
    guard.observe(torch.tensor(0.5), step=0, epoch=0, batch_idx=0, subjects=["a", "b"])
    with pytest.raises(NonFiniteError, match=r"became nan at epoch 2, step 7 \(batch 3 .*subjects c, d\)"):
        guard.observe(torch.tensor(float("nan")), step=7, epoch=1, batch_idx=3, subjects=["c", "d"])


def test_guard_stops_every_rank_together():
    """Under DDP a rank whose own losses are finite stops too when another rank's was not
    (otherwise it would wait forever in the next all-reduce)."""
    guard = NonFiniteGuard()
    guard.any_rank = lambda flag: True  # another rank reports a NaN
    with pytest.raises(NonFiniteError, match="another DDP rank"):
        guard.observe(torch.tensor(0.5), step=0, epoch=0, batch_idx=0)
    quiet = NonFiniteGuard()
    quiet.any_rank = lambda flag: flag
    quiet.observe(torch.tensor(0.5), step=0, epoch=0, batch_idx=0)  # nobody had a NaN


def test_early_stopping_survives_a_resume():
    from types import SimpleNamespace

    from lightning.pytorch.callbacks import EarlyStopping

    from tmerge.callbacks import StopIfStopped

    stopper = EarlyStopping(monitor="val/dice", mode="max", patience=3)
    stopper.load_state_dict({"wait_count": 3, "stopped_epoch": 7, "best_score": torch.tensor(0.6), "patience": 3})
    trainer = SimpleNamespace(should_stop=False)
    StopIfStopped(stopper).on_train_start(trainer, None)
    assert trainer.should_stop
    stopper.wait_count = 1
    trainer.should_stop = False
    StopIfStopped(stopper).on_train_start(trainer, None)
    assert not trainer.should_stop


def test_nan_loss_stops_training_with_the_message(tiny_default, tmp_path):
    """A network whose output turns NaN on its third training call stops the fit there."""
    from tmerge.data.hcp import HCPDataModule
    from tmerge.modules.segmentation import SegmentationModule
    from tmerge.nets import Isensee2017
    from tmerge.runner import TrainerConfig, fit

    class Poisoned(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = Isensee2017(2, 8, base_filters=4, depth=3)
            self.calls = 0

        def forward(self, x):
            out = self.net(x)
            if self.training:
                self.calls += 1
                if self.calls == 3:
                    return out * float("nan")
            return out

    dm = HCPDataModule(root=str(tiny_default / "hcp"), split="task1", patch_size=16, samples_per_volume=1)
    module = SegmentationModule(Poisoned(), output_mode="softmax", class_names=dm.class_names, patch_size=16)
    cfg = TrainerConfig(max_epochs=2, limit_train_batches=5, limit_val_batches=1, accelerator="cpu")
    with pytest.raises(NonFiniteError, match=r"became nan at epoch 1, step 2 \(batch 2 .*subjects \w+"):
        fit(module, dm, run_dir=tmp_path / "run", trainer_cfg=cfg)


def test_second_process_on_a_locked_run_folder_is_refused(tiny_default, tmp_path, capsys):
    runs = tmp_path / "runs"
    with run_lock(runs / "task1"):  # as another process would hold it
        status = main(["task1", *hcp_args(tiny_default, runs, epochs=1)])
    err = capsys.readouterr().err
    assert status == 2 and "in use by another tmerge process" in err and f"pid {os.getpid()}" in err
    assert not (runs / "task1").exists()


# ---- bad sources --------------------------------------------------------------------------------

SMALL = list(TINY_NET)


def _source(runs: Path, name: str, n_classes: int = 8) -> None:
    fake_source(runs, name, n_classes=n_classes, fisher_hash=True)


def _timm(runs: Path, capsys) -> tuple[int, str]:
    status = main(["timm", f"runs_dir={runs}", "portion=4", *SMALL])
    return status, capsys.readouterr().err


def test_sources_with_different_label_counts_are_refused(tmp_path, capsys):
    _source(tmp_path, "task1")
    _source(tmp_path, "task2", n_classes=5)
    status, err = _timm(tmp_path, capsys)
    assert status == 2 and "same number of classes" in err and "task2: 5 outputs" in err
    assert not (tmp_path / "brats").exists()


def test_fisher_of_another_model_is_refused(tmp_path, capsys):
    _source(tmp_path, "task1")
    _source(tmp_path, "task2")
    # task2's Fisher replaced by one computed for other weights of the same architecture
    (tmp_path / "task1" / "fisher.safetensors").replace(tmp_path / "task2" / "fisher.safetensors")
    _source(tmp_path, "task1")
    status, err = _timm(tmp_path, capsys)
    assert status == 2 and "task2/fisher.safetensors: not the Fisher computed for" in err
    assert not (tmp_path / "brats").exists()


def test_fisher_of_another_shape_is_refused(tmp_path, capsys):
    from tmerge.io import write_safetensors

    _source(tmp_path, "task1")
    _source(tmp_path, "task2")
    path = tmp_path / "task2" / "fisher.safetensors"
    from safetensors.torch import load_file

    fisher = load_file(str(path))
    name = next(iter(fisher))
    write_safetensors(path, {**fisher, name: torch.rand(3, 3)})
    status, err = _timm(tmp_path, capsys)
    assert status == 2 and "Fisher of another model" in err and name in err
    assert not (tmp_path / "brats").exists()


def test_truncated_fisher_is_one_clear_error(tmp_path, capsys):
    _source(tmp_path, "task1")
    _source(tmp_path, "task2")
    path = tmp_path / "task1" / "fisher.safetensors"
    path.write_bytes(path.read_bytes()[:500])
    status, err = _timm(tmp_path, capsys)
    assert status == 2 and f"{path}: not a readable safetensors Fisher file" in err
    assert "Traceback" not in err and not (tmp_path / "brats").exists()


def test_config_typo_is_exit_2_and_writes_nothing(tmp_path, capsys):
    status = main(["timm", f"runs_dir={tmp_path}", "portion=4", "adaption.max_epoch=3"])
    assert status == 2 and "adaption.max_epoch" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


# ---- reproducibility ----------------------------------------------------------------------------


@pytest.mark.slow
def test_identical_cpu_runs_give_identical_results(tiny_default, tmp_path):
    summaries = []
    for attempt in ("a", "b"):
        runs = tmp_path / attempt
        args = [
            "target",
            "init=none",
            f"data.root={tiny_default / 'brats'}",
            f"runs_dir={runs}",
            "portion=50",
            "data.test_size=8",
            "data.pool_size=16",
            "trainer.max_epochs=2",
            *TINY,
        ]
        assert main(args) == 0
        run = runs / "brats" / "p50" / "none"
        summaries.append((run / "test_summary.json").read_text())
        splits = json.loads((run / "splits.json").read_text())
        record = json.loads((run / "run.json").read_text())
        assert record["seed"] == 0 and "commit" in record and (run / "config.yaml").is_file()
    assert summaries[0] == summaries[1]
    assert splits  # the same splits file was written for both (content compared via the summary)
