"""Fake run folders in the formats the BraTS, source and forgetting stages write, for the report's
tests: no training, a few kilobytes each."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest

SUBJECTS = [f"Brats18_FAKE_{i:04d}_1" for i in range(1, 11)]
LAYERS = ["encoder.0.context.block1.conv", "encoder.1.conv.conv", "decoder.0.up.conv"]
INIT_INDEX = {"none": 0, "m1": 1, "m2": 2, "imm": 3, "mean-imm": 4, "timm": 5, "mean-timm": 6}
#: Validation losses of the fake adaption trajectory: the lowest (the α kept) at epoch 2.
TRAJECTORY_LOSSES = [0.9, 0.8, 0.7, 0.75]
BEST_EPOCH = 2


def fake_alphas(trajectory: bool) -> dict[str, Any]:
    """``alphas.json`` of a two-source merge: α of task1 is 0.3, 0.4, 0.5 on the three layers; with
    ``trajectory`` α moves from 0.5 to those values over the epochs up to BEST_EPOCH and on."""
    final = {layer: [0.3 + 0.1 * k, 0.7 - 0.1 * k] for k, layer in enumerate(LAYERS)}
    out: dict[str, Any] = {"sources": ["task1", "task2"], "layers": LAYERS, "alphas": final}
    if trajectory:
        steps = []
        for epoch, loss in enumerate(TRAJECTORY_LOSSES):
            t = epoch / BEST_EPOCH
            alphas = {layer: [0.5 + t * (a - 0.5), 0.5 - t * (a - 0.5)] for layer, (a, _) in final.items()}
            steps.append({"epoch": epoch, "val_loss": loss, "alphas": alphas})
        out["trajectory"] = steps
    return out


GRID = 24


def fake_scores(portion: int, init: str, seed: int | None, offset: float) -> dict[str, dict[str, float]]:
    """Per-subject scores: a subject-dependent base + ``offset`` + a small deterministic jitter."""
    rng = np.random.default_rng([portion, seed or 0, INIT_INDEX.get(init, 9)])
    out = {}
    for i, s in enumerate(SUBJECTS):
        base = 0.3 + 0.04 * i + offset + float(rng.uniform(-0.02, 0.02))
        et, tc, wt = base - 0.05, base, base + 0.05
        out[s] = {
            "dice_ET": et,
            "dice_TC": tc,
            "dice_WT": wt,
            "dice_mean": (et + tc + wt) / 3,
            "hd95_ET": 10.0 + i + offset,
            "hd95_TC": 8.0 + i,
            # an empty mask gives no distance: the report must leave it out, not average it
            "hd95_WT": float("nan") if i == 0 else 5.0 + i,
        }
    return out


def tumour(shift: int = 0) -> np.ndarray:
    """A nested BraTS label map (2 oedema ⊃ 1 core ⊃ 4 enhancing) centred in the grid."""
    x, y, z = np.meshgrid(*(np.arange(GRID),) * 3, indexing="ij")
    r = np.sqrt((x - 12 - shift) ** 2 + (y - 12) ** 2 + (z - 14) ** 2)
    seg = np.zeros((GRID,) * 3, np.uint8)
    seg[r < 7] = 2
    seg[r < 4.5] = 1
    seg[(r >= 3) & (r < 4.5)] = 4
    return seg


def write_nifti(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, np.eye(4)), str(path))


class FakeRuns:
    """Builds ``runs/`` (and a tiny BraTS data root) under a temporary folder."""

    def __init__(self, root: Path, data_root: Path) -> None:
        self.root = root
        self.data_root = data_root
        root.mkdir(parents=True, exist_ok=True)

    def target(
        self,
        portion: int,
        init: str,
        seed: int | None = None,
        *,
        offset: float = 0.0,
        finished: bool = True,
        predictions: bool = False,
        run_json: bool = True,
        trajectory: bool = False,
        scores: dict[str, dict[str, float]] | None = None,
        regions: dict[str, dict[str, int]] | None = None,
        metrics: dict[str, str] | None = None,
    ) -> Path:
        """A BraTS run folder; ``finished=False`` leaves out the marker (``test_summary.json``).
        ``timm`` and ``mean-timm`` get an ``alphas.json``, with a ``trajectory`` if asked (the
        older format has none). ``scores`` replaces the fake per-subject scores; ``regions``
        (subject → ``truth_<c>``/``pred_<c>`` → count) is written as ``test_regions.csv``.
        ``metrics``: the config's ``metrics`` section (None: none, as before those keys existed)."""
        base = self.root / "brats" / f"p{portion}"
        path = base / init if seed is None else base / f"seed{seed}" / init
        path.mkdir(parents=True)
        config = {
            "seed": seed or 0,
            "init": init,
            "net": {"base_filters": 8, "depth": 5},
            "trainer": {"max_epochs": 15},
            "adaption": {"max_epochs": 6},
            "data": {"root": str(self.data_root), "portion": portion, "patch_size": 48},
        }
        if metrics is not None:
            config["metrics"] = metrics
        (path / "config.yaml").write_text(json.dumps(config))  # JSON is YAML
        if run_json:
            (path / "run.json").write_text(json.dumps({"commit": "0123456789abcdef", "seed": seed or 0}))
        rows = fake_scores(portion, init, seed, offset) if scores is None else scores
        buf = io.StringIO()
        columns = list(next(iter(rows.values())))
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(["subject", *columns])
        for s, v in rows.items():
            writer.writerow([s, *(v[c] for c in columns)])
        (path / "test_per_subject.csv").write_text(buf.getvalue())
        if regions is not None:
            columns = list(next(iter(regions.values())))
            lines = [",".join(["subject", *columns])]
            lines += [",".join([s, *(str(v[c]) for c in columns)]) for s, v in regions.items()]
            (path / "test_regions.csv").write_text("\n".join(lines) + "\n")
        stages: dict[str, Any] = {"init": init, "sources": ["task1", "task2"]}
        if init in ("timm", "mean-timm"):
            stages["adaption"] = {
                "best_score": 0.7,
                "monitor": "val/loss",
                "epochs": 6 + (seed or 0),
                "best_epoch": 5,
                "best_metrics": {"val/dice": 0.31 + 0.01 * (seed or 0), "val/loss": 0.7},
                "val_dice": 0.31 + 0.01 * (seed or 0),
                "val_loss": 0.7,
            }
            (path / "alphas.json").write_text(json.dumps(fake_alphas(trajectory)))
        stages["finetune"] = {
            "best_score": 0.4 + offset,
            "monitor": "val/dice",
            "epochs": 12,
            "best_epoch": 7,
            "best_metrics": {"val/dice": 0.4 + offset, "val/loss": 0.6},
        }
        (path / "stages.json").write_text(json.dumps(stages))
        if predictions:
            for k, s in enumerate(SUBJECTS):
                write_nifti(
                    path / "predictions" / f"{s}.nii.gz", tumour(shift=INIT_INDEX.get(init, 0) - 2 + k % 2)
                )
        if finished:
            n = len(rows)
            summary = {
                "n": n,
                "dice": {
                    r: sum(v[f"dice_{r}"] for v in rows.values()) / n for r in ("ET", "TC", "WT", "mean")
                },
                "hd95": {r: 0.0 for r in ("ET", "TC", "WT")},
            }
            (path / "test_summary.json").write_text(json.dumps(summary))
        return path

    def brats_data(self) -> Path:
        """FLAIR and segmentation of every fake subject in the BraTS training layout."""
        rng = np.random.default_rng(0)
        for s in SUBJECTS:
            folder = self.data_root / "MICCAI_BraTS_2018_Data_Training" / "HGG" / s
            seg = tumour()
            flair = rng.normal(100.0, 5.0, (GRID,) * 3).astype(np.float32) + 60.0 * (seg > 0)
            write_nifti(folder / f"{s}_flair.nii.gz", flair)
            write_nifti(folder / f"{s}_seg.nii.gz", seg)
        return self.data_root

    def source(self, name: str, finished: bool = True, **extra: Any) -> Path:
        """A source run folder; ``extra`` goes into ``metrics.json`` (e.g. ``distance_from_init``)."""
        path = self.root / name
        path.mkdir(parents=True)
        (path / "config.yaml").write_text("seed: 0\n")
        if finished:
            metrics = {
                "name": name,
                "val_dice": 0.5,
                "val_dice_per_class": {},
                "epochs": 14,
                "best_epoch": 13,
            }
            (path / "metrics.json").write_text(json.dumps({**metrics, **extra}))
        return path

    def forgetting(self, portion: int, examples: bool = True) -> Path:
        from tmerge.stages.forgetting import save_examples

        path = self.root / "forgetting" / f"p{portion}"
        path.mkdir(parents=True)
        table = {
            "M1": {"labels 1:7": 0.89, "labels 8:14": 0.0},
            "M2": {"labels 1:7": 0.01, "labels 8:14": 0.89},
            "IMM": {"labels 1:7": 0.38, "labels 8:14": 0.42},
            "T-IMM": {"labels 1:7": 0.5, "labels 8:14": 0.39},
        }
        (path / "table4.json").write_text(json.dumps(table))
        if examples:
            save_examples(path / "examples.npz", "HCP_0001", parcellation_examples(), list(table))
        return path


def parcellation_examples() -> dict[str, dict[str, Any]]:
    """Two tasks with seven classes each on a 16³ grid; M1 forgets task 2, M2 task 1."""
    grid = np.arange(16)
    x, y, z = np.meshgrid(grid, grid, grid, indexing="ij")
    truth = (((x // 4) + 2 * (y // 8)) % 7 + 1).astype(np.uint8) * (z >= 4)
    image = (truth * 10.0 + x).astype(np.float32)
    empty = np.zeros_like(truth)
    names = [f"class {i}" for i in range(1, 8)]
    return {
        "task1": {
            "labels": "1:7",
            "class_names": names,
            "image": image,
            "truth": truth,
            "pred": {"M1": truth, "M2": empty, "IMM": truth * (x < 8), "T-IMM": truth * (x < 12)},
        },
        "task2": {
            "labels": "8:14",
            "class_names": names,
            "image": image,
            "truth": truth,
            "pred": {"M1": empty, "M2": truth, "IMM": truth * (y < 8), "T-IMM": truth * (y < 10)},
        },
    }


@pytest.fixture
def fake(tmp_path) -> FakeRuns:
    return FakeRuns(tmp_path / "runs", tmp_path / "brats-data")
