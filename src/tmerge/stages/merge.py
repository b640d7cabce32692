"""``tmerge merge RECIPE.yaml``: merge any models whose state dicts match, by a recipe.

A recipe names the models (safetensors files, or run folders holding their weights), the
method and its parameters, optionally a base for the task-vector methods, Fishers for IMM,
per-layer overrides by name pattern, and the output file::

    method: ties                    # imm | mean-imm | task-arithmetic | ties | dare | dare-ties | slerp
    models: [runs/task1, runs/task2]
    base: null                      # task-vector methods: null = the first run folder's saved θ₀
    params: {lam: 1.0, k: 20}
    overrides:                      # optional; the first matching pattern (fnmatch) wins
      - {match: "encoder.0.*", params: {k: 100}}
    output: runs/merged/m1-m2-ties.safetensors

The output holds every tensor of the first model, merged where the method applies, and a JSON
record beside it (``<output>.json``): the method, parameters and overrides, and each input's
path and SHA-256. Every mismatch between the inputs (a missing key, another shape or dtype, a
Fisher of other weights) is one error naming the file, exit status 2, and nothing is written.
The maths lives in :mod:`tmerge.merge.task_vectors` and :mod:`tmerge.merge.imm`.
"""

from __future__ import annotations

import fnmatch
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor

from tmerge.config import to_container
from tmerge.errors import ConfigError, RunError
from tmerge.fisher import check_options, normalize_fisher
from tmerge.io import file_sha256, write_json, write_safetensors
from tmerge.merge.imm import fisher_epsilon
from tmerge.merge.methods import METHODS, Method, check_params
from tmerge.merge.task_vectors import check_state_dicts
from tmerge.runs import FISHER_FILE, INIT_FILE, NET_FILE, load_fisher, load_net
from tmerge.sources import check_fisher_matches, check_init_matches

log = logging.getLogger("tmerge")


@dataclass
class Override:
    """Per-layer parameters: tensors whose name matches ``match`` (fnmatch) merge with ``params``."""

    match: str = "*"
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class MergeConfig:
    """A merge recipe: ``tmerge merge RECIPE.yaml [key=value …]`` (the command line overrides the file)."""

    method: str = "imm"
    models: list[str] = field(default_factory=list)
    base: str | None = None
    fishers: list[str] | None = None  # IMM: default each run folder's Fisher
    fisher_normalize: str = "per_tensor"  # as in the target stages
    params: dict[str, Any] = field(default_factory=dict)
    overrides: list[Override] = field(default_factory=list)
    output: str | None = None
    force: bool = False  # overwrite an existing output


def _weights_file(entry: str, what: str) -> Path:
    path = Path(entry).expanduser()
    if path.is_dir():
        path = path / NET_FILE
    if not path.is_file():
        raise ConfigError(
            f"{what}: {path} does not exist; expected a .safetensors file or a run folder with {NET_FILE}"
        )
    return path


def _load(path: Path) -> dict[str, Tensor]:
    state, _ = load_net(path)
    return state


def _check_params(
    method: str, spec: Method, params: Mapping[str, Any], where: str, n_models: int
) -> dict[str, Any]:
    """The method's defaults updated by ``params``, checked (names, ranges) before anything loads."""
    try:
        check_params(method, params, n_models)
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    return {**spec.params, **params}


def _public(params: Mapping[str, Any]) -> dict[str, Any]:
    """The parameters as the recipe gave them (without what the command adds, e.g. the Fisher scale)."""
    return {k: v for k, v in params.items() if k != "fisher_scale"}


def resolve_inputs(cfg: MergeConfig) -> tuple[list[Path], Path | None, list[Path] | None]:
    """The model, base and Fisher files of the recipe, each checked to exist."""
    if cfg.method not in METHODS:
        raise ConfigError(f"method: expected one of {', '.join(METHODS)}, got {cfg.method!r}")
    spec = METHODS[cfg.method]
    if len(cfg.models) < (1 if spec.base else 2):
        raise ConfigError(
            f"models: {cfg.method} needs at least {1 if spec.base else 2} models, got {list(cfg.models)}"
        )
    if spec.models is not None and len(cfg.models) != spec.models:
        raise ConfigError(f"models: {cfg.method} merges exactly {spec.models} models, got {len(cfg.models)}")
    models = [_weights_file(m, f"models[{i}]") for i, m in enumerate(cfg.models)]
    base = None
    if spec.base:
        if cfg.base is None:
            first = Path(cfg.models[0]).expanduser()
            if not first.is_dir():
                raise ConfigError(f"base: {cfg.method} needs the models' common base θ₀; name it with base=…")
            base = first / INIT_FILE
            if not base.is_file():
                raise ConfigError(
                    f"base: {cfg.method} needs θ₀, but {base} does not exist; retrain the run with this "
                    "version (it saves its initial weights) or name a base with base=…"
                )
        else:
            base = _weights_file(cfg.base, "base")
        check_init_matches(base)
    fishers = None
    if spec.fishers:
        if cfg.fishers is not None:
            if len(cfg.fishers) != len(models):
                raise ConfigError(f"fishers: {len(cfg.fishers)} files for {len(models)} models")
            fishers = [Path(f).expanduser() for f in cfg.fishers]
        else:
            fishers = [m.parent / FISHER_FILE for m in models]
        for f in fishers:
            if not f.is_file():
                raise ConfigError(f"fishers: {f} does not exist; {cfg.method} needs each model's Fisher")
    return models, base, fishers


