"""Loggers: CSV always, one W&B run per process (offline by default), stages under their prefixes."""

from __future__ import annotations

import time

import pytest
from lightning.pytorch.loggers import CSVLogger, Logger

from tmerge.loggers import (
    LoggerConfig,
    StageLogger,
    WandbConfig,
    close_wandb,
    open_wandb,
    stage_loggers,
    wandb_loggers,
    wandb_run,
)


class Recorder(Logger):
    """A stand-in W&B run that records what reaches it."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[dict, int | None]] = []

    name = "recorder"
    version = "0"

    def log_metrics(self, metrics, step=None):
        self.calls.append((dict(metrics), step))

    def log_hyperparams(self, params, *args, **kwargs):
        raise AssertionError("a stage must not log hyper-parameters into the process's run")


def test_disabled_wandb_leaves_csv_only(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    run = open_wandb(LoggerConfig(WandbConfig(mode="disabled")), tmp_path, "x", {})
    assert run is None
    assert [type(lg) for lg in stage_loggers(tmp_path / "run", run, "finetune")] == [CSVLogger]
    assert not (tmp_path / "wandb").exists()


def test_environment_overrides_the_configured_mode(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert open_wandb(LoggerConfig(WandbConfig(mode="offline")), tmp_path, "x", {}) is None


def test_stage_logger_prefixes_every_key_and_keeps_the_step():
    inner = Recorder()
    stage = StageLogger(inner, "adaption")
    stage.log_metrics({"val/loss": 0.5, "train/loss": 0.7}, step=12)
    stage.log_hyperparams({"lr": 1.0})  # not forwarded (Recorder would raise)
    assert inner.calls == [({"adaption/val/loss": 0.5, "adaption/train/loss": 0.7}, 12)]
    assert stage.name == "recorder" and stage.version == "0"


def test_stage_loggers_without_a_stage_log_unprefixed(tmp_path):
    inner = Recorder()
    csv, run = stage_loggers(tmp_path / "run", inner)
    assert isinstance(csv, CSVLogger) and run is inner
    [adaption] = stage_loggers(tmp_path / "run" / "adaption", inner, "adaption")[1:]
    assert isinstance(adaption, StageLogger) and adaption.run is inner


def test_earlier_attempts_csv_is_kept(tmp_path):
    logs = tmp_path / "run" / "logs"
    logs.mkdir(parents=True)
    (logs / "metrics.csv").write_text("epoch\n0\n")
    stage_loggers(tmp_path / "run", None)
    assert (logs / "metrics.attempt1.csv").read_text() == "epoch\n0\n" and not (logs / "metrics.csv").exists()


def _record(folder, needle: bytes, timeout: float = 30.0) -> bytes:
    """The offline run's ``.wandb`` record, once wandb's service has flushed ``needle`` to it."""
    path = next(folder.glob("run-*.wandb"))
    end = time.monotonic() + timeout
    while needle not in (record := path.read_bytes()) and time.monotonic() < end:
        time.sleep(0.2)
    return record


def test_two_stages_log_into_one_offline_run(tmp_path, monkeypatch):
    """What T-IMM does: adaption, then fine-tune, in one process → one run, keys by stage."""
    monkeypatch.delenv("WANDB_MODE", raising=False)
    cfg = LoggerConfig(WandbConfig(mode="offline", group="brats-p4", tags=["p4", "timm"]))
    with wandb_run(cfg, tmp_path, "p4-timm", {"seed": 0}) as run:
        experiment = run.experiment
        assert experiment.group == "brats-p4" and set(experiment.tags) == {"p4", "timm"}
        assert experiment.config["seed"] == 0 and experiment.settings.mode == "offline"
        for stage, key in (("adaption", "val/loss"), ("finetune", "val/dice")):
            [_, logger] = stage_loggers(tmp_path / stage, run, stage)
            for step in range(3):
                logger.log_metrics({key: 1.0 / (step + 1)}, step=step)
        assert [lg for lg in wandb_loggers([logger])] == [run]
    [folder] = (tmp_path / "wandb").glob("offline-run-*")
    record = _record(folder, b"finetune/val/dice")
    assert b"adaption/val/loss" in record and b"finetune/val/dice" in record


def test_a_failing_stage_finishes_the_run_and_raises(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    import wandb

    with pytest.raises(RuntimeError, match="boom"):
        with wandb_run(LoggerConfig(WandbConfig(mode="offline")), tmp_path, "x", {}) as run:
            run.log_metrics({"a": 1.0}, step=0)
            raise RuntimeError("boom")
    assert wandb.run is None  # finished: the next process-level run starts afresh


def test_closing_a_run_that_never_started_does_nothing(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    run = open_wandb(LoggerConfig(WandbConfig(mode="offline")), tmp_path, "x", {})
    close_wandb(run)
    close_wandb(None)
    assert not list((tmp_path / "wandb").glob("offline-run-*"))
