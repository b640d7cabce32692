"""Settings shared by the end-to-end tests: the tiny network and its schedule."""

from __future__ import annotations

#: The tiny network (that of :func:`helpers.sources.fake_source`) and a patch size it takes.
TINY_NET = ("net.base_filters=4", "net.depth=3", "data.patch_size=16")
#: A network and schedule small enough for seconds per stage on two cores.
TINY_ARGS = (
    *TINY_NET,
    "data.batch_size=2",
    "data.samples_per_volume=1",
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=2",
    "trainer.limit_val_batches=2",
    "loss.sw_roi=32",
)
#: The schedule of :data:`TINY_ARGS` without the network's size (tests that size each network).
TINY_SCHEDULE = tuple(a for a in TINY_ARGS if not a.startswith("net."))


def tiny_brats(default_root, runs) -> list[str]:
    """A target run on the tiny generated BraTS data (the ``tiny_default`` fixture's root):
    8 test subjects, half of a pool of 16 (6 train, 2 validate), into ``runs``."""
    return [
        f"data.root={default_root / 'brats'}",
        f"runs_dir={runs}",
        "portion=50",
        "data.test_size=8",
        "data.pool_size=16",
    ]
