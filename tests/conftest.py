"""Shared fixtures: one tiny generated dataset (32³) for every test that needs real files."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
from helpers.anatomy import require_anatomy
from helpers.tiny_settings import TINY_ARGS

# Offline, silent W&B for every test; nothing may reach the network.
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")
# Caches and default runs of the tests go to a temporary folder, never into the checkout.
os.environ["TMERGE_DATA"] = tempfile.mkdtemp(prefix="tmerge-test-data-")
os.environ["TMERGE_RUNS"] = tempfile.mkdtemp(prefix="tmerge-test-runs-")


@pytest.fixture(scope="session")
def tiny_default(tmp_path_factory) -> Path:
    """The embedded default layout at 32³ with a small BraTS pool: ``<root>/{hcp,brats}``.

    58 HCP-like subjects (the paper's splits need all of them), 24 labelled and 2 unlabelled
    BraTS-like subjects — use ``data.test_size=8 data.pool_size=16`` with it. Skipped where the
    anatomy package it is generated from is missing.
    """
    require_anatomy()
    from tmerge.data.synthetic.generate import generate_default

    root = tmp_path_factory.mktemp("tiny_default")
    generate_default(root, size=32, seed=0, n_hcp=58, n_brats=24, n_brats_val=2, workers=2, progress=False)
    return root




@pytest.fixture(scope="module")
def tiny_sources(tiny_default, tmp_path_factory) -> Path:
    """A runs folder with task1 and task2 trained tiny on the tiny HCP data, once per module
    (each module's target runs go beside them)."""
    from tmerge.cli import main

    runs = tmp_path_factory.mktemp("runs")
    hcp = [f"data.root={tiny_default / 'hcp'}", f"runs_dir={runs}", *TINY_ARGS]
    assert main(["task1", *hcp]) == 0
    assert main(["task2", *hcp]) == 0
    return runs
