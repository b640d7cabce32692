"""Every command composes its config under every profile: ``--show-config`` prints a config of
the command's schema whose values are the profile's experiment file over the dataclass
defaults, with the command's preset on top."""

from __future__ import annotations

import dataclasses

import pytest
import yaml
from omegaconf import OmegaConf

from tmerge.cli import COMMANDS, main
from tmerge.config import PROFILES, experiment_files


def _leaves(tree: dict, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_leaves(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


@pytest.mark.parametrize("profile", PROFILES)
@pytest.mark.parametrize("command", list(COMMANDS))
def test_show_config_of_every_command_and_profile(command, profile, capsys):
    assert main([command, "--profile", profile, "--show-config"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    cmd = COMMANDS[command]
    schema = cmd.load(cmd.schema)
    assert set(shown) == {f.name for f in dataclasses.fields(schema)}
    values = _leaves(shown)
    paths = experiment_files(cmd.experiment, profile) if cmd.experiment else []
    preset = dict(p.split("=", 1) for p in cmd.preset)
    # The files' values as the command resolves them (interpolations such as ${oc.env:HCP_ROOT,…}),
    # a layered profile's own file above its base profile's.
    merged = OmegaConf.merge(*(OmegaConf.load(p) for p in paths)) if paths else None
    written = OmegaConf.to_container(merged, resolve=True) if merged is not None else {}
    for key, value in _leaves(written or {}).items():
        if key not in preset:  # the preset (init=timm for `tmerge timm`) is applied above the file
            assert values[key] == value, f"{command} --profile {profile}: {key} is not the file's {value!r}"
    for key, value in preset.items():
        assert str(values[key]) == value


@pytest.mark.parametrize("command", ["timm", "imm", "target", "sweep"])
def test_brats_commands_take_the_short_keys(command, capsys):
    """`make sweep PORTION=4` and friends pass `portion=4`: every BraTS command knows it."""
    assert main([command, "portion=4", "epochs=3", "--show-config"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["data"]["portion"] == 4 and shown["trainer"]["max_epochs"] == 3
