"""Run-folder protocol and shared stage helpers."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from tmerge.errors import RunError
from tmerge.merge.imm import fisher_epsilon
from tmerge.stages.protocol import start_run


def test_fisher_epsilon_follows_the_fishers_scale():
    fishers = [
        {"a": torch.full((2, 2), 1e-9), "b": torch.zeros(4)},
        {"a": torch.full((2, 2), 3e-9), "b": torch.zeros(4)},
    ]
    # mean entry = (4·1e-9 + 4·3e-9) / 16 = 1e-9
    assert fisher_epsilon(fishers, 1e-3) == pytest.approx(1e-12)
    assert fisher_epsilon(None, 1e-8) == 1e-8  # mean-IMM: unit Fishers, ε as given
    assert fisher_epsilon([{"a": torch.zeros(3)}], 1e-8) == 1e-8  # all-zero Fishers: no scale


@dataclass
class Cfg:
    lr: float = 0.1
    force: bool = False


def test_start_run_skips_finished_refuses_other_config_and_forces(tmp_path):
    run = tmp_path / "run"
    assert start_run(run, Cfg(), "done.json", force=False)
    assert (run / "config.yaml").is_file()
    assert start_run(run, Cfg(), "done.json", force=False)  # unfinished, same config: go on
    (run / "done.json").write_text("{}")
    assert not start_run(run, Cfg(), "done.json", force=False)  # finished: skip
    with pytest.raises(RunError, match="different config"):
        start_run(run, Cfg(lr=0.2), "done.json", force=False)
    assert start_run(run, Cfg(lr=0.2, force=True), "done.json", force=True)
    assert not (run / "done.json").exists()


@dataclass
class NewerCfg:
    """Cfg of a later version: one key more, with a default."""

    lr: float = 0.1
    force: bool = False
    momentum: float = 0.9


def test_a_run_of_an_older_config_version_is_still_recognised(tmp_path):
    """A finished run made before a config key was added is skipped, not refused, while the new
    key keeps its default; set otherwise, it is a different config."""
    run = tmp_path / "run"
    assert start_run(run, Cfg(), "done.json", force=False)
    (run / "done.json").write_text("{}")
    assert not start_run(run, NewerCfg(), "done.json", force=False)
    with pytest.raises(RunError, match="different config"):
        start_run(run, NewerCfg(momentum=0.5), "done.json", force=False)
