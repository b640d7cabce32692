"""The shared runner: precision choice, loggers (CSV always, W&B offline by default)."""

from __future__ import annotations

from lightning.pytorch.loggers import CSVLogger

from tmerge.runner import LoggerConfig, WandbConfig, build_loggers, close_loggers, resolve_precision


def test_precision_auto_is_fp32_on_cpu_and_bf16_on_gpu():
    assert resolve_precision("auto", "cpu") == "32-true"
    assert resolve_precision("auto", "gpu") == "bf16-mixed"
    assert resolve_precision("16-mixed", "gpu") == "16-mixed"


def test_disabled_wandb_leaves_csv_only(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    loggers = build_loggers(LoggerConfig(WandbConfig(mode="disabled")), tmp_path / "run", tmp_path, "x", {})
    assert [type(lg) for lg in loggers] == [CSVLogger]


def test_offline_wandb_run_with_group_and_tags(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    cfg = LoggerConfig(WandbConfig(mode="offline", group="brats-p4", tags=["p4", "timm"]))
    loggers = build_loggers(cfg, tmp_path / "run", tmp_path, "p4-timm", {"seed": 0})
    wandb_logger = loggers[1]
    run = wandb_logger.experiment
    try:
        assert run.group == "brats-p4" and set(run.tags) == {"p4", "timm"}
        assert run.config["seed"] == 0
        assert run.settings.mode == "offline"
    finally:
        close_loggers(loggers)
    assert list((tmp_path / "wandb").glob("offline-run-*")), "no offline run folder under runs/wandb"
