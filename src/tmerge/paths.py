"""Where data and runs live: config first, then the environment, then defaults. The one place
that reads the environment variables.

``TMERGE_DATA`` (default ``data/``) holds datasets — the embedded default under
``<data>/default/{hcp,brats}`` and preprocessing caches under ``<data>/cache``.
``TMERGE_RUNS`` (default ``runs/``) holds one folder per run: ``runs/task1``, ``runs/task2``,
``runs/brats/p<portion>/<init>``, ``runs/report``.
"""

from __future__ import annotations

import os
from pathlib import Path

#: Environment variables naming the data folder and the runs folder.
DATA_ENV, RUNS_ENV = "TMERGE_DATA", "TMERGE_RUNS"


def data_dir(configured: str | None = None) -> Path:
    """Root of all datasets: ``configured`` if given, else ``$TMERGE_DATA``, else ``./data``."""
    return Path(configured or os.environ.get(DATA_ENV) or "data")


def runs_dir(configured: str | None = None) -> Path:
    """Root of all run folders: ``configured`` if given, else ``$TMERGE_RUNS``, else ``./runs``."""
    return Path(configured or os.environ.get(RUNS_ENV) or "runs")


def default_root(configured_data_dir: str | None = None) -> Path:
    """Folder of the embedded default datasets, one folder per kind: ``<data>/default``."""
    return data_dir(configured_data_dir) / "default"


def default_dataset(kind: str, configured_data_dir: str | None = None) -> Path:
    """Folder of the embedded default dataset ``kind`` (``"hcp"`` or ``"brats"``)."""
    return default_root(configured_data_dir) / kind


def default_cache(configured_data_dir: str | None = None) -> Path:
    """The preprocessing cache where a dataset config names none: ``<data>/cache``, outside the
    dataset roots, which may be read-only."""
    return data_dir(configured_data_dir) / "cache"
