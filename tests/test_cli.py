"""The ``tmerge`` command line: help, config printing and one-line errors with exit status 2."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

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
        (["task1", "loss.name=focal"], "loss.name"),  # unknown loss, refused by LossConfig
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


# ---- tracebacks: a user error is one line unless asked; a bug always shows where it is ---------

SCORE_ERROR = "tmerge score: error: predictions: expected a folder of NIfTI label maps, got None"


def test_user_error_is_one_line_without_traceback(capsys, monkeypatch):
    monkeypatch.delenv("TMERGE_DEBUG", raising=False)
    assert main(["score"]) == 2  # ScoreConfig needs `predictions`: a ConfigError
    err = capsys.readouterr().err
    assert err.strip() == SCORE_ERROR


@pytest.mark.parametrize("value", ["0", "", "false"])
def test_tmerge_debug_off_values_keep_one_line(value, capsys, monkeypatch):
    monkeypatch.setenv("TMERGE_DEBUG", value)
    assert main(["score"]) == 2
    assert capsys.readouterr().err.strip() == SCORE_ERROR


@pytest.mark.parametrize(
    ("args", "env"),
    [(["score"], {"TMERGE_DEBUG": "1"}), (["score", "--debug"], {})],
    ids=["TMERGE_DEBUG=1", "--debug"],
)
def test_debug_prints_the_traceback_of_a_user_error(args, env, capsys, monkeypatch):
    monkeypatch.delenv("TMERGE_DEBUG", raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert main(args) == 2  # the exit status does not change
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert lines[0] == "Traceback (most recent call last):"
    assert "tmerge.errors.ConfigError: predictions: expected a folder" in err
    assert 'score.py", line' in err  # where it was raised
    assert lines[-1] == SCORE_ERROR  # the one-line message still comes last


def test_unexpected_exception_prints_its_traceback(capsys, monkeypatch):
    """A bug (any exception that is not a TmergeError) is never mistaken for a user error."""
    monkeypatch.delenv("TMERGE_DEBUG", raising=False)

    def broken(cfg):
        raise ValueError("merge_tensor: alpha must have shape (2,), got (3,)")

    monkeypatch.setattr("tmerge.stages.score.run_score", broken)
    assert main(["score"]) == 1  # the status of an uncaught exception, as before
    err = capsys.readouterr().err
    assert err.startswith("Traceback (most recent call last):")
    assert "in broken" in err and "ValueError: merge_tensor: alpha must have shape (2,), got (3,)" in err
    assert err.strip().splitlines()[-1] == (
        "tmerge score: internal error (ValueError): this is a bug in tmerge, not in the input; "
        "the traceback above shows where"
    )


def test_merge_recipe_alphas_are_a_config_error(tmp_path, capsys, monkeypatch):
    """The recipe's α are the user's: refused in one line (exit 2) before anything merges, not
    by the merge's own argument checks (a ValueError with a traceback)."""
    import yaml

    from tmerge.io import write_safetensors

    monkeypatch.delenv("TMERGE_DEBUG", raising=False)
    models = []
    for i in range(2):
        models.append(
            str(write_safetensors(tmp_path / f"m{i}.safetensors", {"w": torch.full((2,), float(i))}))
        )
    out = tmp_path / "out" / "merged.safetensors"
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {"method": "mean-imm", "models": models, "params": {"alphas": [0.7, 0.2]}, "output": str(out)}
        )
    )
    assert main(["merge", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "params: mean-imm: alphas: mixing ratios must sum to 1 over the 2 models, got sum 0.9" in err
    assert not out.exists()
