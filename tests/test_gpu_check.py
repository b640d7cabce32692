"""experiments/gpu (issue 23's GPU check in one command): the plan's sizes and the cache it
prepares, the runner's limits, skips and prerequisites on stand-in commands, and the output
files collected from hand-made results."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tmerge.io import write_json, write_safetensors
from tmerge.runs import FISHER_FILE, FIT_FILE, STEP_STATS_FILE

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "experiments" / "gpu" / "gpucheck.py"


def _load():
    spec = importlib.util.spec_from_file_location("gpucheck", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpucheck"] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


gpucheck = _load()


def _arg(argv: list[str], key: str) -> str:
    [value] = [a.split("=", 1)[1] for a in argv if a.startswith(f"{key}=")]
    return value


# ------------------------------------------------------------------------------------- the plan


def test_the_plan_runs_the_paper_sizes_in_order(tmp_path: Path) -> None:
    parts = {p.name: p for p in gpucheck.plan(tmp_path, tiny=False)}
    assert list(parts) == list(gpucheck.PARTS)
    assert parts["prepare"].background and parts["timm"].after == ("prepare", "task1", "task2")
    bench = parts["bench"].argv
    assert not any(a.startswith(("patch_size=", "iters=")) for a in bench)  # the GPU defaults: 128³
    task1, timm = parts["task1"].argv, parts["timm"].argv
    assert task1[2:5] == ["task1", "--profile", "paper"] and timm[2:5] == ["timm", "--profile", "paper"]
    assert _arg(task1, "trainer.max_epochs") == "6" and _arg(task1, "trainer.step_stats") == "true"
    assert _arg(timm, "data.n4") == "false"  # SimpleITK is not on the GPU image
    assert not any(a.startswith("data.patch_size=") for a in task1 + timm)  # the profile's 128
    for net in ("dynunet", "segresnet"):
        assert _arg(parts[net].argv, "net.name") == net
    # The background part generates 1 mm data in BraTS's grid and prepares exactly the stages'
    # commands, so that they find their preprocessing cache filled.
    prepare = parts["prepare"].argv
    data = json.loads(prepare[prepare.index("--data") + 1])
    assert (_arg(data, "size"), _arg(data, "grid"), _arg(data, "n_hcp")) == ("192", "[240,240,155]", "58")
    stages = [json.loads(prepare[i + 1]) for i, a in enumerate(prepare) if a == "--stage"]
    assert stages == [task1[2:], timm[2:]]


def test_tiny_shrinks_every_size(tmp_path: Path) -> None:
    parts = {p.name: p for p in gpucheck.plan(tmp_path, tiny=True)}
    assert (
        _arg(parts["bench"].argv, "patch_size") == "16" and _arg(parts["dynunet"].argv, "patch_size") == "32"
    )
    assert _arg(parts["task1"].argv, "data.patch_size") == "16"
    data = json.loads(parts["prepare"].argv[parts["prepare"].argv.index("--data") + 1])
    assert (_arg(data, "size"), _arg(data, "grid")) == ("32", "[40,40,26]")


def test_a_subset_keeps_the_order_and_unknown_parts_are_refused(tmp_path: Path) -> None:
    assert [p.name for p in gpucheck.plan(tmp_path, False, ["segresnet", "bench"])] == ["bench", "segresnet"]
    with pytest.raises(ValueError, match="unknown part"):
        gpucheck.plan(tmp_path, False, ["bench", "everything"])


# ------------------------------------------------------------------------------------- running


def _part(name: str, code: str, cap_s: float, **kwargs) -> object:
    return gpucheck.Part(name, ["-c", code], cap_s, **kwargs)


def test_limits_prerequisites_and_the_budget(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import time

    monkeypatch.setattr(gpucheck, "GRACE_S", 2.0)
    monkeypatch.setattr(gpucheck, "RESERVE_S", 0.0)
    marker = tmp_path / "background-ran"
    parts = [
        _part(
            "prepare",
            f"import pathlib, time; time.sleep(0.5); pathlib.Path({str(marker)!r}).touch()",
            10,
            background=True,
        ),
        _part("bench", "import time; time.sleep(60)", 1.0),  # past its limit
        _part("task1", "raise SystemExit(3)", 10, after=("prepare",)),
        _part("task2", "pass", 10, after=("task1",)),  # its prerequisite failed
        _part("timm", "pass", 10, after=("prepare",)),
        _part("dynunet", "pass", 60),  # more time needed than is left
    ]
    seen: list[dict] = []
    started = time.monotonic()
    runner = gpucheck.Runner(parts, deadline=time.monotonic() + 8, on_change=lambda o: seen.append(dict(o)))
    outcomes = runner.run()
    assert time.monotonic() - started < 8
    status = {name: o.status for name, o in outcomes.items()}
    assert status["prepare"] == "ok" and marker.exists()
    assert status["bench"] == "timed out" and outcomes["bench"].seconds < 5  # SIGTERM ended it
    assert status["task1"] == "failed (exit 3)"
    assert status["task2"] == "skipped: needs task1, which failed (exit 3)"
    assert status["timm"] == "ok"
    assert status["dynunet"].startswith("skipped:") and "left of the budget" in status["dynunet"]
    assert len(seen) >= 5  # results rewritten after every part


# ------------------------------------------------------------------------------------- results


def _timing(label: str, s: float) -> dict:
    return {"label": label, "s": s, "peak_mib": 1000.0}


def _bench(net: str) -> dict:
    """A results file as `tmerge bench` writes it, with round times."""
    return {
        "environment": {
            "device": "GPU",
            "device_type": "cuda",
            "torch": "2.x",
            "lightning": "2.y",
            "when": "now",
            "cpu_threads": 16,
        },
        "settings": {
            "patch_size": 128,
            "batch_size": 2,
            "net": {"base_filters": 16, "depth": 5},
            "net_label": f"{net} net",
            "net_parameters": 2_000_000,
            "in_channels": 4,
            "n_classes": 3,
            "compile": True,
            "precision": "bf16-mixed",
            "warmup": 1,
            "iters": 20,
            "loss": "dice",
        },  # fmt: skip
        "step": {
            "reference": _timing("eager float32", 0.280),
            "fast": {**_timing("compiled bf16-mixed", 0.050), "first_s": 70.0},
        },
        "lightning": {
            "module": "SegmentationModule",
            "bare": _timing("bare", 0.050),
            "lightning": _timing("loop", 0.0525),
        },
        "data": {
            "device": _timing("device", 0.0525),
            "real": _timing("real", 0.075),
            "target": 0.9,
            "loader_s_per_batch": 0.01,
            "num_workers": 8,
        },  # fmt: skip
        "fisher": {
            "methods": {
                "loop": {**_timing("loop", 0.060), "used": "loop", "precision": "bfloat16", "first_s": 1.0},
                "compile": {
                    **_timing("compiled", 0.040),
                    "used": "compile",
                    "precision": "bfloat16",
                    "first_s": 50.0,
                },
            },
            "reference": "loop",
            "max_rel_diff": {"compile": 0.01},
            "tolerance": 0.05,
            "equal": True,
            "auto_picks": "loop",
            "auto_picks_paper": "compile",
        },  # fmt: skip
        "adaption": {
            "plain": _timing("plain", 0.050),
            "adaption": _timing("adaption", 0.053),
            "layers": 27,
            "sources": 2,
        },
        "total_s": 300.0,
    }


def test_collect_writes_the_tables_and_the_goals(tmp_path: Path) -> None:
    work, out = tmp_path / "work", tmp_path / "out"
    out.mkdir()
    write_json(work / "bench" / "isensee2017" / "results.json", _bench("Isensee2017"))
    monai = _bench("DynUNet")
    del monai["lightning"], monai["data"], monai["fisher"], monai["adaption"]
    write_json(work / "bench" / "dynunet" / "results.json", monai)
    task1 = work / "runs" / "task1"
    stats = {
        "device": "GPU", "clock": "cuda events", "epochs": 6, "steps": 210, "warmup_steps": 2,
        "warmup_s": [65.2, 0.5], "s_per_step": 0.05, "median_s_per_step": 0.049, "busy_s": 0.045,
        "wait_s": 0.005, "wait_share": 0.1, "host_between_s": 0.02, "peak_allocated_mib": 9000.0,
        "peak_reserved_mib": 12000.0,
    }  # fmt: skip
    write_json(task1 / STEP_STATS_FILE, stats)
    write_json(task1 / FIT_FILE, {"epochs": 6, "wall_s": 95.0})
    import torch

    write_safetensors(
        task1 / FISHER_FILE,
        {"w": torch.zeros(1)},
        {"samples": 18, "method": "loop", "precision": "bfloat16", "seconds": 1.8},
    )
    write_json(
        work / "runs" / "brats" / "p100" / "timm" / "adaption" / STEP_STATS_FILE, {**stats, "steps": 90}
    )

    parts = [{"name": "bench", "status": "ok", "seconds": 250.0, "limit_s": 210.0, "command": "tmerge bench"}]
    gpucheck.collect(
        work,
        out,
        {"command": "bash experiments/gpu/run.sh", "environment": {"device": "GPU"}, "parts": parts},
    )

    assert sorted(p.name for p in out.iterdir()) == [
        "bench-dynunet.json",
        "bench-isensee2017.json",
        "check.json",
        "summary.md",
    ]
    check = json.loads((out / "check.json").read_text())
    goals = {g["goal"].split(" (")[0]: (round(g["measured"], 3), g["met"]) for g in check["goals"]}
    assert goals["training step, default fast path"] == (0.05, False)  # > 0.040
    assert goals["Lightning loop overhead"] == (1.05, True)  # 0.0525 / 0.050
    assert goals["data pipeline"] == (0.7, False)  # 0.0525 / 0.075
    assert goals["Fisher per volume, fastest"] == (0.8, True)  # compile 0.040 / step 0.050
    assert goals["adaption step"] == (1.06, True)
    assert set(check["stages"]) == {"task1", "brats/p100/timm/adaption"}
    assert check["stages"]["task1"]["fisher"]["seconds"] == "1.8"

    md = (out / "summary.md").read_text()
    assert (
        "| Isensee2017 net | 2.00 M | 0.2800 s | 0.0500 s (compiled bf16-mixed) | 5.60× | 70.0 s | 1,000 |"
        in md
    )
    assert "| DynUNet net | 2.00 M | 0.2800 s |" in md and "## Bench: dynunet" in md
    assert (
        "| task1 | 210 | 0.0500 | 0.0490 | 0.0450 | 0.10 | 0.0200 | 9,000 / 12,000 | 65.20, 0.50 | 6 | 95 |"
        in md
    )
    assert "| brats/p100/timm/adaption | 90 |" in md
    assert "task1 Fisher: 18 volumes by loop (bfloat16) in 1.8 s, 0.100 s per volume" in md
    assert "| bench | ok | 250 | 210 | `tmerge bench` |" in md


def test_collect_of_a_cut_run_keeps_what_is_there(tmp_path: Path) -> None:
    """A results file cut off mid-write and no stage yet: no error, the parts still listed."""
    work, out = tmp_path / "work", tmp_path / "out"
    out.mkdir()
    (work / "bench" / "isensee2017").mkdir(parents=True)
    (work / "bench" / "isensee2017" / "results.json").write_text('{"environment": {')
    gpucheck.collect(
        work,
        out,
        {
            "parts": [
                {"name": "bench", "status": "timed out", "seconds": 210.0, "limit_s": 210.0, "command": "c"}
            ]
        },
    )
    assert sorted(p.name for p in out.iterdir()) == ["check.json", "summary.md"]
    assert "| bench | timed out | 210 | 210 | `c` |" in (out / "summary.md").read_text()


def test_run_sh_is_valid_bash() -> None:
    done = subprocess.run(
        ["bash", "-n", str(ROOT / "experiments" / "gpu" / "run.sh")], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
