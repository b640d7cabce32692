"""The per-subject preprocessing cache: :func:`~tmerge.data.preprocess.preprocess_subject` done
once per subject, inputs and settings, never in the training loop.

The cache holds one ``.npz`` per subject under ``<cache_dir>/<settings-hash>/<subject>.npz``;
each file stores the key of its inputs (path, size, mtime of every file) and settings, and is
recomputed when the key no longer matches.
"""

from __future__ import annotations

import hashlib
import json
import zipfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from tmerge.data.preprocess import Kind, Preprocessed, PreprocessSettings, preprocess_subject
from tmerge.errors import DataError
from tmerge.io import atomic_path


def input_key(files: Mapping[str, Path], label_file: Path | None, settings: PreprocessSettings) -> str:
    """Hash of every input file's (path, size, mtime) and the settings: the cache validity key."""
    entries = []
    for name, path in [*files.items(), ("label", label_file)]:
        if path is None:
            continue
        path = Path(path)
        try:
            stat = path.stat()
        except FileNotFoundError:
            raise DataError(f"{path}: file not found") from None
        entries.append([name, str(path.resolve()), stat.st_size, stat.st_mtime_ns])
    payload = json.dumps({"files": entries, "settings": settings.digest()})
    return hashlib.sha256(payload.encode()).hexdigest()


def _read_cache(path: Path, key: str, arrays: bool = True) -> Preprocessed | None:
    """Return the cached subject if ``path`` holds ``key``; ``None`` on a miss or a damaged file.

    With ``arrays=False`` only the stored key is read (the ``.npz`` members load lazily) and an
    empty :class:`~tmerge.data.preprocess.Preprocessed` marks the hit.
    """
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as npz:
            if str(npz["key"]) != key:
                return None
            if not arrays:
                return Preprocessed(image=np.empty(0), label=None)
            label = npz["label"] if "label" in npz.files else None
            return Preprocessed(image=npz["image"], label=label, meta=json.loads(str(npz["meta"])))
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        # A damaged cache file is not the user's problem: recompute it.
        return None


def _write_cache(path: Path, key: str, result: Preprocessed) -> None:
    arrays: dict[str, np.ndarray] = {
        "key": np.array(key),
        "meta": np.array(json.dumps(result.meta)),
        "image": result.image,
    }
    if result.label is not None:
        arrays["label"] = result.label
    with atomic_path(path) as tmp:
        # A file object, because np.savez appends ".npz" to a path that lacks it.
        with open(tmp, "wb") as fh:
            np.savez(fh, **arrays)


def cache_file(
    cache_dir: str | Path, settings: PreprocessSettings, kind: Kind, source: str, subject: str
) -> Path:
    """``<cache_dir>/<settings-hash>/<subject>.npz``; the hash covers settings, kind and ``source``.

    ``source`` (the dataset root) keeps two datasets with the same subject ids from evicting
    each other's cache files.
    """
    return Path(cache_dir) / settings.digest(kind=kind, source=source) / f"{subject}.npz"


def is_cached(
    subject: str,
    files: Mapping[str, Path],
    label_file: Path | None,
    kind: Kind,
    settings: PreprocessSettings,
    cache_dir: str | Path,
    source: str = "",
) -> bool:
    """Whether the subject's cache file is valid for these inputs and settings (reads only its key)."""
    path = cache_file(cache_dir, settings, kind, source, subject)
    return _read_cache(path, input_key(files, label_file, settings), arrays=False) is not None


def preprocess_cached(
    subject: str,
    files: Mapping[str, Path],
    label_file: Path | None,
    kind: Kind,
    settings: PreprocessSettings,
    cache_dir: str | Path,
    source: str = "",
) -> Preprocessed:
    """:func:`~tmerge.data.preprocess.preprocess_subject` behind the per-subject cache.

    A hit (same input files, sizes, mtimes and settings) does no preprocessing; a miss computes
    the subject and writes its cache file atomically.

    Args:
        subject: Subject id (the cache file name).
        files, label_file, kind, settings: As for
            :func:`~tmerge.data.preprocess.preprocess_subject`.
        cache_dir: Root folder of the cache.
        source: Dataset root, part of the cache folder hash.

    Returns:
        The preprocessed subject.
    """
    path = cache_file(cache_dir, settings, kind, source, subject)
    key = input_key(files, label_file, settings)
    hit = _read_cache(path, key)
    if hit is not None:
        return hit
    result = preprocess_subject(files, label_file, kind, settings, subject=subject)
    _write_cache(path, key, result)
    return result
