"""Configuration composition: typed dataclass defaults < experiment YAML < command-line overrides.

Each module owns the dataclass that configures it (``HCPDataConfig`` in ``tmerge.data.hcp``,
``OptimConfig`` in ``tmerge.modules.segmentation``, …); a stage nests them into one run config.
This module only composes, validates and saves them:

* ``experiments/<stage>.yaml`` (or ``experiments/paper/<stage>.yaml`` with ``profile="paper"``)
  overrides the dataclass defaults;
* ``key=value`` pairs from the command line override both (OmegaConf dotlist syntax, e.g.
  ``trainer.max_epochs=3`` or ``seeds=[0,1,2]``);
* an unknown key or a value of the wrong type is a :class:`~tmerge.errors.ConfigError` that
  names the key.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from tmerge.errors import ConfigError
from tmerge.io import write_text

T = TypeVar("T")

#: The families of experiment settings, selected by one switch (``--profile`` / ``PROFILE=``):
#: ``default`` (CPU-sized, embedded data), ``paper`` (the paper's scale) and ``benchmark`` (the
#: default's settings with ``experiments/benchmark/<stage>.yaml`` merged on top: converged sources
#: and the fixed protocol of ``make benchmark``).
PROFILES = ("default", "paper", "benchmark")
#: Profiles whose files refine another profile's instead of replacing them.
LAYERED = {"benchmark": "default"}


def project_root() -> Path:
    """The folder holding ``experiments/`` (the repository root in a source checkout).

    Overridable with ``TMERGE_EXPERIMENTS`` for an installed package used outside the checkout.
    """
    env = os.environ.get("TMERGE_EXPERIMENTS")
    if env:
        return Path(env).resolve().parent
    return Path(__file__).resolve().parents[2]


def experiments_dir() -> Path:
    """Folder of the experiment YAML files (``TMERGE_EXPERIMENTS`` or ``<repo>/experiments``)."""
    env = os.environ.get("TMERGE_EXPERIMENTS")
    return Path(env) if env else project_root() / "experiments"


def experiment_file(stage: str, profile: str = "default") -> Path | None:
    """The YAML file for ``stage`` under ``profile``, or ``None`` if that stage has none."""
    if profile not in PROFILES:
        raise ConfigError(f"profile: expected one of {', '.join(PROFILES)}, got {profile!r}")
    folder = experiments_dir() if profile == "default" else experiments_dir() / profile
    path = folder / f"{stage}.yaml"
    return path if path.is_file() else None


def experiment_files(stage: str, profile: str = "default") -> list[Path]:
    """The YAML files for ``stage`` under ``profile``, lowest layer first: a layered profile's
    base file (e.g. ``experiments/task1.yaml``) under its own (``experiments/benchmark/task1.yaml``)."""
    base = LAYERED.get(profile)
    files = experiment_files(stage, base) if base is not None else []
    own = experiment_file(stage, profile)
    return files + ([own] if own is not None else [])


def check_count(key: str, value: int, least: int) -> None:
    """Refuse an integer setting below ``least``, naming ``key`` and the value."""
    if not value >= least:
        raise ConfigError(f"{key}: got {value!r}; expected an integer >= {least}")


def check_number(
    key: str, value: float, *, least: float = 0.0, strict: bool = True, below: float | None = None
) -> None:
    """Refuse a real setting that is not finite, not above ``least`` (``strict``; else not at
    least ``least``), or not below ``below``, naming ``key``, the value and the allowed range."""
    low = value > least if strict else value >= least
    if math.isfinite(value) and low and (below is None or value < below):
        return
    bound = f"> {least:g}" if strict else f">= {least:g}"
    if below is not None:
        expected = f"a number {bound} and < {below:g}"
    else:
        expected = "a positive number" if strict and least == 0 else f"a finite number {bound}"
    raise ConfigError(f"{key}: got {value!r}; expected {expected}")


def _describe(exc: OmegaConfBaseException) -> str:
    key = getattr(exc, "full_key", None)
    msg = str(exc).splitlines()[0]
    return f"{key}: {msg}" if key else msg


def apply_aliases(overrides: Sequence[str], aliases: Mapping[str, str]) -> list[str]:
    """Rewrite short top-level keys (``portion=4``) to their full path (``data.portion=4``)."""
    out = []
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"{item!r}: overrides are key=value pairs (e.g. trainer.max_epochs=3)")
        out.append(f"{aliases.get(key, key)}={value}")
    return out


def compose(
    schema: type[T],
    stage: str | None = None,
    overrides: Sequence[str] = (),
    *,
    profile: str = "default",
    aliases: Mapping[str, str] | None = None,
    files: Sequence[str | Path] = (),
) -> T:
    """Build a validated config object of type ``schema``.

    Args:
        schema: the stage's dataclass (its defaults are the lowest layer).
        stage: name of the experiment file to merge (``experiments/<stage>.yaml``), if any.
        overrides: ``key=value`` strings from the command line (highest layer).
        profile: one of :data:`PROFILES`.
        aliases: short key → full key (e.g. ``{"portion": "data.portion"}``).
        files: YAML files merged above the experiment file and below the overrides (e.g. a
            ``tmerge merge`` recipe).

    Returns:
        An instance of ``schema`` (an OmegaConf structured config: attribute access, typed).

    Raises:
        ConfigError: unknown key, wrong type, or an unreadable experiment file — naming the key
            or the file.
    """
    cfg = OmegaConf.structured(schema)
    layers: list[Path] = experiment_files(stage, profile) if stage is not None else []
    for given in files:
        if not Path(given).is_file():
            raise ConfigError(f"{given}: file not found; expected a YAML file")
        layers.append(Path(given))
    for path in layers:
        try:
            layer = OmegaConf.load(path)
        except Exception as exc:  # YAML syntax errors come in several types
            raise ConfigError(f"{path}: not a readable YAML file ({exc})") from None
        try:
            cfg = OmegaConf.merge(cfg, layer)
        except OmegaConfBaseException as exc:
            raise ConfigError(f"config key {_describe(exc)} (in {path})") from None
    # One override at a time, so an error names the whole key the user typed.
    for item in apply_aliases(overrides, aliases or {}):
        key = item.partition("=")[0]
        try:
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist([item]))
        except OmegaConfBaseException as exc:
            reason = str(exc).splitlines()[0]
            raise ConfigError(f"config key {key} (command line): {reason}") from None
    try:
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as exc:
        raise ConfigError(f"config key {_describe(exc)}") from None
    try:
        # Plain dataclass instances from here on: typed, `dataclasses.replace`-able, picklable.
        return OmegaConf.to_object(cfg)  # type: ignore[return-value]
    except OmegaConfBaseException as exc:  # e.g. a required (MISSING) value left unset
        raise ConfigError(f"config key {_describe(exc)}") from None


def to_container(cfg: Any) -> dict[str, Any]:
    """A plain ``dict`` copy of a (structured) config, for JSON, hashing and loggers."""
    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
    import dataclasses

    if dataclasses.is_dataclass(cfg):
        return dataclasses.asdict(cfg)
    return dict(cfg)


def to_yaml(cfg: Any) -> str:
    """The resolved config as YAML text."""
    return OmegaConf.to_yaml(OmegaConf.create(to_container(cfg)))


def save_config(cfg: Any, path: str | os.PathLike) -> Path:
    """Atomically write the resolved config as YAML (saved into every run folder)."""
    return write_text(path, to_yaml(cfg))


def config_hash(cfg: Any, ignore: Sequence[str] = ()) -> str:
    """A short stable hash of the config (keys in ``ignore`` left out), to detect reuse of a run
    folder with different settings."""
    import hashlib
    import json

    data = to_container(cfg)
    for key in ignore:
        data.pop(key, None)
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]
