"""``tmerge bench``: a tiny run writes consistent results; it runs without monai/omegaconf; config."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from tmerge.bench import BenchConfig, SoftDiceLoss, apply_overrides, format_table, resolve, run_bench
from tmerge.errors import ConfigError
from tmerge.nets.config import NetConfig

TINY = {"patch_size": 16, "iters": 1, "fisher_samples": 2, "net": NetConfig(base_filters=4, depth=3)}
TINY_ARGS = ["patch_size=16", "iters=1", "fisher_samples=2", "net.base_filters=4", "net.depth=3"]


def _positive(value: float | None) -> bool:
    return value is not None and math.isfinite(value) and value > 0


def test_tiny_bench_writes_consistent_results(tmp_path: Path) -> None:
    results = run_bench(BenchConfig(**TINY, out_dir=str(tmp_path)))
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved.keys() == results.keys()
    assert {"environment", "settings", "step", "lightning", "data", "fisher", "adaption", "total_s"} <= set(saved)
    assert saved["settings"]["patch_size"] == 16 and saved["environment"]["device_type"] == "cpu"

    step = saved["step"]
    for part in ("reference", "fast"):
        assert _positive(step[part]["s"]) and _positive(step[part]["peak_mib"])
    assert step["speedup"] == pytest.approx(step["reference"]["s"] / step["fast"]["s"])
    assert step["fast"]["same_as_reference"]  # CPU: the fast path is eager float32

    lightning = saved["lightning"]
    assert lightning["module"] == "SegmentationModule"
    assert _positive(lightning["lightning"]["s"]) and lightning["bare"]["s"] == step["fast"]["s"]
    assert lightning["overhead"] == pytest.approx(lightning["lightning"]["s"] / lightning["bare"]["s"])
    assert lightning["steps_per_s"] == pytest.approx(1 / lightning["lightning"]["s"])

    data = saved["data"]
    assert _positive(data["real"]["s"]) and _positive(data["loader_s_per_batch"])
    assert data["ratio"] == pytest.approx(data["device"]["s"] / data["real"]["s"])
    assert data["keeps_up"] == (data["ratio"] >= data["target"])

    fisher = saved["fisher"]
    assert set(fisher["methods"]) == {"loop", "vmap"}
    for name, method in fisher["methods"].items():
        assert method["used"] == name and method["precision"] == "float32"
        assert method["volumes_per_s"] == pytest.approx(1 / method["s"])
    assert fisher["equal"] and fisher["max_rel_diff"]["vmap"] <= fisher["tolerance"]
    assert fisher["speedup_batched"] == pytest.approx(fisher["methods"]["loop"]["s"] / fisher["methods"]["vmap"]["s"])

    adaption = saved["adaption"]
    assert _positive(adaption["adaption"]["s"]) and adaption["layers"] > 0
    assert adaption["ratio"] == pytest.approx(adaption["adaption"]["s"] / adaption["plain"]["s"])

    table = (tmp_path / "results.md").read_text()
    for what in ("training step", "Lightning loop", "data pipeline", "Fisher per volume", "adaption step"):
        assert f"| {what}" in table
    assert table == format_table(saved)


def test_bench_runs_without_monai_omegaconf_nibabel(tmp_path: Path) -> None:
    """The lent GPU image lacks these: the bench must import and run without them."""
    blocked = ["monai", "nibabel", "omegaconf", "wandb", "SimpleITK"]
    script = textwrap.dedent(
        f"""
        import sys
        for name in {blocked!r}:
            sys.modules[name] = None  # any import of it raises ImportError
        from tmerge.bench import main
        status = main({[*TINY_ARGS, "skip=[step,fisher,adaption]", f"out_dir={tmp_path}"]!r})
        leaked = [m for m in sys.modules if m.split(".")[0] in {blocked!r} and sys.modules[m] is not None]
        assert not leaked, leaked
        sys.exit(status)
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["lightning"]["module"].startswith("stand-in")
    assert "skipped" in saved["data"]
    assert saved["settings"]["loss"].startswith("soft Dice in torch")
    assert "Lightning loop" in proc.stdout


def test_soft_dice_equals_the_projects_loss() -> None:
    pytest.importorskip("monai")
    from tmerge.modules.segmentation import build_loss

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 6, 6, 6, generator=g)
    target = (torch.rand(2, 3, 6, 6, 6, generator=g) > 0.6).float()
    torch.testing.assert_close(SoftDiceLoss()(logits, target), build_loss("dice", "sigmoid")(logits, target))


def test_overrides_without_omegaconf() -> None:
    cfg = apply_overrides(
        BenchConfig(), ["iters=3", "net.base_filters=8", "skip=[data, fisher]", "patch_size=null", "compile=true"]
    )
    assert (cfg.iters, cfg.net.base_filters, cfg.skip, cfg.patch_size) == (3, 8, ["data", "fisher"], None)
    assert cfg.compile is True and BenchConfig().net.base_filters == 16  # the default is not mutated
    with pytest.raises(ConfigError, match="net.width"):
        apply_overrides(BenchConfig(), ["net.width=3"])
    with pytest.raises(ConfigError, match="key=value"):
        apply_overrides(BenchConfig(), ["iters"])
    with pytest.raises(ConfigError, match="skip"):
        apply_overrides(BenchConfig(), ["skip=[everything]"])


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"patch_size": 24}, "patch_size: got 24"),
        ({"fisher_methods": ["jit"]}, "fisher_methods"),
        ({"n_sources": 1}, "n_sources"),
        ({"device": "tpu"}, "device"),
        ({"iters": 0}, "iters"),
    ],
)
def test_config_errors_name_the_key(fields: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        BenchConfig(**fields)


def test_resolved_defaults_follow_the_device() -> None:
    r = resolve(BenchConfig(device="cpu"))
    assert (r.patch, r.precision, r.compile, r.fisher_methods) == (64, "32-true", False, ["loop", "vmap"])
    assert r.fast_is_reference
    r = resolve(BenchConfig(device="cpu", precision="bf16-mixed", compile="true", patch_size=32))
    assert (r.patch, r.autocast, r.compile, r.fast_is_reference) == (32, torch.bfloat16, True, False)
    with pytest.raises(ConfigError, match="precision"):
        resolve(BenchConfig(device="cpu", precision="8-true"))
