"""``tmerge bench``: each measuring piece against numbers known beforehand, then one tiny run.

The table is fed hand-made times and must print the ratios worked out here; ``time_steps`` and
``StepTimer`` time steps of known duration; ``PeakMemory`` must see a known allocation; the
tiny run (16³, base 4, one timed step) goes through the CLI and must write every section it
was asked for, with the Fisher methods agreeing.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from torch import nn

from tmerge.bench import BenchConfig, PeakMemory, format_table, resolve, time_steps
from tmerge.bench.timing import StepTimer, rss_bytes
from tmerge.bench.workload import bare_step, bench_loss, bench_module, reference_plugin
from tmerge.cli import main
from tmerge.errors import ConfigError
from tmerge.nets.config import NetConfig

CPU = torch.device("cpu")
TINY = ["patch_size=16", "iters=1", "fisher_samples=2", "net.base_filters=4", "net.depth=3"]


# ------------------------------------------------------------------------------------- table


def _hand_made_results() -> dict:
    """A results dict with round times, and none of the sections' own ratio keys: whatever
    ratio the table prints, it must have computed from the times."""

    def timing(label: str, s: float, mib: float) -> dict:
        return {"label": label, "s": s, "peak_mib": mib}

    return {
        "environment": {
            "device": "TestCPU",
            "device_type": "cpu",
            "torch": "2.x",
            "lightning": "2.y",
            "when": "2026-01-01 00:00:00",
            "cpu_threads": 2,
        },
        "settings": {
            "patch_size": 64,
            "batch_size": 2,
            "net": {"base_filters": 16, "depth": 5},
            "in_channels": 4,
            "n_classes": 3,
            "compile": False,
            "precision": "bf16-mixed",
            "warmup": 1,
            "iters": 2,
            "loss": "dice",
        },
        "step": {
            "reference": timing("eager float32", 0.300, 1733.4),
            "fast": timing("eager bf16-mixed", 0.100, 1500),
        },
        "lightning": {
            "module": "SegmentationModule",
            "bare": timing("bare step", 0.100, 1500),
            "lightning": timing("Lightning loop, device tensors", 0.125, 1600),
        },
        "data": {
            "device": timing("Lightning loop, device tensors", 0.125, 1600),
            "real": timing("Lightning loop, patch pipeline", 0.250, 1700),
            "target": 0.9,
            "loader_s_per_batch": 0.014,
            "num_workers": 0,
        },
        "fisher": {
            "methods": {
                "loop": {**timing("per-sample loop", 2.0, 1800), "used": "loop", "precision": "float32"},
                "vmap": {**timing("batched (vmap)", 0.5, 2800), "used": "vmap", "precision": "float32"},
                "compile": {
                    **timing("compiled loop", 4.0, 1900),
                    "used": "loop",
                    "precision": "float32",
                    "first_s": 61.0,
                },
            },
            "reference": "loop",
            "max_rel_diff": {"vmap": 1e-3, "compile": 2e-2},
            "tolerance": 1e-2,
            "auto_picks": "loop",
            "auto_picks_paper": "loop",
        },
        "adaption": {
            "plain": timing("training step", 0.100, 1500),
            "adaption": timing("adaption step", 0.150, 2595),
            "layers": 27,
            "sources": 2,
        },
        "total_s": 62.4,
    }


def _rows(table: str) -> dict[str, list[list[str]]]:
    """The table's data rows by their first cell, each as its stripped cells."""
    rows: dict[str, list[list[str]]] = {}
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and cells[0] != "measurement":
            rows.setdefault(cells[0], []).append(cells)
    return rows


def test_table_prints_the_ratios_of_hand_made_times() -> None:
    table = format_table(_hand_made_results())
    rows = _rows(table)
    # measurement | A | time A | B | time B | B vs A | memory A / B
    assert rows["training step"] == [
        [
            "training step",
            "eager float32",
            "300.0 ms",
            "eager bf16-mixed",
            "100.0 ms",
            "3.00× faster",
            "1,733 / 1,500",
        ]
    ]
    assert rows["Lightning loop"][0][4:6] == ["125.0 ms", "overhead 1.25×"]  # 0.125 / 0.100
    assert rows["data pipeline"][0][5] == "0.50 of the speed (target ≥ 0.9: too slow)"  # 0.125 / 0.25
    vmap, compiled = rows["Fisher per volume (float32)"]
    assert vmap[2:6] == [
        "2.00 s",
        "batched (vmap)",
        "500.0 ms",
        "4.00× faster; equal (max rel. diff 1.0e-03)",
    ]
    assert compiled[4:6] == [
        "4.00 s",
        "2.00× slower; DIFFER (max rel. diff 2.0e-02)",
    ]  # 2.0 / 4.0; 2e-2 > 1e-2
    assert rows["adaption step"][0][5:] == ["1.50× the time", "1,500 / 2,595"]  # 0.150 / 0.100
    notes = table.split("\n\n")[-1]
    assert "8.00 steps/s" in notes  # 1 / 0.125
    assert "loop 0.50, vmap 2.00, compile 0.25" in notes  # volumes/s = 1 / seconds per volume
    assert "Fisher compile: fell back to loop" in notes
    assert "first volume incl. compilation 61.00 s" in notes
    assert "14.0 ms per batch with 0 worker(s)" in notes and "total: 62 s" in notes


