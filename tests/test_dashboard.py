"""W&B dashboard content: an offline run of a BraTS stage carries its group and tags and holds the
per-subject test table, the α per layer and the prediction slices; without W&B nothing happens."""

from __future__ import annotations

import json

import numpy as np
import pytest
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities import rank_zero_only

from tmerge.dashboard import log_alphas, log_test_results
from tmerge.data.labels import REGIONS
from tmerge.evaluate import label_names
from tmerge.loggers import close_wandb, open_wandb, stage_loggers, wandb_loggers
from tmerge.stages.configs import TargetStageConfig
from tmerge.stages.target import _logger_cfg

RECORDS = [
    {
        "subject": "Brats18_B_1",
        "dice_ET": 0.0,
        "dice_TC": 0.5,
        "dice_WT": 0.9,
        "hd95_ET": 373.13,
        "hd95_TC": 6.0,
        "hd95_WT": 3.0,
    },
    {
        "subject": "Brats18_A_1",
        "dice_ET": 1.0,
        "dice_TC": 0.7,
        "dice_WT": 0.8,
        "hd95_ET": 0.0,
        "hd95_TC": 4.5,
        "hd95_WT": 2.0,
    },
]
ALPHAS = {"encoder.0.conv": [0.25, 0.75], "encoder.1.conv": [0.5, 0.5], "decoder.0.conv": [0.9, 0.1]}


def _preview(subject: str, k: int = 0) -> dict:
    """A slice as :func:`tmerge.evaluate.preview` returns it; ``k`` makes its pixels differ."""
    labels = np.zeros((12, 10), np.uint8)
    labels[3 + k : 8 + k, 2:6] = 2
    labels[4 + k : 6 + k, 3:5] = 4
    return {
        "subject": subject,
        "slice": 7,
        "image": np.random.default_rng(k).random((12, 10)).astype(np.float32),
        "truth": labels,
        "prediction": np.roll(labels, 1, axis=0),
    }


def _run_record(folder, timeout=30.0):
    """The offline run's ``.wandb`` record. wandb's service process may still be writing it
    after ``finish()`` returns (seen once in a fresh clone: only the 9-byte header), so wait for
    the run's header record, which holds the group and tags."""
    import time

    path = next(folder.glob("run-*.wandb"))
    end = time.monotonic() + timeout
    while True:
        record = path.read_bytes()
        if b"brats-p4" in record or time.monotonic() > end:
            return record
        time.sleep(0.2)


def test_offline_run_has_group_tags_table_alphas_and_images(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = TargetStageConfig()
    cfg.data.portion = 4
    tags = ["p4", "timm", "seed0", "finetune"]
    wandb_run = open_wandb(_logger_cfg(cfg, tags), tmp_path, "p4-timm", {"seed": 0})
    loggers = stage_loggers(tmp_path / "run", wandb_run, "finetune")
    assert wandb_loggers(loggers) == [wandb_run]
    run = wandb_run.experiment
    try:
        assert run.group == "brats-p4" and list(run.tags) == tags
        assert run.settings.mode == "offline"
        assert str(tmp_path / "wandb") in run.dir  # under the runs folder, nowhere else
        log_test_results(
            loggers,
            RECORDS,
            list(REGIONS),
            [_preview("Brats18_A_1", 0), _preview("Brats18_B_1", 2)],
            label_names("sigmoid", REGIONS),
            step=3,
        )
        trajectory = [
            {"epoch": e, "val_loss": 1.0 / e, "alphas": {k: [0.5 + 0.1 * e, 0.5 - 0.1 * e] for k in ALPHAS}}
            for e in (1, 2, 3)
        ]
        log_alphas(loggers, ALPHAS, ["task1", "task2"], step=3, trajectory=trajectory)
    finally:
        close_wandb(wandb_run)

    [folder] = (tmp_path / "wandb").glob("offline-run-*")
    record = _run_record(folder)
    assert b"brats-p4" in record and all(t.encode() in record for t in tags)  # group and tags recorded
    media = folder / "files" / "media"
    [table] = (media / "table" / "test").glob("per_subject_*.table.json")
    content = json.loads(table.read_text())
    assert ",".join(content["columns"]) == "subject,dice_ET,dice_TC,dice_WT,dice_mean,hd95_ET,hd95_TC,hd95_WT"
    assert [row[0] for row in content["data"]] == ["Brats18_A_1", "Brats18_B_1"]
    assert content["data"][0][4] == pytest.approx(2.5 / 3)
    [alphas] = (media / "table" / "adaption").glob("alphas_[0-9]*.table.json")
    content = json.loads(alphas.read_text())
    assert content["columns"] == ["index", "layer", "alpha_task1", "alpha_task2"]
    assert [row[1] for row in content["data"]] == list(ALPHAS)
    # The trajectory chart: α of the first source per layer (one line each) over the epochs.
    [chart] = (media / "table" / "adaption").glob("alpha_trajectory*.table.json")
    content = json.loads(chart.read_text())
    assert content["columns"] == ["step", "lineKey", "lineVal"]
    expected = [[e, layer, pytest.approx(0.5 + 0.1 * e)] for layer in ALPHAS for e in (1, 2, 3)]
    assert sorted(content["data"], key=lambda r: (list(ALPHAS).index(r[1]), r[0])) == expected
    assert len(list((media / "images" / "test").glob("predictions_*.png"))) == 2
    # True and predicted label maps travel as overlays, one mask image each per slice.
    assert len(list((media / "images" / "mask" / "test").glob("*.mask.png"))) == 4


def test_without_wandb_or_off_rank_zero_nothing_is_logged(tmp_path, monkeypatch):
    csv_only = [CSVLogger(save_dir=str(tmp_path), name="logs", version="")]
    log_test_results(csv_only, RECORDS, list(REGIONS), [_preview("a")], step=0)
    log_alphas(csv_only, ALPHAS, ["task1", "task2"])
    assert not (tmp_path / "logs").exists() and not (tmp_path / "wandb").exists()

    class FakeWandb:  # stands in for a WandbLogger on another DDP rank
        def log_metrics(self, *args, **kwargs):
            raise AssertionError("rank 1 must not log")

    FakeWandb.__name__ = "WandbLogger"
    assert wandb_loggers([FakeWandb()]) != []
    monkeypatch.setattr(rank_zero_only, "rank", 1)
    assert wandb_loggers([FakeWandb()]) == []
    log_test_results([FakeWandb()], RECORDS, list(REGIONS), step=0)
    log_alphas([FakeWandb()], ALPHAS, ["task1", "task2"])
