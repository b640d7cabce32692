"""``tmerge forgetting``'s candidate parameters: the T-IMM row merges as the adaption did."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from helpers.sources import fake_source
from safetensors.torch import load_file

from tmerge.nets import layer_groups, partition
from tmerge.nets.config import NetConfig
from tmerge.stages.forgetting import ForgettingConfig, candidate_parameters

NET = NetConfig(base_filters=4, depth=3)


def _runs(tmp_path: Path, record: dict) -> tuple[dict[str, torch.Tensor], ...]:
    """Two sources and a T-IMM α record (α = 0.25 / 0.75 in every layer) in ``tmp_path``;
    return the sources' weights."""
    for seed, name in enumerate(("task1", "task2")):
        fake_source(tmp_path, name, seed=seed)
    template = NET.build(2, 8)
    fused, _ = partition(template)
    alphas = {layer: [0.25, 0.75] for layer in layer_groups(template, fused)}
    timm = tmp_path / "brats" / "p4" / "timm"
    timm.mkdir(parents=True)
    (timm / "alphas.json").write_text(json.dumps({"sources": ["task1", "task2"], "alphas": alphas, **record}))
    return tuple(load_file(tmp_path / name / "net.safetensors") for name in ("task1", "task2"))


def _is_plain_average(merged: dict[str, torch.Tensor], one, two) -> bool:
    """Whether every merged tensor is 0.25 θ¹ + 0.75 θ² (eq. 2 with an ε that swamps the Fisher)."""
    return all(torch.allclose(p, 0.25 * one[k] + 0.75 * two[k], rtol=1e-3, atol=1e-4) for k, p in merged.items())


def test_timm_row_merges_with_the_eps_the_run_used(tmp_path: Path) -> None:
    """The adaption learned α with its own ε (recorded in alphas.json); forgetting's ``eps`` (that
    of its IMM row) must not replace it. An ε of 1e6 × the mean Fisher entry makes eq. 2 a plain
    α-weighted average; forgetting's own 1e-8 would keep it Fisher-weighted."""
    one, two = _runs(tmp_path, {"eps": 1e6})
    rows = candidate_parameters(ForgettingConfig(runs_dir=str(tmp_path), net=NET, eps=1e-8))
    assert _is_plain_average(rows["T-IMM"], one, two)
    assert not _is_plain_average(rows["IMM"], one, two)  # the IMM row keeps forgetting's ε


def test_timm_row_of_an_older_record_falls_back_with_a_note(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """alphas.json written before ε was recorded: forgetting's ``eps`` is used, and the log says so."""
    one, two = _runs(tmp_path, {})
    with caplog.at_level(logging.WARNING, logger="tmerge"):
        rows = candidate_parameters(ForgettingConfig(runs_dir=str(tmp_path), net=NET, eps=1e6))
    assert _is_plain_average(rows["T-IMM"], one, two)
    assert "records no eps" in caplog.text and "eps=1000000.0" in caplog.text