def test_table_leaves_out_sections_not_measured() -> None:
    results = _hand_made_results()
    for name in ("data", "fisher", "adaption"):
        del results[name]
    rows = _rows(format_table(results))
    assert set(rows) == {"training step", "Lightning loop"}


# ------------------------------------------------------------------------------------- timing


def test_time_steps_times_only_the_timed_steps() -> None:
    """Warm-up steps of 0.1 s, timed steps of 0.01 s: the per-step time is the short one."""
    calls: list[float] = []

    def step() -> None:
        time.sleep(0.1 if len(calls) < 2 else 0.01)
        calls.append(time.perf_counter())

    result = time_steps(step, warmup=2, iters=3, device=CPU)
    assert len(calls) == 5  # warm-up + timed, each exactly once
    assert 0.01 <= result["s"] < 0.05  # sleep overshoots a little on a loaded box, never 0.1
    assert 0.2 <= result["first_s"] < 0.4
    assert result["peak_mib"] is not None and result["peak_mib"] > 0


def test_peak_memory_sees_a_known_allocation() -> None:
    size_mib = 256
    with PeakMemory(CPU) as memory:
        before = rss_bytes() / 2**20
        block = torch.ones(size_mib * 2**20 // 4)  # float32, every page touched
        time.sleep(20 * PeakMemory.interval_s)  # several samples while it is held
        del block
    after = rss_bytes() / 2**20
    assert memory.mib is not None
    assert memory.mib >= before + 0.95 * size_mib
    # Freed before the block ended (large blocks go back to the OS), so the sampler saw it.
    assert after < memory.mib - size_mib / 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_peak_memory_on_cuda_counts_allocated_bytes() -> None:
    device = torch.device("cuda")
    with PeakMemory(device) as memory:
        block = torch.empty(64 * 2**20, dtype=torch.uint8, device=device)
        del block
    assert memory.mib is not None and memory.mib >= 64


class _Sleeper(L.LightningModule):
    """A step of known duration: 0.05 s per training step."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))
        self.steps = 0

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        self.steps += 1
        time.sleep(0.05)
        return (self.w * batch).sum()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_step_timer_times_the_steps_after_warm_up() -> None:
    module, timer = _Sleeper(), StepTimer(warmup=2, iters=3, device=CPU)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=5,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[timer],
    )
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(torch.ones(5, 1), batch_size=1))
    assert module.steps == 5 and timer.steps == 3
    assert 3 * 0.05 <= timer.seconds < 3 * 0.05 + 0.15  # three steps, not five
    assert timer.peak_mib is not None and timer.peak_mib > 0


# ------------------------------------------------------------------------------------- steps


def test_bare_step_runs_in_the_plugins_precision() -> None:
    """The fast path's plugin puts the forward under bf16 autocast; the reference does not."""
    for precision, expected in (("32-true", torch.float32), ("bf16-mixed", torch.bfloat16)):
        plugin = resolve(BenchConfig(device="cpu", precision=precision)).plugin
        conv = nn.Conv3d(1, 1, 1)
        before = conv.weight.detach().clone()
        seen: list[torch.dtype] = []

        def forward(x: torch.Tensor, conv: nn.Module = conv, seen: list = seen) -> torch.Tensor:
            out = conv(x)
            seen.append(out.dtype)
            return out

        x, y = torch.randn(2, 1, 4, 4, 4), (torch.rand(2, 1, 4, 4, 4) > 0.5).float()
        bare_step(forward, list(conv.parameters()), nn.functional.mse_loss, x, y, plugin)()
        assert seen == [expected], precision
        assert not torch.equal(conv.weight, before)  # Adam took a step
    assert reference_plugin().precision == "32-true"


def test_bare_steps_and_the_module_share_the_projects_loss() -> None:
    cfg = BenchConfig(device="cpu", patch_size=16, net=NetConfig(base_filters=4, depth=3))
    r = resolve(cfg)
    module = bench_module(cfg.net.build(cfg.in_channels, cfg.n_classes), cfg, r)
    logits = torch.randn(2, 3, 8, 8, 8)
    target = (torch.rand(2, 3, 8, 8, 8) > 0.5).float()
    torch.testing.assert_close(bench_loss(cfg, r)(logits, target), module.loss_fn(logits, target))
    assert module.class_names == ["ET", "TC", "WT"] and module.output_mode == "sigmoid"


# ------------------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"patch_size": 24}, "patch_size: got 24"),
        ({"fisher_methods": ["jit"]}, "fisher_methods"),
        ({"n_sources": 1}, "n_sources"),
        ({"device": "tpu"}, "device"),
        ({"iters": 0}, "iters"),
        ({"num_workers": -1}, "num_workers"),
        ({"skip": ["everything"]}, "skip"),
    ],
)
def test_config_errors_name_the_key(fields: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        BenchConfig(**fields)


def test_patch_size_must_suit_the_chosen_network() -> None:
    """The check follows the network's own downsampling, not the default network's."""
    net = NetConfig(name="dynunet", filters=[4, 8, 16, 32], strides=[2, 2, 2])
    assert BenchConfig(net=net, patch_size=24).patch_size == 24  # a multiple of 8
    message = r"patch_size: got 24; expected a multiple of 16 of at least 32 \(net.divisor: the dynunet"
    with pytest.raises(ConfigError, match=message):
        BenchConfig(net=NetConfig(name="dynunet"), patch_size=24)


def test_table_names_the_network_it_measured() -> None:
    results = _hand_made_results()
    assert "Isensee2017 base 16 depth 5, 4→3 channels" in format_table(results)  # results of old
    results["settings"].update(net_label="SegResNet init filters 8", net_parameters=4_700_000)
    assert "batch 2, SegResNet init filters 8 (4.70 M parameters), 4→3 channels" in format_table(results)


def test_resolved_defaults_follow_the_device() -> None:
    r = resolve(BenchConfig(device="cpu"))
    assert (r.patch, r.iters, r.precision, r.compile, r.fisher_methods) == (
        64,
        2,
        "32-true",
        False,
        ["loop", "vmap"],
    )
    assert r.fast_is_reference
    r = resolve(BenchConfig(device="cpu", precision="32", compile="true", patch_size=32))
    assert (r.patch, r.precision, r.compile, r.fast_is_reference) == (32, "32-true", True, False)
    with pytest.raises(ConfigError, match="precision"):
        resolve(BenchConfig(device="cpu", precision="8-true"))
    with pytest.raises(ConfigError, match="^compile"):
        resolve(BenchConfig(device="cpu", compile="maybe"))


def test_cli_show_config_lists_every_key(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "--show-config", "iters=3", "skip=[data]"]) == 0
    out = capsys.readouterr().out
    assert (
        "iters: 3" in out and "- data" in out and "base_filters: 16" in out and "fisher_methods: null" in out
    )