def run_merge(cfg: MergeConfig) -> Path:
    """Merge by the recipe; write the output safetensors and its JSON record; return the output."""
    if cfg.output is None:
        raise ConfigError("output: name the merged safetensors file (output=…)")
    try:
        check_options(normalize=cfg.fisher_normalize, prefix="fisher_")
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    output = Path(cfg.output).expanduser()
    record_path = output.with_name(output.name + ".json")
    if output.exists() and not cfg.force:
        raise ConfigError(f"output: {output} exists; pass force=true to overwrite it")
    model_files, base_file, fisher_files = resolve_inputs(cfg)
    spec = METHODS[cfg.method]
    plain = to_container(cfg)  # JSON-ready values (lists, not OmegaConf nodes)
    n = len(model_files)
    params = _check_params(cfg.method, spec, plain["params"], "params", n)
    overrides = [
        (
            o["match"],
            _check_params(cfg.method, spec, {**plain["params"], **o["params"]}, f"overrides[{i}]", n),
        )
        for i, o in enumerate(plain["overrides"])
    ]

    models = [_load(p) for p in model_files]
    base = _load(base_file) if base_file is not None else None
    try:
        names = check_state_dicts(models, base, cfg.method)
    except ValueError as exc:  # the inputs do not match: the user's files are at fault
        raise RunError(
            f"{', '.join(map(str, model_files + ([base_file] if base_file else [])))}: {exc}"
        ) from None
    fishers = None
    if fisher_files is not None:
        fishers = []
        for f, m, mf in zip(fisher_files, models, model_files, strict=True):
            fisher = load_fisher(f)
            other = [n for n in fisher if n not in m]
            if other:
                raise RunError(f"{f}: Fisher of other weights: {mf} has no {other[:3]}")
            check_fisher_matches(f, fisher, mf, m, load_net(mf)[1])
            fishers.append(normalize_fisher(fisher, cfg.fisher_normalize))

    if fishers is not None:  # ε relative to all the Fishers, whatever the override groups
        weighted = [{n: f[n] for n in names if all(n in g for g in fishers)} for f in fishers]
        scale = fisher_epsilon(weighted, 1.0)
        params = {**params, "fisher_scale": scale}
        overrides = [(m, {**p, "fisher_scale": scale}) for m, p in overrides]

    groups: dict[int, list[str]] = {}
    for n in names:
        k = next((i for i, (pattern, _) in enumerate(overrides) if fnmatch.fnmatchcase(n, pattern)), -1)
        groups.setdefault(k, []).append(n)
    merged: dict[str, Tensor] = {}
    for k, keys in groups.items():
        p = params if k < 0 else overrides[k][1]
        sub = [{n: m[n] for n in keys} for m in models]
        sub_base = None if base is None else {n: base[n] for n in keys}
        sub_f = None if fishers is None else [{n: f[n] for n in keys if n in f} for f in fishers]
        merged.update(spec.run(sub, sub_base, sub_f, **p))
    out = {n: merged[n] for n in names}
    inputs = [{"path": str(p), "sha256": file_sha256(p)} for p in model_files]
    record = {
        "method": cfg.method,
        "params": _public(params),
        "overrides": [{"match": m, "params": _public(p)} for m, p in overrides],
        "models": inputs,
        "base": None if base_file is None else {"path": str(base_file), "sha256": file_sha256(base_file)},
        "fishers": None
        if fisher_files is None
        else [{"path": str(f), "sha256": file_sha256(f)} for f in fisher_files],
        "fisher_normalize": cfg.fisher_normalize if fisher_files is not None else None,
        "without_fisher": None
        if fishers is None
        else sorted(
            n for n in names if models[0][n].is_floating_point() and not all(n in f for f in fishers)
        ),
        "tensors": len(out),
    }
    write_safetensors(output, out, {"tmerge_merge": json.dumps(record)})
    record["output"] = {"path": str(output), "sha256": file_sha256(output)}
    write_json(record_path, record)
    log.info("merge: %s of %d models → %s (%d tensors)", cfg.method, len(models), output, len(out))
    return output
