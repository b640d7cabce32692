"""The network↔data contract, checked where a run's config is composed: the patch, the sliding
window and the volumes' padding follow the network's divisor (the product of its downsampling
strides), and ``channel_map`` fits the source and target input channels — each a one-line
ConfigError naming the key, refused before anything is written."""

from __future__ import annotations

import re

import pytest
import torch
from helpers.sources import fake_source
from helpers.tiny_settings import TINY_NET
from helpers.trees import write_hcp_tree

from tmerge.cli import main
from tmerge.config import compose
from tmerge.data import HCPDataModule
from tmerge.errors import ConfigError
from tmerge.nets.config import NetConfig
from tmerge.stages.configs import TargetStageConfig
from tmerge.stages.forgetting import ForgettingConfig
from tmerge.stages.source import SourceStageConfig

# Each network's config, its divisor, and its smallest patch (instance-normalised bottlenecks
# need more than one voxel: twice the divisor; segresnet's group norm does not).
NETS = [
    ({"name": "isensee2017"}, 16, 32),
    ({"name": "isensee2017", "depth": 6}, 32, 64),
    ({"name": "isensee2017", "depth": 3}, 4, 8),
    ({"name": "dynunet"}, 16, 32),
    ({"name": "dynunet", "filters": [8, 16, 32], "strides": [1, 3]}, 3, 6),
    ({"name": "unet", "filters": [4, 8, 16], "strides": [2, 2]}, 4, 8),
    ({"name": "segresnet"}, 8, 8),
    ({"name": "segresnet", "blocks_down": [1, 1, 1], "blocks_up": [1, 1]}, 4, 4),
]


@pytest.mark.parametrize(("sizes", "divisor", "smallest"), NETS)
def test_every_network_config_has_the_divisor_of_its_network(sizes, divisor, smallest) -> None:
    cfg = NetConfig(**sizes)
    assert cfg.divisor == divisor == cfg.build(2, 3).divisor
    assert cfg.smallest_input == smallest


@pytest.mark.parametrize(("sizes", "divisor", "smallest"), NETS)
def test_the_smallest_patch_trains_and_a_smaller_multiple_would_not(sizes, divisor, smallest) -> None:
    """What the check lets through runs a training step; what it refuses would fail there."""
    net = NetConfig(**{**sizes, "dropout": 0.0}).build(1, 2).train()
    net(torch.randn(2, 1, smallest, smallest, smallest)).sum().backward()
    if smallest > divisor:
        with pytest.raises(ValueError):
            net(torch.randn(2, 1, divisor, divisor, divisor))
    with pytest.raises((ValueError, RuntimeError)):
        net(torch.randn(2, 1, smallest + 1, smallest + 1, smallest + 1))


def test_a_deeper_network_refuses_the_patch_when_composed() -> None:
    """net.depth=6 halves once more: 48 is no multiple of 32, refused in one line naming the key,
    the value and the divisor (before: accepted, then the first forward failed)."""
    with pytest.raises(ConfigError) as caught:
        compose(TargetStageConfig, None, ["net.depth=6"])
    message = str(caught.value)
    assert message.startswith("data.patch_size: got 48; expected a multiple of 32") and "net.divisor" in message
    assert "\n" not in message
    compose(TargetStageConfig, None, ["net.depth=6", "data.patch_size=64"])  # a multiple: fine


@pytest.mark.parametrize(
    ("schema", "overrides", "message"),
    [
        (SourceStageConfig, ["data.patch_size=40"], "data.patch_size: got 40; expected a multiple of 16 of at least 32"),
        (SourceStageConfig, ["data.patch_size=16"], "data.patch_size: got 16; expected a multiple of 16 of at least 32"),
        (SourceStageConfig, ["loss.sw_roi=40"], "loss.sw_roi: got 40; expected 0 (the training patch) or a multiple of 16"),
        (TargetStageConfig, ["net.name=dynunet", "net.strides=[2,2,2,4]"], "data.patch_size: got 48; expected a multiple of 32"),
        (TargetStageConfig, ["net.name=segresnet", "data.patch_size=24", "loss.sw_roi=20"], "loss.sw_roi: got 20; expected 0 (the training patch) or a multiple of 8 (net.divisor"),
        (ForgettingConfig, ["net.depth=6", "loss.sw_roi=64"], "data.patch_size: got 48; expected a multiple of 32"),
    ],
)
def test_patch_and_window_follow_the_divisor(schema, overrides, message) -> None:
    with pytest.raises(ConfigError, match="^" + re.escape(message)):
        compose(schema, None, overrides)