@pytest.mark.parametrize(
    ("arg", "needle"),
    [("skip=[everything]", "skip"), ("net.width=3", "net.width"), ("precision=8-true", "precision")],
)
def test_cli_errors_name_the_key(
    arg: str, needle: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["bench", arg, f"out_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"tmerge bench: error: {needle}") or f"config key {needle}" in err
    assert not any(tmp_path.iterdir())  # nothing measured, nothing written


# ------------------------------------------------------------------------------------- end to end


def test_tiny_bench_through_the_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Every section but `step` (still measured once, as the bare step the others compare to)."""
    assert main(["bench", *TINY, "skip=[step]", f"out_dir={tmp_path}"]) == 0
    saved = json.loads((tmp_path / "results.json").read_text())
    assert set(saved) == {"environment", "settings", "lightning", "data", "fisher", "adaption", "total_s"}
    assert saved["settings"]["patch_size"] == 16 and saved["settings"]["net"]["base_filters"] == 4
    assert saved["settings"]["net_label"] == "Isensee2017 base filters 4 depth 3"
    assert saved["settings"]["net_parameters"] > 0
    assert (
        saved["environment"]["device_type"] == "cpu" and saved["lightning"]["module"] == "SegmentationModule"
    )
    for section, parts in (
        ("lightning", "bare lightning"),
        ("data", "device real"),
        ("adaption", "plain adaption"),
    ):
        for part in parts.split():
            assert saved[section][part]["s"] > 0 and saved[section][part]["peak_mib"] > 0, (section, part)

    fisher = saved["fisher"]
    assert list(fisher["methods"]) == ["loop", "vmap"]  # the CPU default
    assert [m["used"] for m in fisher["methods"].values()] == ["loop", "vmap"]  # no fallback
    assert fisher["equal"] and 0 <= fisher["max_rel_diff"]["vmap"] <= fisher["tolerance"] == 1e-2
    assert fisher["auto_picks"] == "vmap"  # 16³ voxels on CPU: within VMAP_MAX_VOXELS (48³)

    table = (tmp_path / "results.md").read_text()
    assert set(_rows(table)) == {
        "Lightning loop",
        "data pipeline",
        "Fisher per volume (float32)",
        "adaption step",
    }
    assert table in capsys.readouterr().out  # printed as well
