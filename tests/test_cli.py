"""The ``tmerge`` command line: help, config printing and one-line errors with exit status 2."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tmerge.cli import COMMANDS, main


def test_every_command_has_help(capsys):
    for name in COMMANDS:
        with pytest.raises(SystemExit) as exc:
            main([name, "--help"])
        assert exc.value.code == 0
        out = capsys.readouterr().out
        assert "key=value" in out and "--profile" in out


def test_show_config_merges_experiment_and_overrides(capsys):
    assert main(["task2", "--show-config", "trainer.max_epochs=3"]) == 0
    out = capsys.readouterr().out
    assert "init_from: task1" in out  # from experiments/task2.yaml
    assert "max_epochs: 3" in out  # from the command line
    assert "labels: '8:14'" in out


def test_timm_preset_and_portion_alias(capsys):
    assert main(["timm", "--show-config", "portion=4"]) == 0
    out = capsys.readouterr().out
    assert "init: timm" in out and "portion: 4" in out


def test_paper_profile(capsys):
    assert main(["task1", "--show-config", "--profile", "paper"]) == 0
    out = capsys.readouterr().out
    assert "patch_size: 128" in out and "base_filters: 16" in out


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["task1", "trainer.max_epoch=3"], "trainer.max_epoch"),  # typo in a key
        (["task1", "trainer.max_epochs=many"], "trainer.max_epochs"),  # wrong type
        (["task1", "max_epochs"], "key=value"),  # not an override
        (["target", "init=magic"], "init"),  # unknown initialisation
        (["task1", "data.patch_size=20"], "patch_size"),  # invalid value
    ],
)
def test_bad_config_is_one_line_and_exit_2(args, needle, capsys, tmp_path):
    assert main([*args, f"runs_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert not any(tmp_path.iterdir())  # nothing written


def test_console_script_exit_status(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "tmerge.cli", "task1", "no.such.key=1"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 2
    assert "no.such.key" in proc.stderr and "Traceback" not in proc.stderr
