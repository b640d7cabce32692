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


# ---- the catalogue of bad settings (issue 24): refused when composed, nothing written ------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        # Trainer settings that crashed inside Lightning as "internal error" (exit 1).
        (["task1", "trainer.devices=abc"], "trainer.devices: got 'abc'; expected a device count >= 1"),
        (["task1", "trainer.precision=fp8"], "trainer.precision: got 'fp8'; expected one of auto, "),
        (["task1", "trainer.strategy=magic"], "trainer.strategy: got 'magic'; expected 'auto' or a Lightning"),
        (["task1", "trainer.accelerator=fpga"], "trainer.accelerator: got 'fpga'; expected one of auto, cpu"),
        # Budgets that ran to the end as if they were results.
        (["timm", "trainer.max_epochs=0"], "trainer.max_epochs: got 0; expected an integer >= 1"),
        (["task1", "epochs=0"], "trainer.max_epochs: got 0; expected an integer >= 1"),
        (["task1", "trainer.limit_train_batches=0"], "trainer.limit_train_batches: got 0.0; expected a fraction"),
        (["task1", "trainer.patience=-1"], "trainer.patience: got -1; expected an integer >= 0"),
        (["task1", "optim.lr=-1"], "optim.lr: got -1.0; expected a positive number"),
        (["timm", "optim.lr=0"], "optim.lr: got 0.0; expected a positive number"),
        (["task1", "optim.weight_decay=-0.1"], "optim.weight_decay: got -0.1; expected a finite number >= 0"),
        (["task1", "optim.plateau_factor=2"], "optim.plateau_factor: got 2.0; expected a number > 0 and < 1"),
        (["task1", "optim.plateau_patience=-1"], "optim.plateau_patience: got -1; expected an integer >= 0"),
        (["task1", "optim.min_lr=-1"], "optim.min_lr: got -1.0; expected a finite number >= 0"),
        (["timm", "adaption.lr=-1"], "adaption.lr: got -1.0; expected a positive number"),
        (["timm", "adaption.delta_lr=-1"], "adaption.delta_lr: got -1.0; expected a positive number"),
        (["timm", "adaption.max_epochs=0"], "adaption.max_epochs: got 0; expected an integer >= 1"),
        (["timm", "adaption.patience=0"], "adaption.patience: got 0; expected an integer >= 1"),
        (["timm", "protocol=fixed", "fixed.epochs=0"], "fixed.epochs: got 0; expected an integer >= 1"),
        (["timm", "fixed.warmup_epochs=-1"], "fixed.warmup_epochs: got -1; expected an integer >= 0"),
        # What MONAI's sliding window would refuse only at the first validation.
        (["task1", "loss.sw_overlap=1"], "loss.sw_overlap: got 1.0; expected a number >= 0 and < 1"),
        (["task1", "loss.sw_roi=20"], "loss.sw_roi: got 20; expected 0 (the training patch) or a multiple of 16"),
        (["task1", "loss.sw_batch_size=0"], "loss.sw_batch_size: got 0; expected an integer >= 1"),
        # Cases that were already refused (the catalogue).
        (["timm", "portion=abc"], "config key data.portion (command line): Value 'abc'"),
        (["timm", "portion=0"], "portion: got 0; expected a percentage between 1 and 100"),
        (["timm", "portion=8.5"], "config key data.portion (command line): Value '8.5'"),
        (["sweep", "seeds=foo"], "config key seeds (command line)"),
        (["target", "init=magic"], "init: expected one of"),
        (["timm", "data.patch_size=50"], "patch_size: got 50; expected a multiple of 16"),
        (["task1", "trainer.max_epoch=3"], "config key trainer.max_epoch (command line)"),
        (["task1", "max_epochs"], "'max_epochs': overrides are key=value pairs"),
    ],
)
def test_bad_setting_is_one_line_exit_2_and_writes_nothing(args, message, capsys, tmp_path, monkeypatch):
    monkeypatch.delenv("TMERGE_DEBUG", raising=False)
    monkeypatch.setenv("TMERGE_DATA", str(tmp_path / "data"))
    runs = tmp_path / "runs"
    assert main([*args, f"runs_dir={runs}"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert err.startswith(f"tmerge {args[0]}: error: ") and message in err
    assert not runs.exists() and not (tmp_path / "data").exists()  # no run folder, lock or cache


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["trainer.accelerator=gpu"], "trainer.accelerator: got 'gpu' but no CUDA/MPS device was found on this "
         "machine; expected cpu or auto"),
        (["trainer.accelerator=cpu", "trainer.devices=[0]"], "trainer.devices: got [0] but Lightning refuses it"),
        (["trainer.accelerator=cpu", "trainer.strategy=fsdp"], "trainer.strategy: got 'fsdp' but Lightning refuses"),
    ],
)
@pytest.mark.parametrize("command", ["task1", "timm"])
def test_trainer_settings_this_machine_cannot_run_are_refused_before_anything_is_written(
    command, args, message, capsys, tmp_path, monkeypatch
):
    """Composed fine (``--show-config`` of a GPU job works on a login node), refused when the
    stage starts on a machine without what they need, naming the key."""
    monkeypatch.delenv("TMERGE_DEBUG", raising=False)
    monkeypatch.setenv("TMERGE_DATA", str(tmp_path / "data"))
    monkeypatch.setattr("tmerge.runner.available_accelerators", lambda: ["cpu"])  # as a CPU-only machine
    runs = tmp_path / "runs"
    assert main([command, *args, f"runs_dir={runs}", "--show-config"]) == 0
    capsys.readouterr()
    assert main([command, *args, f"runs_dir={runs}"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith(f"tmerge {command}: error: {message}")
    assert not runs.exists() and not (tmp_path / "data").exists()


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
