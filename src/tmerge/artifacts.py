"""W&B artifacts: source models (weights, Fisher, initial weights) and a target's best weights,
logged with their sha256 as metadata; and sources named by artifact reference.

A target run can name a source as ``wandb:<entity>/<project>/<name>:<version or alias>``
(``sources=[wandb:lab/tmerge/task1:v3,task2]``). The reference resolves to a local folder,
``<runs>/artifacts/<entity>/<project>/<name>/<version>/``, that then serves like a source run's
folder (the same checks: finished, architecture, the Fisher's hash). The folder is the local
artifact cache: when it is complete the reference resolves offline, with no network; when it is
not, the artifact is downloaded (online mode only) into a temporary folder, its files checked
against the sha256 in its metadata, and renamed into place. ``wandb artifact get <ref> --root
<that folder>`` fills the cache by hand, e.g. on a login node before an offline job.
"""

from __future__ import annotations

import logging
import re
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import Logger

from tmerge.errors import RunError
from tmerge.io import file_sha256, read_json, write_json
from tmerge.loggers import wandb_loggers

log = logging.getLogger("tmerge")

PREFIX = "wandb:"
#: Written into a resolved folder: the reference, the version and the metadata it came with.
RECORD = "artifact.json"
SOURCE_TYPE = "source-model"
TARGET_TYPE = "target-model"
_REF = re.compile(r"(?P<entity>[\w.-]+)/(?P<project>[\w.-]+)/(?P<name>[\w.-]+):(?P<version>[\w.-]+)")


def is_reference(name: str) -> bool:
    """Whether a source name is a W&B artifact reference (``wandb:…``)."""
    return name.startswith(PREFIX)


def artifact_name(name: str) -> str:
    """A run name as a W&B artifact name (letters, digits, ``-``, ``_`` and ``.``)."""
    return re.sub(r"[^\w.-]", "-", name)


def log_model(
    loggers: Any, name: str, kind: str, files: Mapping[str, Path], metadata: Mapping[str, Any]
) -> None:
    """Log ``files`` as one W&B artifact ``name`` of type ``kind`` into the process's run, with
    ``metadata`` plus ``sha256`` (file name → hash). Nothing happens without W&B, or off rank 0.

    Args:
        loggers: A W&B run (``WandbLogger``) or a stage's loggers; None does nothing.
        name: The artifact's name (a run name; see :func:`artifact_name`).
        kind: :data:`SOURCE_TYPE` or :data:`TARGET_TYPE`.
        files: File name in the artifact → path; missing paths are left out.
        metadata: JSON-serialisable facts (architecture, labels, hashes that link the files).
    """
    runs = wandb_loggers([loggers] if isinstance(loggers, Logger) else list(loggers or ()))
    present = {k: p for k, p in files.items() if p.is_file()}
    if not runs or not present:
        return
    import wandb

    hashes = {k: file_sha256(p) for k, p in present.items()}
    artifact = wandb.Artifact(artifact_name(name), type=kind, metadata={**metadata, "sha256": hashes})
    for key, path in present.items():
        artifact.add_file(str(path), name=key)
    for run in runs:
        run.experiment.log_artifact(artifact)
    log.info("W&B: logged %s artifact %s (%s)", kind, artifact_name(name), ", ".join(present))


def parse_reference(ref: str) -> dict[str, str]:
    """``wandb:entity/project/name:version`` → its parts.

    Raises:
        RunError: another form, naming it and the expected one.
    """
    match = _REF.fullmatch(ref.removeprefix(PREFIX))
    if not is_reference(ref) or match is None:
        raise RunError(
            f"sources: {ref!r} is not a W&B artifact reference; expected "
            "wandb:<entity>/<project>/<name>:<version or alias>, e.g. wandb:lab/tmerge/task1:v3"
        )
    return match.groupdict()


def cache_dir(runs_root: Path, ref: str) -> Path:
    """The local folder of an artifact reference: ``<runs>/artifacts/<entity>/<project>/<name>/<version>``."""
    p = parse_reference(ref)
    return runs_root / "artifacts" / p["entity"] / p["project"] / p["name"] / p["version"]


def resolve(ref: str, runs_root: Path, mode: str, expect: tuple[str, ...]) -> Path:
    """The local folder holding the files of the artifact ``ref``.

    Args:
        ref: ``wandb:entity/project/name:version``.
        runs_root: The runs folder (the cache is under ``artifacts/``).
        mode: The W&B mode (``online`` may download; ``offline`` and ``disabled`` may not).
        expect: The file names the folder must hold to count as complete.

    Raises:
        RunError: offline and not in the cache; the download fails; a file's hash differs from
            the artifact's metadata.
    """
    folder = cache_dir(runs_root, ref)
    if all((folder / name).is_file() for name in expect):
        _verify(folder, ref)
        return folder
    if mode != "online":
        raise RunError(
            f"sources: {ref} is not in the local artifact cache ({folder} lacks "
            f"{', '.join(n for n in expect if not (folder / n).is_file())}) and W&B is {mode}, so it "
            f"cannot be downloaded; run once with WANDB_MODE=online, or fill the cache with "
            f"`wandb artifact get {ref.removeprefix(PREFIX)} --root {folder}`"
        )
    import wandb

    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        try:
            artifact = wandb.Api().artifact(ref.removeprefix(PREFIX))
            artifact.download(root=str(tmp))
        except Exception as exc:  # network, permissions, no such artifact: the API's own words
            raise RunError(f"sources: cannot download {ref}: {exc}") from None
        write_json(
            tmp / RECORD, {"ref": ref, "version": artifact.version, "metadata": dict(artifact.metadata)}
        )
        _verify(tmp, ref)
        if folder.exists():
            shutil.rmtree(folder)
        tmp.rename(folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("W&B: %s downloaded into %s", ref, folder)
    return folder


def _verify(folder: Path, ref: str) -> None:
    """Check the files against the sha256 the artifact was logged with (when its record is there)."""
    record = folder / RECORD
    if not record.is_file():
        return  # filled by `wandb artifact get`: the source checks (Fisher hash) still apply
    hashes = read_json(record).get("metadata", {}).get("sha256", {})
    for name, expected in hashes.items():
        path = folder / name
        if path.is_file() and file_sha256(path) != expected:
            raise RunError(
                f"sources: {path} of {ref} does not match the sha256 the artifact was logged with; "
                f"delete {folder} to download it again"
            )
