"""The tasks' input channels, and channel names compared by the MR contrast they stand for
(``T1w``, ``t1n`` and ``T1`` are one contrast), across datasets and between a source and a target.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

#: Input channels of each task, in channel order.
TASK_CHANNELS: dict[str, tuple[str, ...]] = {"brats": ("t1", "t1ce", "t2", "flair"), "hcp": ("T1", "T2")}

#: nnU-Net channel names (lower case, letters and digits only: :func:`name_key`) accepted for each
#: task channel.
CHANNEL_ALIASES: dict[str, frozenset[str]] = {
    "t1": frozenset("t1 t1w t1n t1native nativet1 t1pre".split()),
    "t1ce": frozenset("t1ce t1c t1gd t1wce t1post t1contrast t1gad t1cegd".split()),
    "t2": frozenset("t2 t2w".split()),
    "flair": frozenset("flair t2f t2flair t2wflair".split()),
    "T1": frozenset("t1 t1w".split()),
    "T2": frozenset("t2 t2w".split()),
}


def name_key(name: str) -> str:
    """A name as it is compared: lower case, letters and digits only."""
    return re.sub(r"[^a-z0-9]", "", name.lower())


def canonical_channel(name: str) -> str:
    """The MR contrast a channel name stands for, so that names from different datasets compare:
    ``T1``, ``T1w``, ``t1n`` → ``t1``; ``T2w`` → ``t2``; ``FLAIR``, ``t2f`` → ``flair``; ``t1ce``,
    ``T1Gd`` → ``t1ce``; any other name → itself, lower case, letters and digits only."""
    key = name_key(name)
    for channel in TASK_CHANNELS["brats"]:
        if key in CHANNEL_ALIASES[channel]:
            return channel
    return key


def match_channels(target: Sequence[str], source: Sequence[str]) -> list[int] | None:
    """For each target channel, the index of the source channel of the same contrast
    (:func:`canonical_channel`); ``None`` unless every target channel has one."""
    where = {canonical_channel(name): i for i, name in reversed(list(enumerate(source)))}
    found = [where.get(canonical_channel(name)) for name in target]
    return None if any(i is None for i in found) else [int(i) for i in found]  # type: ignore[arg-type]
