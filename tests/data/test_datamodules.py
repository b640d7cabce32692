"""HCP and BraTS DataModules on tiny generated trees in the real datasets' layouts (written by
:mod:`helpers.trees`)."""

from __future__ import annotations

import dataclasses
import json
import sys
import types
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from helpers.trees import write_brats_tree, write_hcp_tree

import tmerge.data.cache as pc
from tmerge.data import HCPDataConfig, HCPDataModule, TargetDataConfig, TargetDataModule
from tmerge.data.geometry import uncrop
from tmerge.data.labels import aseg_to_paper, brats_regions, select_labels
from tmerge.errors import ConfigError


@pytest.fixture(scope="module")
def hcp_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("hcp")
    write_hcp_tree(root)
    return root


@pytest.fixture(scope="module")
def brats_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("brats")
    write_brats_tree(root, suffix=".nii")  # real data may be uncompressed: same code path
    return root


# The DataModules as the stages build them for the default network (net.divisor 16).
def _hcp(root: Path, cache: Path, **kw: object) -> HCPDataModule:
    return HCPDataModule(root=str(root), cache_dir=str(cache), patch_size=16, divisor=16, **kw)


def _brats(root: Path, cache: Path, **kw: object) -> TargetDataModule:
    fields = {"test_size": 4, "pool_size": 10, "portion": 80, "n4": False, "patch_size": 16, **kw}
    return TargetDataModule(root=str(root), cache_dir=str(cache), divisor=16, **fields)


def test_attributes_are_known_without_io() -> None:
    hcp = HCPDataModule(root="/does/not/exist", split="task2")
    assert (hcp.in_channels, hcp.n_outputs, hcp.output_mode) == (2, 8, "softmax")
    assert hcp.class_names[0] == "cerebellum WM" and len(hcp.class_names) == 7
    assert HCPDataModule(split="all").n_outputs == 15
    assert HCPDataModule(split="all", labels="1:7").n_outputs == 8
    brats = TargetDataModule(root="/does/not/exist")
    assert (brats.in_channels, brats.n_outputs, brats.output_mode) == (4, 3, "sigmoid")
    assert brats.class_names == ["ET", "TC", "WT"]


def test_config_round_trip_and_rejections() -> None:
    cfg = HCPDataConfig(split="task2", patch_size=32)
    dm = HCPDataModule(**dataclasses.asdict(cfg))
    assert dm.config == cfg and dm.hparams["split"] == "task2"
    assert TargetDataModule(**dataclasses.asdict(TargetDataConfig(portion=4))).config.portion == 4
    with pytest.raises(ConfigError, match="unknown key.*'spilt'"):
        HCPDataModule(spilt="task1")
    with pytest.raises(ConfigError, match="split"):
        HCPDataModule(split="task3")
    # Multiples of the network's divisor are the run config's to check (tests/test_net_data_contract.py).
    with pytest.raises(ConfigError, match="patch_size"):
        HCPDataModule(patch_size=0)
    with pytest.raises(ValueError, match="divisor"):
        HCPDataModule(divisor=0)
    with pytest.raises(ConfigError, match="portion"):
        TargetDataModule(portion=0)


