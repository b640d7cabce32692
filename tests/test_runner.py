"""The shared runner: precision choice, the trainer settings' checks (when composed and on this
machine), and Lightning's refusals traced to the key."""

from __future__ import annotations

import lightning as L
import pytest

from tmerge import runner
from tmerge.errors import ConfigError
from tmerge.runner import TrainerConfig, check_trainer, fit, resolve_precision


def test_precision_auto_is_fp32_on_cpu_and_bf16_on_gpu():
    assert resolve_precision("auto", "cpu") == "32-true"
    assert resolve_precision("auto", "gpu") == "bf16-mixed"
    assert resolve_precision("16-mixed", "gpu") == "16-mixed"


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("accelerator", "fpga", "expected one of auto, cpu, gpu"),
        ("devices", "abc", "expected a device count >= 1, -1 (every device), a list of distinct device ids"),
        ("devices", 0, "expected a device count >= 1"),
        ("devices", -2, "expected a device count >= 1"),
        ("devices", [0, 0], "a list of distinct device ids"),
        ("devices", [], "a list of distinct device ids"),
        ("devices", True, "expected a device count"),
        ("devices", 1.5, "expected a device count"),
        ("num_nodes", 0, "expected an integer >= 1"),
        ("strategy", "ddpp", "expected 'auto' or a Lightning strategy name"),
        ("precision", "fp8", "expected one of auto, "),
        ("compile", "sometimes", "expected 'auto', 'true' or 'false'"),
        ("max_epochs", 0, "expected an integer >= 1"),
        ("max_epochs", -1, "expected an integer >= 1"),
        ("min_epochs", -1, "expected an integer >= 0"),
        ("patience", -1, "expected an integer >= 0"),
        ("limit_train_batches", 0.0, "expected a fraction in (0, 1] or a whole batch count > 1"),
        ("limit_train_batches", 2.5, "expected a fraction in (0, 1] or a whole batch count > 1"),
        ("limit_val_batches", -0.5, "expected a fraction in [0, 1]"),
        ("limit_val_batches", float("nan"), "expected a fraction in [0, 1]"),
        ("check_val_every_n_epoch", 0, "expected an integer >= 1"),
        ("log_every_n_steps", 0, "expected an integer >= 1"),
    ],
)
def test_trainer_settings_are_refused_with_key_value_and_what_is_allowed(field, value, expected):
    with pytest.raises(ConfigError) as info:
        TrainerConfig(**{field: value})
    message = str(info.value)
    assert message.startswith(f"trainer.{field}: got {value!r}") and expected in message


def test_min_epochs_above_max_epochs_is_refused():
    with pytest.raises(ConfigError, match=r"trainer.min_epochs: got 5, more than trainer.max_epochs=3"):
        TrainerConfig(max_epochs=3, min_epochs=5)


@pytest.mark.parametrize(
    "fields",
    [
        {},
        {"accelerator": "gpu"},  # not checked against this machine when composed (login nodes)
        {"devices": "auto"},
        {"devices": -1},
        {"devices": [0, 1]},
        {"devices": "0,1"},
        {"devices": "2"},
        {"strategy": "DDP"},  # Lightning lower-cases strategy names
        {"precision": "16"},
        {"precision": "bf16-mixed"},
        {"compile": "True"},
        {"limit_train_batches": 3.0, "limit_val_batches": 0.0},
        {"patience": 0, "min_epochs": 0},
    ],
)
def test_valid_trainer_settings_compose(fields):
    TrainerConfig(**fields)


def test_every_lightning_precision_is_accepted():
    import typing

    from lightning.fabric.connector import _PRECISION_INPUT_STR

    for value in typing.get_args(_PRECISION_INPUT_STR):
        TrainerConfig(precision=value)


def test_a_missing_accelerator_names_what_was_found(monkeypatch):
    monkeypatch.setattr(runner, "available_accelerators", lambda: ["cpu"])
    with pytest.raises(ConfigError) as info:
        check_trainer(TrainerConfig(accelerator="gpu"))
    assert str(info.value) == (
        "trainer.accelerator: got 'gpu' but no CUDA/MPS device was found on this machine; expected cpu or auto"
    )
    with pytest.raises(ConfigError, match=r"got 'cuda' but no CUDA device was found"):
        check_trainer(TrainerConfig(accelerator="cuda"))
    check_trainer(TrainerConfig(accelerator="cpu"))


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        # Lightning's own checks, on any machine: ids are for GPUs, FSDP needs one.
        ({"devices": [0]}, "trainer.devices: got [0] but Lightning refuses it on this machine: `devices` selected"),
        ({"strategy": "fsdp"}, "trainer.strategy: got 'fsdp' but Lightning refuses it on this machine: The strategy"),
    ],
)
def test_lightnings_refusals_name_the_trainer_key(fields, message):
    with pytest.raises(ConfigError) as info:
        check_trainer(TrainerConfig(accelerator="cpu", **fields))
    assert str(info.value).startswith(message) and "\n" not in str(info.value)


def test_fit_reports_a_refused_setting_as_the_users(monkeypatch, tmp_path):
    """A setting only Lightning can judge, met when fit builds its Trainer: a ConfigError naming
    the key (the stages check up front too; fit must not rely on it)."""
    with pytest.raises(ConfigError, match=r"^trainer.strategy: got 'fsdp' but Lightning refuses it"):
        fit(None, None, run_dir=tmp_path / "run", trainer_cfg=TrainerConfig(accelerator="cpu", strategy="fsdp"))


def test_fit_keeps_the_traceback_of_tmerges_own_trainer_arguments(monkeypatch, tmp_path):
    """Lightning refusing something tmerge passed (not the user's settings) stays a bug: the
    original exception, not a ConfigError."""
    real = L.Trainer

    def trainer(**kwargs):
        if "callbacks" in kwargs:  # the run's trainer, with tmerge's callbacks: refused
            raise ValueError("a callback Lightning refuses")
        return real(**kwargs)  # check_trainer's: the user's settings alone pass

    monkeypatch.setattr(runner.L, "Trainer", trainer)
    with pytest.raises(ValueError, match="a callback Lightning refuses"):
        fit(None, None, run_dir=tmp_path / "run", trainer_cfg=TrainerConfig(accelerator="cpu"))
