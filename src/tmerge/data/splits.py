"""Deterministic, seeded data splits of paper Table 1.

Splits are pure functions of the sorted subject ids and a seed, so every DDP rank and every
initialisation method of an experiment sees the same subjects. They are written into the run
folder (:func:`save_splits`) so a run records exactly what it trained on.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tmerge.errors import DataError
from tmerge.io import write_json

#: HCP split sizes (paper Table 1): two tasks of 23 (18 train + 5 val) and a shared test set of 12.
HCP_TASK_SIZE = 23
HCP_TRAIN_SIZE = 18
HCP_TEST_SIZE = 12
HCP_TOTAL = 2 * HCP_TASK_SIZE + HCP_TEST_SIZE

#: Fraction of a BraTS portion used for training; the rest validates (Table 1: 8/2, 16/4).
BRATS_TRAIN_FRACTION = 0.8


def _permuted(subjects: Sequence[str], seed: int) -> list[str]:
    """Sort (so the file-system listing order does not matter), then shuffle with ``seed``."""
    ordered = sorted(subjects)
    dupes = sorted(s for s, n in Counter(ordered).items() if n > 1)
    if dupes:
        raise DataError(f"duplicate subject ids {dupes[:5]}; expected each subject once")
    order = np.random.default_rng(seed).permutation(len(ordered))
    return [ordered[i] for i in order]


def hcp_splits(subjects: Sequence[str], seed: int = 0, source: str = "") -> dict[str, Any]:
    """Split HCP subjects into task 1, task 2 and a shared test set (paper Table 1).

    The sorted subjects are shuffled with ``seed``; the first 23 form task 1, the next 23 task 2,
    the next 12 the test set. Each task keeps 18 for training and 5 for validation. Subjects
    beyond the 58 are left unused, so the sizes of Table 1 hold for the full HCP release too.

    The ``"all"`` split serves the paper's All-HCP baselines: the training and validation
    subjects of both tasks together (36 train / 10 val), so it never sees the test set and its
    validation subjects are exactly those of the two tasks.

    Args:
        subjects: Subject ids (any order).
        seed: Shuffling seed.
        source: Where the subjects were found, for the error message.

    Returns:
        ``{"seed", "test": [...], "task1": {"train", "val"}, "task2": {...}, "all": {...}}``.

    Raises:
        DataError: fewer than 58 subjects.
    """
    if len(subjects) < HCP_TOTAL:
        where = f" in {source}" if source else ""
        raise DataError(
            f"found {len(subjects)} HCP subjects{where}; the paper's splits (23/23/12) need {HCP_TOTAL}"
        )
    order = _permuted(subjects, seed)
    tasks = {}
    for i, name in enumerate(("task1", "task2")):
        block = order[i * HCP_TASK_SIZE : (i + 1) * HCP_TASK_SIZE]
        tasks[name] = {"train": block[:HCP_TRAIN_SIZE], "val": block[HCP_TRAIN_SIZE:]}
    test = order[2 * HCP_TASK_SIZE : HCP_TOTAL]
    both = {part: tasks["task1"][part] + tasks["task2"][part] for part in ("train", "val")}
    return {"seed": seed, "test": test, **tasks, "all": both}


def brats_splits(
    subjects: Sequence[str],
    portion: int,
    seed: int = 0,
    test_size: int = 40,
    pool_size: int | None = 255,
    unlabelled: Sequence[str] = (),
    source: str = "",
    draw_seed: int | None = None,
) -> dict[str, Any]:
    """Split labelled BraTS subjects for a data portion (paper Table 1).

    One permutation of the sorted subjects (fixed by ``seed``) gives a test set (its first
    ``test_size`` subjects, the same for every portion and every ``draw_seed``) and an order on
    the rest, re-shuffled by ``draw_seed`` when given: repeating an experiment over draw seeds
    varies which subjects train and validate while the test set stays fixed. Portion ``p``
    takes the first ``round(p/100 * pool_size)`` of the rest (so a smaller portion's draw is a
    prefix of a larger one's: 4 % ⊂ 8 %) and splits it 80/20 into train/val (4 % → 8/2,
    8 % → 16/4). ``p = 100`` follows the paper's 100 % experiment instead: every remaining
    subject trains (215 of 255), the test subjects validate, and ``unlabelled`` (the online
    validation set) is the prediction set.

    Args:
        subjects: Labelled subject ids (any order).
        portion: Percentage of ``pool_size``, 1..100.
        seed: Shuffling seed.
        test_size: Size of the fixed test set.
        pool_size: Size the percentage refers to (255 labelled subjects in the paper); None:
            every subject left after the test set.
        unlabelled: Ids of the unlabelled validation set (``predict`` when ``portion == 100``).
        source: Where the subjects were found, for error messages.
        draw_seed: Shuffles the non-test subjects before the portion is drawn; None keeps the
            order of the ``seed`` permutation.

    Returns:
        ``{"seed", "draw_seed", "portion", "train", "val", "test", "predict"}`` (lists of ids;
        ``predict`` is empty unless ``portion == 100``).

    Raises:
        DataError: the portion is out of range, or needs more subjects than remain after the
            test set.
    """
    where = f" in {source}" if source else ""
    if not 0 < portion <= 100:
        raise DataError(f"portion {portion}: expected a percentage between 1 and 100")
    if len(subjects) < test_size + 2:
        raise DataError(
            f"found {len(subjects)} labelled cases{where}; data.test_size={test_size} leaves "
            f"{max(len(subjects) - test_size, 0)} to train and validate (at least 2 needed): "
            f"{_possible(len(subjects))}"
        )
    order = _permuted(subjects, seed)
    test, rest = order[:test_size], order[test_size:]
    pool = len(rest) if pool_size is None else pool_size
    if draw_seed is not None:
        rest = _permuted(rest, draw_seed)
    if portion == 100:
        return {
            "seed": seed,
            "draw_seed": draw_seed,
            "portion": portion,
            "train": rest,
            "val": list(test),
            "test": test,
            "predict": sorted(unlabelled),
        }
    n = round(portion / 100 * pool)
    if n > len(rest):
        raise DataError(
            f"portion {portion}% of {pool} needs {n} subjects, but only {len(rest)} remain{where} "
            f"after the {test_size} test subjects: portion larger than the pool (data.pool_size=null "
            f"takes the {len(rest)} that remain as the pool)"
        )
    if n < 2:
        smallest = math.ceil(150 / pool)  # round(p/100 · pool) >= 2
        raise DataError(
            f"portion {portion}% of {pool} gives {n} subjects; need at least 2 (train and val): "
            f"portion >= {smallest} with this pool, or a larger pool"
        )
    n_train = min(max(round(BRATS_TRAIN_FRACTION * n), 1), n - 1)
    drawn = rest[:n]
    return {
        "seed": seed,
        "draw_seed": draw_seed,
        "portion": portion,
        "train": drawn[:n_train],
        "val": drawn[n_train:],
        "test": test,
        "predict": [],
    }


def _possible(n: int) -> str:
    """What a dataset of ``n`` labelled cases allows, for the error message."""
    if n < 3:
        return f"a target needs at least 3 labelled cases (test, train, val), found {n}"
    test = max(1, round(0.2 * n))
    return f"e.g. data.test_size={test} data.pool_size=null (portion p % of the {n - test} others train and validate)"


def save_splits(path: str | Path, splits: dict[str, Any]) -> Path:
    """Write ``splits`` as JSON, atomically."""
    return write_json(path, splits)