def test_patches_that_were_refused_as_non_multiples_of_16_are_fine_where_the_divisor_allows() -> None:
    assert compose(TargetStageConfig, None, ["net.name=segresnet", "data.patch_size=24"]).data.patch_size == 24
    assert compose(SourceStageConfig, None, [*TINY_NET[:2], "data.patch_size=12", "loss.sw_roi=20"])


def test_the_cli_refuses_the_patch_in_one_line_and_writes_nothing(tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("TMERGE_DATA", str(tmp_path / "data"))
    assert main(["task1", "net.depth=6", f"runs_dir={tmp_path / 'runs'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("tmerge task1: error: data.patch_size: got 48; expected a multiple of 32")
    assert len(err.splitlines()) == 1 and not (tmp_path / "runs").exists() and not (tmp_path / "data").exists()


@pytest.mark.parametrize("divisor", [4, 16])
def test_volumes_are_padded_to_the_networks_divisor(tmp_path, divisor) -> None:
    """The data layer pads with the divisor it is handed (the stages hand it the network's), not
    a fixed 16: the tree's brains are about 17 voxels across."""
    write_hcp_tree(tmp_path / "hcp", n=58)
    dm = HCPDataModule(
        root=str(tmp_path / "hcp"), cache_dir=str(tmp_path / "cache"), patch_size=8, divisor=divisor
    )
    assert dm.preprocess_settings().multiple == divisor
    dm.prepare_data()
    dm.setup("fit")
    shapes = {tuple(s.image.shape[1:]) for s in dm.loaded_subjects("val")}
    assert all(n % divisor == 0 and n >= 8 for shape in shapes for n in shape)
    if divisor == 4:
        assert any(n % 16 for shape in shapes for n in shape)  # tighter than the old fixed 16


# ---- channel_map: checked against the target's and the source's input channels ------------


def _timm(tmp_path, capsys, *extra: str) -> tuple[int, str]:
    fake_source(tmp_path, "task1")  # 2 input channels (T1, T2)
    fake_source(tmp_path, "task2")
    status = main(["timm", f"runs_dir={tmp_path}", "portion=4", *TINY_NET, *extra])
    return status, capsys.readouterr().err


def _errors(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("tmerge timm: error: ")]


def test_channel_map_of_the_wrong_length_is_one_config_error(tmp_path, capsys) -> None:
    """The embedded BraTS target has 4 input channels: a 2-entry map cannot feed them."""
    status, err = _timm(tmp_path, capsys, "channel_map=[0,1]")
    assert status == 2 and len(_errors(err)) == 1
    assert "channel_map: got [0, 1] (2 entries); expected one source channel per target channel, 4" in err
    assert not (tmp_path / "brats").exists()


def test_channel_map_naming_a_channel_the_source_lacks_is_one_config_error(tmp_path, capsys) -> None:
    status, err = _timm(tmp_path, capsys, "channel_map=[0,0,1,2]")
    assert status == 2 and len(_errors(err)) == 1
    assert "channel_map: [0, 0, 1, 2] names source channel 2, but" in err and "has 2 input channels" in err
    assert not (tmp_path / "brats").exists()


def test_negative_channel_map_entry_is_one_config_error(tmp_path, capsys) -> None:
    status, err = _timm(tmp_path, capsys, "channel_map=[0,0,1,-1]")
    assert status == 2 and "channel_map: expected source-channel indices >= 0" in err

