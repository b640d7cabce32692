"""Where data and runs live: config first, then the environment, then defaults.

``TMERGE_DATA`` (default ``data/``) holds datasets — the embedded default under
``<data>/default/{hcp,brats}`` and preprocessing caches under ``<data>/cache``.
``TMERGE_RUNS`` (default ``runs/``) holds one folder per run: ``runs/task1``, ``runs/task2``,
``runs/brats/p<portion>/<init>``, ``runs/report``.
"""

from __future__ import annotations

import os
from pathlib import Path


def data_dir(configured: str | None = None) -> Path:
    """Root of all datasets: ``configured`` if given, else ``$TMERGE_DATA``, else ``./data``."""
    return Path(configured or os.environ.get("TMERGE_DATA") or "data")


def runs_dir(configured: str | None = None) -> Path:
    """Root of all run folders: ``configured`` if given, else ``$TMERGE_RUNS``, else ``./runs``."""
    return Path(configured or os.environ.get("TMERGE_RUNS") or "runs")


def default_dataset(kind: str, configured_data_dir: str | None = None) -> Path:
    """Folder of the embedded default dataset ``kind`` (``"hcp"`` or ``"brats"``)."""
    return data_dir(configured_data_dir) / "default" / kind
