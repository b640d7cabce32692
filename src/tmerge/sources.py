"""A source model with every check: the one way a stage gets the trained models it builds on.

A target run (its initialisation and θ₀), the forgetting table, ``tmerge merge``, ``tmerge
noise-source`` and a source run's ``init_from`` all load sources through here, so that each
check is made once and in one order, before any run folder is touched:

* where the source is: a run folder under the runs root, or a W&B artifact reference resolved to
  its local cache (:func:`source_folder`);
* that its run finished (the marker beside the weights) and its weights are of the expected
  architecture and hold every fused parameter of the target (:func:`load_source`);
* that its Fisher is the one computed for those weights: every fused parameter, their shapes,
  finite and ≥ 0 (:func:`tmerge.fisher.fisher_problem`), and the hash the weights recorded
  (:func:`check_fisher_matches`);
* θ₀ of the task vectors (:func:`load_base`, :func:`check_base`, :func:`check_init_matches`);
* the input layer for the target's channels (:func:`input_plan`, :func:`map_input`).

Every refusal is the user's error naming the file (or the key) and, where it helps, how to make
what is missing. File names and readers are :mod:`tmerge.runs`'.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tmerge.artifacts import is_reference, resolve
from tmerge.data.channels import match_channels
from tmerge.errors import ConfigError, RunError
from tmerge.fisher import fisher_problem
from tmerge.io import file_sha256
from tmerge.nets.config import stored_architecture
from tmerge.runs import FISHER_FILE, INIT_FILE, NET_FILE, SOURCE_MARKER, is_finished, load_fisher, load_net
from tmerge.transfer import map_input_channels

log = logging.getLogger("tmerge")

#: A source's input channels where its weights do not record them (runs made before they
#: did): the parcellation sources' T1 and T2.
LEGACY_SOURCE_CHANNELS = ("T1", "T2")


@dataclass
class Source:
    """A trained source model: its weights ``name → tensor``, metadata and (optional) Fisher of
    the same names and shapes."""

    name: str
    state: dict[str, torch.Tensor]
    meta: dict[str, Any]
    fisher: dict[str, torch.Tensor] | None
    folder: Path | None = None  # where it was loaded from
    # Target parameters not to take from this source whatever their shape: the input layer
    # when the target's channels match none of the source's (re-initialised, trained with S).
    reinit: frozenset[str] = frozenset()


def source_hint(name: str) -> str:
    """How a user makes the source run ``name``."""
    return f"make {name}" if name in ("task1", "task2") else f"tmerge source … name={name}"


def source_folder(
    runs_root: Path, name: str, wandb_mode: str = "disabled", files: Sequence[str] = ()
) -> Path:
    """The folder of the source ``name``: ``<runs>/<name>``, or for a W&B artifact reference
    (``wandb:entity/project/name:version``) its folder in the local artifact cache, downloaded
    first where ``wandb_mode`` allows (see :mod:`tmerge.artifacts`) and holding ``files``."""
    if is_reference(name):
        return resolve(name, runs_root, wandb_mode, tuple(files) or (NET_FILE, SOURCE_MARKER))
    return runs_root / name


# --- the checks -----------------------------------------------------------------------------------
def check_architecture(
    path: Path, meta: Mapping[str, Any], expected: Mapping[str, Any], keys: Sequence[str]
) -> None:
    """Refuse weights whose architecture (``keys`` of the metadata) differs from ``expected``.

    Raises:
        RunError: naming the file and every key that differs.
    """
    meta = stored_architecture(dict(meta))  # weights without a network name are Isensee2017's
    diffs = [
        f"{k}={meta.get(k)!r} (expected {expected.get(k)!r})" for k in keys if meta.get(k) != expected.get(k)
    ]
    if diffs:
        raise RunError(f"{path}: weights of another architecture: {', '.join(diffs)}")


def check_source_finished(path: Path, hint: str) -> None:
    """Refuse the weights ``path`` of a source run that has not finished (no marker beside them:
    killed during its Fisher, say) — its Fisher may be missing or stale.

    Raises:
        RunError: naming the run folder and how to finish it.
    """
    if not is_finished(path.parent, SOURCE_MARKER):
        raise RunError(
            f"source run {path.parent} is unfinished (no {SOURCE_MARKER}); re-run `{hint}` to finish it"
        )


def check_init_matches(base: Path) -> None:
    """Refuse a run folder's ``init.safetensors`` that is not the one its weights started from
    (the source stage records its hash beside the trained weights).

    Raises:
        RunError: naming both files.
    """
    net = base.parent / NET_FILE
    if base.name != INIT_FILE or not net.is_file():
        return
    recorded = load_net(net)[1].get("init_sha256")
    if recorded and file_sha256(base) != recorded:
        raise RunError(
            f"{base}: not the initial weights of {net} (its hash differs from the one recorded there)"
        )


def check_fisher_matches(
    fisher_path: Path,
    fisher: Mapping[str, torch.Tensor],
    net_path: Path,
    state: Mapping[str, torch.Tensor],
    meta: Mapping[str, Any],
    names: Sequence[str] = (),
) -> None:
    """Refuse a Fisher that was not computed for the weights beside it: one lacking a name of
    ``names``, of other shapes than the weights, with non-finite or negative entries
    (:func:`tmerge.fisher.fisher_problem`), or whose hash differs from the one the weights recorded.

    Raises:
        RunError: naming the Fisher file and what does not match.
    """
    shapes = {n: state[n].shape for n in [*names, *fisher] if n in state}
    problem = fisher_problem(fisher, shapes, str(fisher_path))
    if problem:
        raise RunError(problem)
    recorded = meta.get("fisher_sha256")
    if recorded and file_sha256(fisher_path) != recorded:
        raise RunError(
            f"{fisher_path}: not the Fisher computed for {net_path} (its hash differs from the one "
            "recorded with the weights); restore the run's own Fisher or retrain it with force=true"
        )


# --- a source -------------------------------------------------------------------------------------
def load_source(
    runs_root: Path,
    name: str,
    *,
    with_fisher: bool = False,
    fused: Sequence[str] = (),
    expected: Mapping[str, Any] | None = None,
    wandb_mode: str = "disabled",
) -> Source:
    """A source model by run name (or W&B artifact reference), with every check: it exists, its
    run finished, its architecture is ``expected`` (the metadata keys given), and its Fisher
    (``with_fisher``) has an entry for every ``fused`` parameter of the weights, matches their
    shapes and the hash they recorded, and is finite.

    Raises:
        RunError: naming the file and what is wrong with it, and how to make it where that helps.
    """
    files = (NET_FILE, SOURCE_MARKER, *((FISHER_FILE,) if with_fisher else ()))
    folder = source_folder(runs_root, name, wandb_mode, files)
    path = folder / NET_FILE
    if not path.is_file():
        raise RunError(
            f"source model {name!r} not found: {path} does not exist; train it first ({source_hint(name)})"
        )
    check_source_finished(path, source_hint(name))
    state, meta = load_net(path)
    if expected:
        check_architecture(path, meta, expected, tuple(expected))
    missing = [n for n in fused if n not in state]
    if missing:
        raise RunError(
            f"{path}: weights of another network: {len(missing)} parameter(s) of the target are missing, "
            f"e.g. {missing[0]!r}"
        )
    fisher = None
    if with_fisher:
        # Every fused parameter of the source has a Fisher (its first layer included, though
        # a first layer of another shape than the target's is not merged).
        fisher_path = folder / FISHER_FILE
        names = [n for n in fused if n in state]
        stored = load_fisher(fisher_path)
        # In the weights' order (the file's is sorted): sums over the Fisher add up in the same order.
        fisher = {n: stored[n] for n in [*names, *stored] if n in stored}
        check_fisher_matches(fisher_path, fisher, path, state, meta, names)
    return Source(name, state, meta, fisher, folder)


def check_same_outputs(sources: Sequence[Source]) -> None:
    """Refuse sources to merge whose tasks have different label counts.

    Merged models share P but each keeps its own S and heads; sources of different label counts
    are not the paper's setting and usually mean a wrong run name.

    Raises:
        RunError: naming each source's output count.
    """
    outputs = {s.name: s.meta.get("n_classes") for s in sources}
    if len(sources) > 1 and len(set(outputs.values())) > 1:
        raise RunError(
            "sources: models to merge must solve tasks with the same number of classes, got "
            + ", ".join(f"{n}: {k} outputs" for n, k in outputs.items())
        )


# --- the input layer --------------------------------------------------------------------------------
def check_channel_map(channel_map: Sequence[int] | None, channels: Sequence[str]) -> None:
    """Refuse a ``channel_map`` that does not name one source channel per target channel.

    Raises:
        ConfigError: naming ``channel_map`` and the target's channels.
    """
    if channel_map is not None and len(channel_map) != len(channels):
        raise ConfigError(
            f"channel_map: got {list(channel_map)} ({len(channel_map)} entries); expected one source "
            f"channel per target channel, {len(channels)} ({', '.join(channels)})"
        )


def input_plan(
    channel_map: Sequence[int] | None, channels: tuple[str, ...], source: Source
) -> tuple[list[int] | None, str]:
    """How the target's input layer starts from a source's: ``(channel map, what it does)``.

    ``channel_map`` given: that map. Else, when every target channel is a contrast the source
    saw (:func:`tmerge.data.channels.match_channels`: t1 ↔ T1w, t2 ↔ T2w, …), the map that
    reuses those filters. Else ``None``: the input layer is re-initialised and trained with S.
    """
    seen = tuple(source.meta.get("channels") or LEGACY_SOURCE_CHANNELS)
    if channel_map is not None:
        return list(channel_map), f"channel_map={list(channel_map)} reuses {source.name}'s filters"
    found = match_channels(channels, seen)
    if found is not None:
        pairs = ", ".join(f"{t}←{seen[i]}" for t, i in zip(channels, found, strict=True))
        return found, f"channels match {source.name}'s ({pairs}): its input filters are reused"
    return None, (
        f"channels {', '.join(channels)} are not all among {source.name}'s ({', '.join(seen)}): the input "
        "layer is re-initialised and trained with S (channel_map=[…] reuses the source's filters)"
    )


def map_input(
    source: Source, target: Mapping[str, torch.Tensor], plan: list[int] | None, names: Sequence[str]
) -> None:
    """Adapt ``source`` (in place) to the target's input channels by ``plan``
    (:func:`input_plan`): its input layer ``names`` rebuilt from the planned source channels
    (weights rescaled, the Fisher not), or, without a plan, marked to be re-initialised."""
    if plan is None:
        source.reinit = frozenset(names)
        return
    source.state = map_channels(source.state, target, plan, rescale=True, names=names)
    if source.fisher is not None:
        source.fisher = map_channels(source.fisher, target, plan, rescale=False, names=names)


def map_channels(
    tensors: Mapping[str, torch.Tensor],
    target: Mapping[str, torch.Tensor],
    plan: Sequence[int],
    *,
    rescale: bool,
    names: Sequence[str] | None,
) -> dict[str, torch.Tensor]:
    """:func:`tmerge.transfer.map_input_channels`, a map it refuses raised as the user's error.

    Raises:
        ConfigError: ``channel_map`` names a source channel that does not exist.
    """
    try:
        return map_input_channels(tensors, target, plan, rescale=rescale, names=names)
    except ValueError as exc:  # its message names channel_map, the key
        raise ConfigError(str(exc)) from None


# --- θ₀ of the task vectors ---------------------------------------------------------------------
def load_base(
    runs_root: Path,
    configured: str | None,
    first_source: str,
    wandb_mode: str = "disabled",
    target: Mapping[str, torch.Tensor] | None = None,
    plan: list[int] | None = None,
    names: Sequence[str] | None = None,
) -> dict[str, torch.Tensor]:
    """θ₀ of the task-vector methods: ``merge.base`` (``configured``: a run name or a safetensors
    file; None: the first source's saved initial weights), its input layer (``names``) mapped by
    the sources' channel ``plan`` to the ``target``'s shapes (:func:`input_plan`; None: not mapped).

    Raises:
        RunError: the file does not exist, is unreadable, or is not the init its run recorded.
    """
    if configured is None:
        first = source_folder(runs_root, first_source, wandb_mode, (INIT_FILE,))
        path = first / INIT_FILE
        hint = f"retrain {first_source} with this version (it saves its initial weights) or set merge.base"
    elif (runs_root / configured / NET_FILE).is_file():
        path, hint = runs_root / configured / NET_FILE, ""
    else:
        path, hint = Path(configured).expanduser(), "set merge.base to a run name or a safetensors file"
    if not path.is_file():
        raise RunError(f"merge.base: {path} does not exist; {hint}")
    check_init_matches(path)
    state, _ = load_net(path)
    if plan is not None and target is not None:
        state = map_channels(state, target, plan, rescale=True, names=names)
    return state


def check_base(
    path_hint: str,
    base: Mapping[str, torch.Tensor],
    sources: Sequence[Source],
    layers: Mapping[str, list[str]],
) -> None:
    """Refuse a base θ₀ that lacks a merged parameter or holds it in another shape than the sources.

    Raises:
        RunError: naming the base and the first such parameter.
    """
    for names in layers.values():
        for n in names:
            if n not in base:
                raise RunError(
                    f"merge.base: {path_hint} has no {n!r}; expected the weights the sources started from"
                )
            if base[n].shape != sources[0].state[n].shape:
                raise RunError(
                    f"merge.base: {path_hint}: {n!r} has shape {tuple(base[n].shape)}, the sources "
                    f"{tuple(sources[0].state[n].shape)}; expected the weights the sources started from"
                )
