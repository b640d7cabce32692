"""NetConfig: net.name and each network's sizes, validation naming the key, the architecture
record and its check against weights written before net.name existed."""

from __future__ import annotations

import pytest
import torch

from tmerge.cli import main
from tmerge.errors import ConfigError, RunError
from tmerge.nets import Isensee2017
from tmerge.nets.config import NETS, NetConfig
from tmerge.sources import check_architecture


def test_default_is_isensee2017_built_as_before() -> None:
    """The default network: same class, parameter names, initial values and RNG use as a direct
    Isensee2017(…) with the config's sizes."""
    cfg = NetConfig(base_filters=4, depth=3, dropout=0.1)
    assert cfg.name == "isensee2017" and cfg.arch == "Isensee2017"
    torch.manual_seed(3)
    net = cfg.build(2, 8)
    after = torch.rand(1)
    torch.manual_seed(3)
    ref = Isensee2017(in_channels=2, n_classes=8, base_filters=4, depth=3, dropout=0.1)
    assert type(net) is Isensee2017 and torch.equal(after, torch.rand(1))
    assert list(net.state_dict()) == list(ref.state_dict())
    assert all(
        torch.equal(a, b) for a, b in zip(net.state_dict().values(), ref.state_dict().values(), strict=True)
    )


def test_architecture_record_per_network() -> None:
    assert NetConfig(base_filters=8).architecture() == {"name": "isensee2017", "base_filters": 8, "depth": 5}
    assert NetConfig(name="dynunet").architecture() == {
        "name": "dynunet",
        "filters": [8, 16, 32, 64, 128],
        "strides": [2, 2, 2, 2],
        "kernel_size": 3,
        "res_block": False,
    }
    assert NetConfig(name="segresnet").architecture() == {
        "name": "segresnet",
        "init_filters": 8,
        "blocks_down": [1, 2, 2, 4],
        "blocks_up": [1, 1, 1],
    }
    assert NetConfig(name="unet").architecture() == {
        "name": "unet",
        "filters": [8, 16, 32, 64, 128],
        "strides": [2, 2, 2, 2],
        "kernel_size": 3,
        "res_units": 2,
    }
    assert {NetConfig(name=n).arch for n in NETS} == {"Isensee2017", "DynUNet", "SegResNet", "UNet"}
    assert [type(NetConfig(name=n).build(4, 3)).__name__ for n in NETS] == list(NETS.values())


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"name": "vnet"}, "net.name"),
        ({"dropout": 1.0}, "net.dropout"),
        ({"base_filters": 0}, "net.base_filters"),
        ({"depth": 1}, "net.depth"),
        ({"name": "dynunet", "filters": [8]}, "net.filters"),
        ({"name": "dynunet", "strides": [2, 2]}, "net.strides"),
        ({"name": "unet", "strides": [2, 0, 2, 2]}, "net.strides"),
        ({"name": "unet", "kernel_size": 4}, "net.kernel_size"),
        ({"name": "unet", "res_units": -1}, "net.res_units"),
        ({"name": "segresnet", "init_filters": 12}, "net.init_filters"),
        ({"name": "segresnet", "blocks_up": [1]}, "net.blocks_up"),
        ({"name": "segresnet", "blocks_down": [2]}, "net.blocks_down"),
    ],
)
def test_bad_values_name_the_key(kwargs, key) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        NetConfig(**kwargs)


def test_keys_of_other_networks_are_not_checked() -> None:
    NetConfig(name="segresnet", filters=[8], strides=[])  # DynUNet/UNet keys, unused here
    NetConfig(name="dynunet", init_filters=3, depth=1)


def test_unknown_name_is_one_error_naming_the_choices(capsys) -> None:
    assert main(["task1", "net.name=vnet", "--show-config"]) == 2
    err = capsys.readouterr().err
    assert "net.name" in err and all(n in err for n in NETS) and "'vnet'" in err and "Traceback" not in err


def test_show_config_of_another_network(capsys) -> None:
    assert (
        main(["task1", "net.name=dynunet", "net.filters=[4,8,16]", "net.strides=[2,2]", "--show-config"]) == 0
    )
    out = capsys.readouterr().out
    assert "name: dynunet" in out and "filters:" in out and "strides:" in out


def test_architecture_check_against_old_and_new_metadata(tmp_path) -> None:
    path = tmp_path / "net.safetensors"
    old = {"arch": "Isensee2017", "in_channels": 2, "base_filters": 8, "depth": 5}  # no "name"
    expected = NetConfig(base_filters=8).architecture()
    check_architecture(path, old, expected, tuple(expected))  # a missing name means isensee2017
    with pytest.raises(RunError, match="another architecture: base_filters=8"):
        check_architecture(path, old, NetConfig(base_filters=4).architecture(), tuple(expected))
    dynunet = NetConfig(name="dynunet")
    with pytest.raises(RunError, match="another architecture: name='isensee2017'"):
        check_architecture(path, old, dynunet.architecture(), tuple(dynunet.architecture()))
    new = {"arch": "DynUNet", **dynunet.architecture()}
    check_architecture(path, new, dynunet.architecture(), tuple(dynunet.architecture()))
    other = NetConfig(name="dynunet", filters=[8, 16, 32, 64, 256]).architecture()
    with pytest.raises(RunError, match=r"another architecture: filters=\[8, 16, 32, 64, 128\]") as info:
        check_architecture(path, new, other, tuple(other))
    assert "strides" not in str(info.value)


@pytest.mark.parametrize(
    "fields",
    [
        {},
        {"depth": 3},
        {"name": "dynunet"},
        {"name": "dynunet", "filters": [4, 8, 16], "strides": [2, 3]},
        {"name": "unet", "filters": [4, 8, 16, 32], "strides": [2, 2, 1]},
        {"name": "segresnet"},
        {"name": "segresnet", "blocks_down": [1, 1, 1], "blocks_up": [1, 1]},
    ],
)
def test_divisor_is_what_the_built_network_needs(fields) -> None:
    cfg = NetConfig(**fields)
    assert cfg.divisor == cfg.build(2, 3).divisor


def test_label_names_the_network_and_its_sizes() -> None:
    assert NetConfig().label() == "Isensee2017 base filters 16 depth 5"
    assert NetConfig(name="dynunet").label() == (
        "DynUNet filters 8/16/32/64/128 strides 2/2/2/2 kernel size 3 res block no"
    )
    segresnet = "SegResNet init filters 8 blocks down 1/2/2/4 blocks up 1/1/1"
    assert NetConfig(name="segresnet").label() == segresnet
