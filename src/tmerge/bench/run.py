"""One ``tmerge bench`` run: the sections in order, the results file after each, the table at the end."""

from __future__ import annotations

import dataclasses
import logging
import os
import platform
import time
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch

from tmerge.bench.sections import Sections
from tmerge.bench.settings import SECTIONS, BenchConfig, Resolved, resolve
from tmerge.bench.table import format_table
from tmerge.bench.workload import loss_label
from tmerge.io import write_json, write_text
from tmerge.paths import runs_dir
from tmerge.runner import quiet_lightning

log = logging.getLogger("tmerge")

#: The bench's outputs in ``out_dir``: every number (JSON) and the table (Markdown).
RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"

#: Warnings of the bench's deliberately tiny fits (one epoch of a few steps, no validation,
#: in-memory data): true, and beside the point of a timing.
_EXPECTED_WARNINGS = (
    r".*does not have many workers",
    r"The number of training batches",
    r".*isinstance\(treespec, LeafSpec\)",
    r".*max_steps=.* reached",
    r"You defined a `validation_step` but have no `val_dataloader`",
)


def environment(r: Resolved) -> dict[str, Any]:
    """Where the numbers were taken: the results' ``environment``."""
    env: dict[str, Any] = {
        "device": torch.cuda.get_device_name(r.device)
        if r.device.type == "cuda"
        else platform.processor() or "cpu",
        "device_type": r.device.type,
        "cpu_threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "lightning": L.__version__,
        "python": platform.python_version(),
        "when": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    if r.device.type == "cuda":
        env["cuda"] = torch.version.cuda
    return env


def settings(cfg: BenchConfig, r: Resolved) -> dict[str, Any]:
    """What was measured, resolved: the results' ``settings``."""
    return {
        "patch_size": r.patch,
        "batch_size": cfg.batch_size,
        "in_channels": cfg.in_channels,
        "n_classes": cfg.n_classes,
        "net": dataclasses.asdict(cfg.net),
        "net_label": cfg.net.label(),
        "net_parameters": sum(p.numel() for p in cfg.net.build(cfg.in_channels, cfg.n_classes).parameters()),
        "precision": r.precision,
        "compile": r.compile,
        "warmup": cfg.warmup,
        "iters": r.iters,
        "fisher_samples": r.fisher_samples,
        "fisher_methods": r.fisher_methods,
        "loss": loss_label(cfg, r),
    }


def run_bench(cfg: BenchConfig) -> dict[str, Any]:
    """Entry point of ``tmerge bench``: measure every section not in ``cfg.skip``.

    Writes ``<out_dir>/RESULTS_JSON`` after each section (an interrupted run keeps what it
    measured) and ``RESULTS_MD`` (:func:`~tmerge.bench.table.format_table`) at the end, and
    prints the table.

    Returns:
        The results also written to ``RESULTS_JSON``.

    Raises:
        ConfigError: A setting the device or Lightning refuses (see :func:`resolve`).
    """
    start = time.perf_counter()
    r = resolve(cfg)
    out = Path(cfg.out_dir) if cfg.out_dir else runs_dir() / "bench"
    results: dict[str, Any] = {"environment": environment(r), "settings": settings(cfg, r)}
    log.info(
        "bench on %s: %d³ patches, batch %d, base %d, fast path %s",
        results["environment"]["device"],
        r.patch,
        cfg.batch_size,
        cfg.net.base_filters,
        r.fast_label,
    )
    quiet_lightning()
    sections = Sections(cfg, r, out)
    if cfg.warmup:
        sections.prime()
    with warnings.catch_warnings():
        for message in _EXPECTED_WARNINGS:
            warnings.filterwarnings("ignore", message=message)
        for name in SECTIONS:
            if name in cfg.skip:
                continue
            began = time.perf_counter()
            results[name] = getattr(sections, f"section_{name}")()
            results[name]["section_s"] = time.perf_counter() - began
            log.info("bench: %s done (%.0f s)", name, results[name]["section_s"])
            results["total_s"] = time.perf_counter() - start
            write_json(out / RESULTS_JSON, results)
    results["total_s"] = time.perf_counter() - start
    write_json(out / RESULTS_JSON, results)
    table = format_table(results)
    write_text(out / RESULTS_MD, table)
    print(table)
    log.info("bench: %.0f s; results in %s", results["total_s"], out / RESULTS_JSON)
    return results