def test_hcp_batches_splits_and_fisher(hcp_root: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    dm = _hcp(hcp_root, tmp_path / "cache", run_dir=str(run), batch_size=2, samples_per_volume=2)
    dm.prepare_data()
    dm.setup("fit")
    assert (len(dm.subjects["train"]), len(dm.subjects["val"]), len(dm.subjects["test"])) == (18, 5, 12)

    loader = dm.train_dataloader()
    assert len(loader.dataset) == 36
    batch = next(iter(loader))
    assert batch["image"].shape == (2, 2, 16, 16, 16) and batch["image"].dtype == torch.float32
    assert batch["label"].shape == (2, 1, 16, 16, 16) and batch["label"].dtype == torch.int64
    assert 0 <= batch["label"].min() and batch["label"].max() <= 7
    # Patches are random but reproducible from torch's seed (what seed_everything sets).
    torch.manual_seed(0)
    first = loader.dataset[0]["image"]
    torch.manual_seed(0)
    assert torch.equal(first, loader.dataset[0]["image"])
    assert not torch.equal(first, loader.dataset[0]["image"])

    val = next(iter(dm.val_dataloader()))
    assert val["subject"] == [dm.subjects["val"][0]] and len(val["meta"]) == 1
    c, *spatial = val["image"].shape[1:]
    assert val["image"].shape[0] == 1 and c == 2 and all(n % 16 == 0 for n in spatial)
    assert val["label"].shape == (1, 1, *spatial) and val["label"].dtype == torch.int64
    # The label goes back to the original geometry exactly.
    sid = val["subject"][0]
    aseg = np.asarray(nib.load(hcp_root / sid / "T1w" / "aparc+aseg.nii.gz").dataobj)
    restored = uncrop(val["label"][0, 0].numpy(), val["meta"][0])
    assert np.array_equal(restored, select_labels(aseg_to_paper(aseg), "1:7"))

    record = json.loads((run / "splits.json").read_text())
    assert record["train"] == dm.subjects["train"] and record["splits"]["task1"]["val"] == dm.subjects["val"]
    assert record["labels"] == list(range(1, 8))

    fisher = dm.fisher_dataset()
    assert len(fisher) == 18
    item = fisher[0]
    assert item["image"].shape == (2, 16, 16, 16) and item["label"].shape == (1, 16, 16, 16)
    assert torch.equal(item["image"], fisher[0]["image"])

    dm.setup("test")
    test = next(iter(dm.test_dataloader()))
    assert test["subject"] == [dm.subjects["test"][0]]


def test_two_instances_agree_and_reuse_the_cache(
    hcp_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = _hcp(hcp_root, tmp_path / "cache", split="task2", run_dir=str(tmp_path / "a"))
    first.prepare_data()
    first.setup("fit")

    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("expected a cache hit")

    monkeypatch.setattr(pc, "preprocess_subject", fail)
    second = _hcp(hcp_root, tmp_path / "cache", split="task2", run_dir=str(tmp_path / "b"))
    second.prepare_data()
    second.setup("fit")
    assert first.subjects == second.subjects
    assert (tmp_path / "a" / "splits.json").read_text() == (tmp_path / "b" / "splits.json").read_text()
    assert np.array_equal(
        first.meta(first.subjects["val"][0])["crop_start"],
        second.meta(second.subjects["val"][0])["crop_start"],
    )


def test_brats_batches_are_region_masks(brats_root: Path, tmp_path: Path) -> None:
    dm = _brats(brats_root, tmp_path / "cache", run_dir=str(tmp_path / "run"))
    dm.prepare_data()
    dm.setup("fit")
    assert (len(dm.subjects["train"]), len(dm.subjects["val"]), len(dm.subjects["test"])) == (6, 2, 4)
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (2, 4, 16, 16, 16) and batch["image"].dtype == torch.float32
    label = batch["label"]
    assert label.shape == (2, 3, 16, 16, 16) and label.dtype == torch.float32
    et, tc, wt = label.unbind(1)
    assert torch.all(et <= tc) and torch.all(tc <= wt) and set(label.unique().tolist()) <= {0.0, 1.0}

    val = next(iter(dm.val_dataloader()))
    sid = val["subject"][0]
    grade = next(
        g for g in ("HGG", "LGG") if (brats_root / "MICCAI_BraTS_2018_Data_Training" / g / sid).is_dir()
    )
    seg = np.asarray(
        nib.load(brats_root / "MICCAI_BraTS_2018_Data_Training" / grade / sid / f"{sid}_seg.nii").dataobj
    )
    assert np.array_equal(uncrop(val["label"][0].numpy().astype(bool), val["meta"][0]), brats_regions(seg))
    assert json.loads((tmp_path / "run" / "splits.json").read_text())["portion"] == 80


def test_brats_full_portion_predicts_the_unlabelled_set(brats_root: Path, tmp_path: Path) -> None:
    dm = _brats(brats_root, tmp_path / "cache", portion=100)
    dm.prepare_data()
    dm.setup("predict")
    assert dm.subjects["val"] == dm.subjects["test"] and len(dm.subjects["train"]) == 8
    batches = list(dm.predict_dataloader())
    assert [b["subject"][0] for b in batches] == ["Brats18_CBICA_V00_1", "Brats18_CBICA_V01_1"]
    assert "label" not in batches[0] and batches[0]["image"].shape[:2] == (1, 4)


def test_setup_without_prepare_data_preprocesses(brats_root: Path, tmp_path: Path) -> None:
    dm = _brats(brats_root, tmp_path / "cache")
    dm.setup("validate")
    assert len(list(dm.val_dataloader())) == 2


def test_default_data_is_generated_under_tmerge_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[Path, tuple[str, ...], int]] = []

    def generate_default(
        root: Path, *, kinds: tuple[str, ...] = ("hcp", "brats"), size: int = 64, **_: object
    ) -> dict[str, int]:
        # Like the real generator: writes only what is missing.
        calls.append((Path(root), tuple(kinds), size))
        if (Path(root) / "hcp").is_dir():
            return {"hcp": 0}
        return {"hcp": len(write_hcp_tree(Path(root) / "hcp"))}

    monkeypatch.setitem(
        sys.modules, "tmerge.data.synthetic.generate", types.SimpleNamespace(generate_default=generate_default)
    )
    monkeypatch.setenv("TMERGE_DATA", str(tmp_path / "data"))
    dm = HCPDataModule(patch_size=16, generate_size=24)
    assert dm.root == tmp_path / "data" / "default" / "hcp" and not calls  # nothing in __init__
    dm.prepare_data()
    dm.setup("fit")
    assert calls == [(tmp_path / "data" / "default", ("hcp",), 24)]
    assert list((tmp_path / "data" / "cache").glob("*/*.npz"))
    again = HCPDataModule(patch_size=16, generate_size=24)
    again.prepare_data()
    assert len(calls) == 2 and again.subjects == dm.subjects
