"""Config composition: defaults < experiment YAML < command line; clear errors naming the key."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from tmerge.config import compose, config_hash, save_config
from tmerge.errors import ConfigError


@dataclass
class Inner:
    lr: float = 0.1
    name: str = "x"


@dataclass
class Outer:
    seed: int = 0
    tags: list[str] = field(default_factory=list)
    inner: Inner = field(default_factory=Inner)
    root: str | None = None


@pytest.fixture
def experiments(tmp_path, monkeypatch):
    folder = tmp_path / "experiments"
    (folder / "paper").mkdir(parents=True)
    (folder / "stage.yaml").write_text("seed: 3\ninner:\n  lr: 0.5\n")
    (folder / "paper" / "stage.yaml").write_text("seed: 7\n")
    monkeypatch.setenv("TMERGE_EXPERIMENTS", str(folder))
    return folder


def test_layers_in_order(experiments):
    cfg = compose(Outer, "stage", ["inner.lr=0.25"])
    assert isinstance(cfg, Outer) and isinstance(cfg.inner, Inner)
    assert (cfg.seed, cfg.inner.lr, cfg.inner.name) == (3, 0.25, "x")  # YAML seed, CLI lr, default name


def test_profile_selects_family(experiments):
    assert compose(Outer, "stage", profile="paper").seed == 7
    with pytest.raises(ConfigError, match="profile"):
        compose(Outer, "stage", profile="huge")


def test_benchmark_profile_refines_the_default_files(experiments):
    (experiments / "benchmark").mkdir()
    (experiments / "benchmark" / "stage.yaml").write_text("inner:\n  name: long\n")
    cfg = compose(Outer, "stage", ["seed=5"], profile="benchmark")
    # default file's lr, benchmark file's name, the command line's seed; paper's file not read
    assert (cfg.seed, cfg.inner.lr, cfg.inner.name) == (5, 0.5, "long")
    # keys (and, below, stages) the benchmark profile does not refine are the default profile's
    assert compose(Outer, "stage", profile="benchmark").seed == 3
    (experiments / "benchmark" / "stage.yaml").unlink()
    assert compose(Outer, "stage", profile="benchmark").inner.name == "x"


def test_missing_stage_file_uses_defaults(experiments):
    assert compose(Outer, "nothing-here").seed == 0


def test_unknown_key_names_it(experiments):
    with pytest.raises(ConfigError, match=r"inner\.lrr"):
        compose(Outer, "stage", ["inner.lrr=1"])


def test_wrong_type_names_key(experiments):
    with pytest.raises(ConfigError, match=r"seed"):
        compose(Outer, "stage", ["seed=abc"])


def test_not_key_value(experiments):
    with pytest.raises(ConfigError, match="key=value"):
        compose(Outer, "stage", ["seed"])


def test_aliases_and_lists(experiments):
    cfg = compose(Outer, None, ["lr=0.01", "tags=[a,b]"], aliases={"lr": "inner.lr"})
    assert cfg.inner.lr == 0.01 and cfg.tags == ["a", "b"]


def test_bad_yaml_names_file(experiments):
    (experiments / "stage.yaml").write_text("seed: [unclosed\n")
    with pytest.raises(ConfigError, match="stage.yaml"):
        compose(Outer, "stage")


def test_unknown_key_in_yaml_names_file(experiments):
    (experiments / "stage.yaml").write_text("sed: 1\n")
    with pytest.raises(ConfigError, match=r"sed.*stage\.yaml"):
        compose(Outer, "stage")


def test_saved_config_roundtrip_and_hash(experiments, tmp_path):
    cfg = compose(Outer, "stage", ["tags=[a]"])
    path = save_config(cfg, tmp_path / "run" / "config.yaml")
    again = compose(Outer, None, [])
    assert config_hash(cfg) != config_hash(again)
    from omegaconf import OmegaConf

    assert config_hash(OmegaConf.load(path)) == config_hash(cfg)
