"""Label mapping: FreeSurfer aseg → paper classes, label-set selection, BraTS regions."""

from __future__ import annotations

import numpy as np
import pytest

from tmerge.data.labels import (
    LABEL_SETS,
    PAPER_CLASSES,
    REGIONS,
    aseg_to_paper,
    brats_regions,
    check_brats_labels,
    class_names,
    regions_to_brats,
    resolve_labels,
    select_labels,
)
from tmerge.errors import ConfigError, DataError

# Hand-written from the class table of docs/data.md, independent of the table in labels.py.
EXPECTED = {
    8: 1, 47: 1,
    3: 2, 42: 2, 26: 2, 58: 2, 1000: 2, 1017: 2, 1035: 2, 2000: 2, 2035: 2,
    10: 3, 49: 3, 9: 3, 48: 3,
    18: 4, 54: 4, 31: 4, 63: 4,
    11: 5, 50: 5,
    13: 6, 52: 6,
    24: 7,
    7: 8, 46: 8,
    2: 9, 41: 9, 77: 9, 251: 9, 253: 9, 255: 9,
    17: 10, 53: 10,
    4: 11, 5: 11, 43: 11, 44: 11, 14: 11, 15: 11,
    12: 12, 51: 12,
    28: 13, 60: 13,
    16: 14,
    # Not in any class → background.
    0: 0, 6: 0, 30: 0, 62: 0, 72: 0, 80: 0, 85: 0, 250: 0, 256: 0, 999: 0, 1036: 0, 2036: 0, 3001: 0, 99999: 0,
}  # fmt: skip


def test_aseg_to_paper_maps_every_listed_value() -> None:
    aseg = np.array(list(EXPECTED), dtype=np.int32).reshape(-1, 1, 1)
    paper = aseg_to_paper(aseg)
    assert paper.dtype == np.uint8 and paper.shape == aseg.shape
    assert dict(zip(EXPECTED, paper.ravel().tolist(), strict=True)) == EXPECTED
    assert set(paper.ravel().tolist()) == set(range(15))


def test_aseg_to_paper_negative_values_are_background() -> None:
    assert aseg_to_paper(np.array([-1, -1000])).tolist() == [0, 0]


def test_select_labels_renumbers_task_sets() -> None:
    paper = np.arange(15, dtype=np.uint8)
    assert select_labels(paper, "1:7").tolist() == [0, 1, 2, 3, 4, 5, 6, 7] + [0] * 7
    assert select_labels(paper, "8:14").tolist() == [0] * 8 + [1, 2, 3, 4, 5, 6, 7]
    assert select_labels(paper, "all").tolist() == list(range(15))
    # An explicit list is renumbered in the order given.
    assert select_labels(paper, [9, 2]).tolist() == [0, 0, 2] + [0] * 6 + [1] + [0] * 5
    assert select_labels(paper, "1:7").dtype == np.uint8


def test_resolve_labels_hints_at_yaml_base_60() -> None:
    # OmegaConf's dotlist parses labels=1:7 as 67 (YAML 1.1 sexagesimal).
    with pytest.raises(ConfigError, match="write a-b"):
        resolve_labels("67")


def test_label_sets_and_names() -> None:
    assert LABEL_SETS["1:7"] == tuple(range(1, 8)) and LABEL_SETS["8:14"] == tuple(range(8, 15))
    assert len(PAPER_CLASSES) == 14
    assert class_names("8:14")[0] == "cerebellum WM" and class_names("1:7")[-1] == "CSF"
    assert len(class_names("all")) == 14


def test_resolve_labels_accepts_ranges_and_lists() -> None:
    assert resolve_labels("2:4") == resolve_labels("2-4") == (2, 3, 4)
    assert resolve_labels("1-7") == LABEL_SETS["1:7"]
    assert resolve_labels("9,2") == (9, 2)
    assert resolve_labels([14]) == (14,)


@pytest.mark.parametrize("bad", ["1_7", "0:3", "3:1", "a,b", "2,2", [0, 3], [15], [2, 2], []])
def test_resolve_labels_rejects_bad_sets(bad: object) -> None:
    with pytest.raises(ConfigError, match="labels"):
        resolve_labels(bad)  # type: ignore[arg-type]


def test_brats_regions_are_nested_and_round_trip() -> None:
    seg = np.array([[0, 1, 2], [4, 2, 0]], dtype=np.uint8)
    regions = brats_regions(seg)
    assert regions.shape == (3, 2, 3) and regions.dtype == bool
    assert REGIONS == ("ET", "TC", "WT")
    et, tc, wt = regions
    assert et.tolist() == [[False, False, False], [True, False, False]]
    assert tc.tolist() == [[False, True, False], [True, False, False]]
    assert wt.tolist() == [[False, True, True], [True, True, False]]
    assert not (et & ~tc).any() and not (tc & ~wt).any()
    rng = np.random.default_rng(0)
    big = rng.choice(np.array([0, 1, 2, 4], dtype=np.uint8), size=(7, 6, 5))
    assert np.array_equal(regions_to_brats(brats_regions(big)), big)


def test_regions_to_brats_innermost_region_wins() -> None:
    # ET predicted without TC/WT still becomes enhancing tumour.
    regions = np.zeros((3, 1, 2), dtype=bool)
    regions[0, 0, 0] = True
    regions[2, 0, 1] = True
    assert regions_to_brats(regions).tolist() == [[4, 2]]


def test_check_brats_labels_names_file_and_values() -> None:
    check_brats_labels(np.array([0, 1, 2, 4]), "ok_seg.nii.gz")
    with pytest.raises(DataError, match=r"bad_seg\.nii\.gz.*3, 5"):
        check_brats_labels(np.array([0, 3, 5, 4]), "bad_seg.nii.gz")
