"""Seeded splits of paper Table 1."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tmerge.data.splits import brats_splits, hcp_splits, save_splits
from tmerge.errors import DataError

HCP = [f"{100000 + 7 * i}" for i in range(58)]
BRATS = [f"Brats18_TCIA_{i:03d}_1" for i in range(255)]
ONLINE = [f"Brats18_CBICA_V{i:02d}_1" for i in range(66)]


def test_hcp_split_sizes_follow_table_1() -> None:
    s = hcp_splits(HCP, seed=0)
    for task in ("task1", "task2"):
        assert (len(s[task]["train"]), len(s[task]["val"])) == (18, 5)
    assert len(s["test"]) == 12
    assert (len(s["all"]["train"]), len(s["all"]["val"])) == (36, 10)
    groups = [
        set(s["task1"]["train"] + s["task1"]["val"]),
        set(s["task2"]["train"] + s["task2"]["val"]),
        set(s["test"]),
    ]
    assert sum(map(len, groups)) == len(set().union(*groups)) == 58
    assert set(s["all"]["train"]) == set(s["task1"]["train"]) | set(s["task2"]["train"])
    assert set(s["all"]["val"]) == set(s["task1"]["val"]) | set(s["task2"]["val"])


def test_hcp_splits_are_deterministic_and_order_independent() -> None:
    assert hcp_splits(HCP, seed=3) == hcp_splits(list(reversed(HCP)), seed=3)
    assert hcp_splits(HCP, seed=3) != hcp_splits(HCP, seed=4)


def test_hcp_extra_subjects_are_left_out() -> None:
    s = hcp_splits([f"{i:06d}" for i in range(1000)], seed=0)
    assert len(s["test"]) == 12 and len(s["task1"]["train"]) == 18


def test_hcp_too_few_subjects_names_count_and_source() -> None:
    with pytest.raises(DataError, match=r"found 57 HCP subjects in /data/hcp.*58"):
        hcp_splits(HCP[:57], source="/data/hcp")


@pytest.mark.parametrize(("portion", "train", "val"), [(4, 8, 2), (8, 16, 4)])
def test_brats_portion_sizes_follow_table_1(portion: int, train: int, val: int) -> None:
    s = brats_splits(BRATS, portion, seed=0)
    assert (len(s["train"]), len(s["val"]), len(s["test"])) == (train, val, 40)
    assert s["predict"] == []
    assert not (set(s["train"]) & set(s["val"])) and not ((set(s["train"]) | set(s["val"])) & set(s["test"]))


def test_brats_full_portion_is_the_papers_100_percent() -> None:
    s = brats_splits(BRATS, 100, seed=0, unlabelled=ONLINE)
    assert (len(s["train"]), len(s["val"]), len(s["test"])) == (215, 40, 40)
    assert s["val"] == s["test"]
    assert s["predict"] == sorted(ONLINE)
    assert set(s["train"]) | set(s["test"]) == set(BRATS)


def test_brats_portions_nest_and_share_the_test_set() -> None:
    s4, s8, s100 = (brats_splits(BRATS, p, seed=1) for p in (4, 8, 100))
    assert s4["test"] == s8["test"] == s100["test"]
    assert set(s4["train"] + s4["val"]) < set(s8["train"] + s8["val"])
    assert set(s4["train"]) < set(s8["train"])


def test_brats_splits_are_deterministic() -> None:
    assert brats_splits(BRATS, 8, seed=2) == brats_splits(sorted(BRATS, reverse=True), 8, seed=2)
    assert brats_splits(BRATS, 8, seed=2)["test"] != brats_splits(BRATS, 8, seed=3)["test"]


def test_brats_portion_larger_than_pool() -> None:
    with pytest.raises(DataError, match=r"needs 230 subjects.*only 215 remain.*larger than the pool"):
        brats_splits(BRATS, 90, seed=0)
    with pytest.raises(DataError, match="percentage"):
        brats_splits(BRATS, 0)


def test_save_splits_writes_json(tmp_path: Path) -> None:
    s = brats_splits(BRATS, 4)
    path = save_splits(tmp_path / "run" / "splits.json", s)
    assert json.loads(path.read_text()) == s
