"""W&B artifacts: references parse, the local cache resolves offline and is checked against the
logged hashes, and what cannot be resolved is one clear error."""

from __future__ import annotations

import pytest

from tmerge.artifacts import RECORD, cache_dir, is_reference, parse_reference, resolve
from tmerge.errors import RunError
from tmerge.io import file_sha256, write_json

REF = "wandb:lab/tmerge/task1:v3"


def test_reference_parts_and_cache_folder(tmp_path):
    assert is_reference(REF) and not is_reference("task1")
    assert parse_reference(REF) == {"entity": "lab", "project": "tmerge", "name": "task1", "version": "v3"}
    assert cache_dir(tmp_path, REF) == tmp_path / "artifacts" / "lab" / "tmerge" / "task1" / "v3"


@pytest.mark.parametrize("bad", ["wandb:task1", "wandb:lab/task1:v3", "wandb:lab/tmerge/task1", "lab/tmerge/task1:v3"])
def test_malformed_reference_is_named(bad):
    with pytest.raises(RunError, match="expected wandb:<entity>/<project>/<name>:<version or alias>") as err:
        parse_reference(bad)
    assert repr(bad) in str(err.value)


def _fill(tmp_path, files=("net.safetensors", "metrics.json")):
    folder = cache_dir(tmp_path, REF)
    folder.mkdir(parents=True)
    for name in files:
        (folder / name).write_bytes(name.encode() * 3)
    hashes = {name: file_sha256(folder / name) for name in files}
    write_json(folder / RECORD, {"ref": REF, "version": "v3", "metadata": {"sha256": hashes}})
    return folder


def test_complete_cache_resolves_offline(tmp_path):
    folder = _fill(tmp_path)
    assert resolve(REF, tmp_path, "offline", ("net.safetensors", "metrics.json")) == folder
    # Filled by `wandb artifact get` (no record of ours): resolves; the source checks still apply.
    (folder / RECORD).unlink()
    assert resolve(REF, tmp_path, "disabled", ("net.safetensors",)) == folder


def test_incomplete_cache_offline_is_one_clear_error(tmp_path):
    _fill(tmp_path, files=("net.safetensors",))
    with pytest.raises(RunError) as err:
        resolve(REF, tmp_path, "offline", ("net.safetensors", "fisher.safetensors"))
    message = str(err.value)
    assert "not in the local artifact cache" in message and "fisher.safetensors" in message
    assert "wandb artifact get lab/tmerge/task1:v3 --root" in message and "WANDB_MODE=online" in message


def test_a_changed_file_is_refused(tmp_path):
    folder = _fill(tmp_path)
    (folder / "net.safetensors").write_bytes(b"tampered")
    with pytest.raises(RunError, match="does not match the sha256 the artifact was logged with"):
        resolve(REF, tmp_path, "offline", ("net.safetensors",))


def test_failed_download_leaves_no_folder(tmp_path, monkeypatch):
    import wandb

    class NoServer:
        def artifact(self, name):
            raise ConnectionError(f"no route to api.wandb.ai for {name}")

    monkeypatch.setattr(wandb, "Api", NoServer)
    with pytest.raises(RunError, match="cannot download wandb:lab/tmerge/task1:v3: no route"):
        resolve(REF, tmp_path, "online", ("net.safetensors",))
    parent = cache_dir(tmp_path, REF).parent
    assert not cache_dir(tmp_path, REF).exists() and list(parent.iterdir()) == []
