"""Who the generated subjects are, and which random stream each draws from.

Subject ``i`` of a kind draws only from an RNG seeded by ``(seed, kind, i)`` (:func:`stream_rng`
with the kind's stream code), so a subset, a resumed run or a parallel run writes the same arrays;
ids and BraTS grades are drawn from streams of their own.
"""

from __future__ import annotations

import numpy as np

from tmerge.data.formats import BRATS2018_GRADES
from tmerge.errors import DataError

HGG, LGG = BRATS2018_GRADES
#: Fraction of high-grade gliomas (BraTS 2018 training: 210 HGG / 75 LGG).
HGG_FRACTION = 0.75

# Stream codes that separate the seeds of the different random uses of one ``seed``.
STREAM_HCP = 1
STREAM_BRATS_TRAIN = 2
STREAM_BRATS_VAL = 3
STREAM_STRUCTURES = 4
STREAM_STRUCTURES_TS = 5
STREAM_HCP_IDS = 11
STREAM_GRADE = 21

#: The ``structures`` target (nnU-Net v2 raw): labelled cases and the unlabelled imagesTs.
STRUCTURES_TRAINING, STRUCTURES_TEST = 60, 10


def structures_case_id(index: int, test: bool = False) -> str:
    """nnU-Net case id of the ``index``-th (0-based) case, e.g. ``structures_001``."""
    return f"structures_{'ts' if test else ''}{index + 1:03d}"


# HCP ids are 6-digit and increasing (100206 ... 996782 for the 1200 real subjects): consecutive
# gaps drawn from this range keep about 1000 subjects within 6 digits.
_HCP_ID_START = 100000
_HCP_ID_GAP = (100, 1400)
_HCP_ID_CHUNK = 1024


def stream_rng(seed: int, *stream: int) -> np.random.Generator:
    """Independent generator for ``(seed, *stream)`` (NumPy SeedSequence entropy pooling)."""
    return np.random.default_rng(np.random.SeedSequence([seed, *stream]))


def hcp_subject_ids(seed: int, n: int) -> list[str]:
    """Deterministic, unique, increasing 6-digit HCP-style subject ids.

    The first ``k`` ids do not depend on ``n`` (gaps are drawn in fixed-size chunks), so a smaller
    set is a prefix of a larger one.

    Raises:
        DataError: If ``n`` is too large for 6-digit ids (about 1000 subjects).
    """
    rng = stream_rng(seed, STREAM_HCP_IDS)
    gaps: list[np.ndarray] = []
    while sum(len(g) for g in gaps) < n:
        gaps.append(rng.integers(*_HCP_ID_GAP, size=_HCP_ID_CHUNK))
    ids = _HCP_ID_START + np.cumsum(np.concatenate(gaps)[:n]) if n else np.zeros(0, dtype=np.int64)
    if n and ids[-1] > 999999:
        raise DataError(
            f"n_hcp={n}: too many subjects for 6-digit HCP-style ids; expected at most about 1000"
        )
    return [str(int(i)) for i in ids]


def brats_subject_id(index: int, validation: bool = False) -> str:
    """BraTS-style id of the ``index``-th (0-based) synthetic subject, e.g. ``Brats18_SYN_0001_1``."""
    return f"Brats18_{'SYNV' if validation else 'SYN'}_{index + 1:04d}_1"


def brats_grade(seed: int, index: int, validation: bool = False) -> str:
    """Grade (``"HGG"`` or ``"LGG"``) of a synthetic BraTS subject, from its own RNG stream."""
    stream = STREAM_BRATS_VAL if validation else STREAM_BRATS_TRAIN
    return HGG if stream_rng(seed, STREAM_GRADE, stream, index).random() < HGG_FRACTION else LGG

