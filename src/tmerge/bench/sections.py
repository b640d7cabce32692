"""The five measurements of ``tmerge bench``, one method each, returning what the results file
holds under the section's name (keys documented in docs/benchmarks.md)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins import Precision
from torch import Tensor, nn

from tmerge.bench.settings import BenchConfig, Resolved
from tmerge.bench.timing import PeakMemory, StepTimer, sync, time_steps
from tmerge.bench.workload import (
    ReferenceNumerics,
    Repeat,
    bare_step,
    bench_loss,
    bench_module,
    patch_loader,
    reference_plugin,
    synthetic_batch,
)
from tmerge.fastpath import CompiledForward, enable_cudnn_benchmark
from tmerge.fisher import auto_method, autocast_for, compute_fisher_sums
from tmerge.merge import AdaptiveMerge
from tmerge.nets import layer_groups, partition

#: Largest relative difference (to the largest entry) at which two Fisher methods count as equal:
#: float32 round-off is amplified by instance norm at small bottlenecks (see :mod:`tmerge.fisher`);
#: bfloat16 autocast rounds every activation to 8 bits of mantissa.
FISHER_TOLERANCE = {"float32": 1e-2, "bfloat16": 5e-2, "float16": 5e-2}
DATA_TARGET = 0.9  # issue 6: the loop with real data at ≥ 90 % of the speed on device tensors
FISHER_LABELS = {"loop": "per-sample loop", "vmap": "batched (vmap)", "compile": "compiled loop"}
PAPER_TASK_VOLUMES = 18  # training volumes of one of the paper's source tasks


class Sections:
    """Networks and data for one bench run, and its measurements (``section_<name>``).

    Measurements that several sections compare against (the fast bare step, the Lightning loop
    on device tensors) are taken once and reused, so each is timed under the same conditions.
    """

    def __init__(self, cfg: BenchConfig, r: Resolved, out_dir: Path) -> None:
        self.cfg, self.r, self.out_dir = cfg, r, out_dir
        self.loss_fn = bench_loss(cfg, r)
        x, y = synthetic_batch(cfg, r.patch, cfg.batch_size, cfg.seed)
        # (B, C_in, P, P, P) and (B, K, P, P, P) on the device, in the network's memory format.
        self.x = x.to(r.device).contiguous(memory_format=r.memory_format)
        self.y = y.to(r.device).contiguous(memory_format=r.memory_format)
        self._fast_step: dict[str, Any] | None = None
        self._device_loop: dict[str, Any] | None = None

    def net(self, plugin: Precision | None = None) -> nn.Module:
        """A fresh default network (same seed, same weights every time) on the device, its
        parameters in ``plugin``'s dtype (float32 without one)."""
        torch.manual_seed(self.cfg.seed)
        net = self.cfg.net.build(self.cfg.in_channels, self.cfg.n_classes)
        if plugin is not None:
            net = plugin.convert_module(net)
        return net.to(self.r.device).to(memory_format=self.r.memory_format)

    def fast_x(self) -> Tensor:
        """The images as the fast path's plugin feeds them (e.g. bf16 for ``bf16-true``)."""
        return self.r.plugin.convert_input(self.x)

    def prime(self) -> None:
        """One untimed step before anything is timed: the process's first step pays one-off
        costs (allocator growth, oneDNN/cuDNN handles, lazy imports) that would otherwise land
        in whichever section comes first (measured at 64³ on CPU: 21 s first step, 12 s after)."""
        net = self.net()
        bare_step(net, list(net.parameters()), self.loss_fn, self.x, self.y, reference_plugin())()
        sync(self.r.device)

    # ---------------------------------------------------------------- step

    def fast_step(self) -> dict[str, Any]:
        """The bare training step in the project's fast path (measured once, reused)."""
        if self._fast_step is None:
            r = self.r
            if r.device.type == "cuda":
                enable_cudnn_benchmark()
            net = self.net(r.plugin)
            forward = CompiledForward(net) if r.compile else net
            step = bare_step(forward, list(net.parameters()), self.loss_fn, self.fast_x(), self.y, r.plugin)
            timing = time_steps(step, self.cfg.warmup, r.iters, r.device)
            if isinstance(forward, CompiledForward) and not forward.active:
                timing["compile_error"] = forward.error
            self._fast_step = timing
        return self._fast_step

    def section_step(self) -> dict[str, Any]:
        r = self.r
        with ReferenceNumerics():
            net = self.net()
            step = bare_step(net, list(net.parameters()), self.loss_fn, self.x, self.y, reference_plugin())
            reference = time_steps(step, self.cfg.warmup, r.iters, r.device)
            del net, step
        if r.fast_is_reference:
            # The fast path is the reference here (CPU): the same measurement, not taken twice.
            self._fast_step = dict(reference)
            fast = {**reference, "same_as_reference": True}
        else:
            fast = {**self.fast_step(), "same_as_reference": False}
        return {
            "reference": {"label": "eager float32", **reference},
            "fast": {"label": r.fast_label, **fast},
            "speedup": reference["s"] / fast["s"],
        }

    # ---------------------------------------------------------------- lightning

    def _lightning(self, loader: Any, batches: int) -> dict[str, Any]:
        """Fit a fresh module on ``loader`` for ``batches`` steps; time the last ``iters``."""
        r = self.r
        module = bench_module(self.net(), self.cfg, r)
        timer = StepTimer(self.cfg.warmup, r.iters, r.device)
        trainer = L.Trainer(
            accelerator=r.accelerator,
            devices=[r.device.index or 0] if r.device.type == "cuda" else 1,
            precision=r.precision,  # the Trainer converts the module, as in a stage's fit
            max_epochs=1,
            max_steps=batches,
            limit_val_batches=0,
            num_sanity_val_steps=0,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            default_root_dir=str(self.out_dir / "lightning"),
            callbacks=[timer],
        )
        trainer.fit(module, train_dataloaders=loader)
        if timer.steps < r.iters:
            raise RuntimeError(f"bench: the Lightning loop ran {timer.steps} timed steps, expected {r.iters}")
        return {"s": timer.seconds / timer.steps, "peak_mib": timer.peak_mib, "module": type(module).__name__}

    def device_loop(self) -> dict[str, Any]:
        """The Lightning loop on batches already on the device (measured once, reused)."""
        if self._device_loop is None:
            batches = self.cfg.warmup + self.r.iters
            item = {"image": self.fast_x(), "label": self.y}
            loader = torch.utils.data.DataLoader(Repeat(item, batches), batch_size=None)
            self._device_loop = self._lightning(loader, batches)
        return self._device_loop

    def section_lightning(self) -> dict[str, Any]:
        bare, loop = self.fast_step(), self.device_loop()
        return {
            "module": loop["module"],
            "bare": {
                "label": f"bare step, {self.r.fast_label}",
                "s": bare["s"],
                "peak_mib": bare["peak_mib"],
            },
            "lightning": {
                "label": "Lightning loop, device tensors",
                "s": loop["s"],
                "peak_mib": loop["peak_mib"],
            },
            "overhead": loop["s"] / bare["s"],
            "steps_per_s": 1 / loop["s"],
            "bare_steps_per_s": 1 / bare["s"],
        }

    # ---------------------------------------------------------------- data

    def section_data(self) -> dict[str, Any]:
        batches = self.cfg.warmup + self.r.iters
        loader = patch_loader(self.cfg, self.r, batches)
        # The loader alone: what the accelerator would wait for per batch if nothing overlapped.
        start = time.perf_counter()
        fetched = sum(1 for _ in loader)
        loader_s = (time.perf_counter() - start) / max(fetched, 1)
        real = self._lightning(loader, batches)
        device = self.device_loop()
        ratio = device["s"] / real["s"]
        return {
            "device": {
                "label": "Lightning loop, device tensors",
                "s": device["s"],
                "peak_mib": device["peak_mib"],
            },
            "real": {"label": "Lightning loop, patch pipeline", "s": real["s"], "peak_mib": real["peak_mib"]},
            "ratio": ratio,
            "target": DATA_TARGET,
            "keeps_up": ratio >= DATA_TARGET,
            "loader_s_per_batch": loader_s,
            "num_workers": self.r.num_workers,
        }

    # ---------------------------------------------------------------- fisher

    def section_fisher(self) -> dict[str, Any]:
        cfg, r = self.cfg, self.r
        n = r.fisher_samples
        x, y = synthetic_batch(cfg, r.patch, n, cfg.seed + 1)
        # One (1, C_in, P, P, P) / (1, K, P, P, P) pair per volume, on CPU, as a loader yields them.
        samples = [(x[i : i + 1], y[i : i + 1]) for i in range(n)]
        autocast = autocast_for(r.precision)  # the numerics the FisherCallback would use
        net = self.net()  # float32 parameters: the Fisher of the trained weights
        methods: dict[str, dict[str, Any]] = {}
        sums: dict[str, dict[str, Tensor]] = {}
        for method in r.fisher_methods:
            first_s = 0.0
            if cfg.warmup:
                start = time.perf_counter()
                compute_fisher_sums(
                    net, samples, self.loss_fn, method=method, max_samples=cfg.warmup, autocast_dtype=autocast
                )
                first_s = time.perf_counter() - start
            with PeakMemory(r.device) as memory:
                result = compute_fisher_sums(
                    net, samples, self.loss_fn, method=method, autocast_dtype=autocast
                )
            methods[method] = {
                "label": FISHER_LABELS[method],
                "used": result.method,
                "precision": result.precision,
                "s": result.seconds / result.count,
                "volumes_per_s": result.volumes_per_s,
                "first_s": first_s,
                "peak_mib": memory.mib,
            }
            sums[method] = result.sums
        reference = next(iter(sums))
        # Differences relative to the largest entry: the Fisher spans many orders of magnitude,
        # and an elementwise relative difference would be dominated by entries near zero.
        scale = max(float(t.abs().max()) for t in sums[reference].values()) or 1.0
        tolerance = FISHER_TOLERANCE.get(methods[reference]["precision"], 5e-2)
        diffs = {
            m: max(float((s[k] - sums[reference][k]).abs().max()) for k in s) / scale
            for m, s in sums.items()
            if m != reference
        }
        out: dict[str, Any] = {
            "methods": methods,
            "reference": reference,
            "max_rel_diff": diffs,
            "tolerance": tolerance,
            "equal": all(d <= tolerance for d in diffs.values()),
            "auto_picks": auto_method(x[0], r.device, n),
            "auto_picks_paper": auto_method(x[0], r.device, PAPER_TASK_VOLUMES),
        }
        if "loop" in methods and "vmap" in methods:
            out["speedup_batched"] = methods["loop"]["s"] / methods["vmap"]["s"]
        if "loop" in methods and "compile" in methods:
            out["speedup_compiled"] = methods["loop"]["s"] / methods["compile"]["s"]
        return out

    # ---------------------------------------------------------------- adaption

    def section_adaption(self) -> dict[str, Any]:
        cfg, r = self.cfg, self.r
        net = self.net(r.plugin)
        fused, _ = partition(net)
        layers = layer_groups(net, fused)
        g = torch.Generator().manual_seed(cfg.seed + 2)
        state = {k: v.detach().cpu() for k, v in net.state_dict().items()}
        # Sources: the network's weights with independent perturbations; Fishers: positive, of
        # the magnitudes seen on the embedded data (mean ≈ 1e-7). Timing does not depend on the
        # values, but realistic ones keep α and the merged weights in their usual range.
        sources = [
            {k: v + 0.01 * torch.randn(v.shape, generator=g).to(v.dtype) for k, v in state.items()}
            for _ in range(cfg.n_sources)
        ]
        fishers = [
            {n: torch.rand(state[n].shape, generator=g) * 2e-7 for n in fused} for _ in range(cfg.n_sources)
        ]
        adaptive = AdaptiveMerge(net, sources, fishers, layers, eps=1e-10).to(r.device)
        forward = CompiledForward(adaptive) if r.compile else adaptive
        params = [p for p in adaptive.parameters() if p.requires_grad]
        step = bare_step(forward, params, self.loss_fn, self.fast_x(), self.y, r.plugin)
        timing = time_steps(step, cfg.warmup, r.iters, r.device)
        plain = self.fast_step()
        return {
            "plain": {
                "label": f"training step, {r.fast_label}",
                "s": plain["s"],
                "peak_mib": plain["peak_mib"],
            },
            "adaption": {"label": f"adaption step, {r.fast_label}", **timing},
            "ratio": timing["s"] / plain["s"],
            "layers": len(layers),
            "sources": cfg.n_sources,
        }
