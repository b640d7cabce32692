"""A BraTS target run: initialise the network by a registry entry, (adapt,) fine-tune and test.

The orchestration only; the initialisations are entries of :mod:`tmerge.stages.inits`, the
grid choice is :mod:`tmerge.stages.selection`, T-IMM's adaption :mod:`tmerge.stages.adaption`,
the result files :mod:`tmerge.stages.results`, and the run folder's layout :mod:`tmerge.runs`.
Everything that can fail on the user's input (sources, architectures, Fishers, θ₀) is checked
before the run folder is touched.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import Logger

from tmerge.callbacks import PredictionWriter
from tmerge.config import to_container
from tmerge.dashboard import log_test_results
from tmerge.data.brats import BraTSDataModule
from tmerge.errors import ConfigError, RunError
from tmerge.evaluate import label_names
from tmerge.loggers import LoggerConfig, stage_loggers, wandb_mode, wandb_run
from tmerge.merge import mergeable_layers
from tmerge.nets import layer_groups, partition
from tmerge.paths import runs_dir
from tmerge.runner import check_trainer, fit
from tmerge.runs import (
    INIT_FILE,
    PREDICTIONS_DIR,
    TARGET_MARKER,
    VALIDATION_DIR,
    Source,
    load_source,
    target_dir,
)
from tmerge.stages.configs import TargetStageConfig
from tmerge.stages.inits import INITS, Initialisation, check_base, initialise, load_base
from tmerge.stages.module import segmentation_module
from tmerge.stages.protocol import stage_guard, start_run
from tmerge.stages.results import format_summary, test_subjects, write_results
from tmerge.stages.selection import select_candidate
from tmerge.transfer import map_input_channels

log = logging.getLogger("tmerge")

ALIASES = {"portion": "data.portion", "epochs": "trainer.max_epochs"}


def run_config(cfg: TargetStageConfig, init: str | None = None, seed: int | None = None) -> TargetStageConfig:
    """The config of one run: ``cfg`` for ``init`` and ``seed`` (default: ``cfg``'s), with the
    train/val draw resolved (``data.draw_seed`` None → the run's seed) so that every
    initialisation of a seed trains and validates on the same subjects."""
    init = cfg.init if init is None else init
    seed = cfg.seed if seed is None else seed
    draw = seed if cfg.data.draw_seed is None else cfg.data.draw_seed
    return dataclasses.replace(cfg, init=init, seed=seed, data=dataclasses.replace(cfg.data, draw_seed=draw))


def load_sources(
    cfg: TargetStageConfig,
    names: list[str],
    fused: list[str],
    with_fisher: bool,
    target: dict[str, torch.Tensor],
) -> list[Source]:
    """The source runs ``names`` (:func:`tmerge.runs.load_source`: every check), of the target
    network's architecture; with ``cfg.channel_map``, their input layer adapted to the ``target``
    state dict's shapes.

    Raises:
        RunError: a source is missing, unfinished, of another architecture or with a bad Fisher,
            or the sources solve tasks of different label counts.
    """
    # The whole network must agree between the sources and the target: its name and sizes.
    root, expected = runs_dir(cfg.runs_dir), cfg.net.architecture()
    sources = []
    for name in names:
        s = load_source(
            root,
            name,
            with_fisher=with_fisher,
            fused=fused,
            expected=expected,
            wandb_mode=wandb_mode(cfg.logger),
        )
        if cfg.channel_map is not None:
            s.state = map_input_channels(s.state, target, list(cfg.channel_map), rescale=True)
            if s.fisher is not None:
                s.fisher = map_input_channels(s.fisher, target, list(cfg.channel_map), rescale=False)
        sources.append(s)
    outputs = {s.name: s.meta.get("n_classes") for s in sources}
    if len(sources) > 1 and len(set(outputs.values())) > 1:
        # Merged models share P but each keeps its own S and heads; sources of different label
        # counts are not the paper's setting and usually mean a wrong run name.
        raise RunError(
            "sources: models to merge must solve tasks with the same number of classes, got "
            + ", ".join(f"{n}: {k} outputs" for n, k in outputs.items())
        )
    return sources


def run_target(cfg: TargetStageConfig) -> Path:
    """Initialise by ``cfg.init``, (select, adapt,) fine-tune and test one BraTS run; return its
    folder (``runs/brats/p<portion>/[seed<k>/]<init>``). A finished run is skipped."""
    if cfg.init not in INITS:
        raise ConfigError(f"init: expected one of {', '.join(INITS)}, got {cfg.init!r}")
    init = INITS[cfg.init]
    check_trainer(cfg.trainer)  # this machine runs the trainer settings (accelerator, devices, …)
    per_seed = cfg.seed_folder if cfg.seed_folder is not None else len(cfg.seeds) > 1
    run_dir = target_dir(runs_dir(cfg.runs_dir), cfg.data.portion, cfg.init, cfg.seed if per_seed else None)
    cfg = run_config(cfg)
    names = init.sources(cfg)
    if init.merges and len(names) < 2:
        raise ConfigError(f"sources: init={cfg.init} merges at least 2 source runs, got {names}")
    if init.models not in (None, len(names)):
        raise ConfigError(f"sources: init={cfg.init} merges exactly {init.models} source runs, got {names}")
    run_cfg = dataclasses.replace(cfg, inits=[cfg.init], seeds=[cfg.seed])
    dm = BraTSDataModule(**dataclasses.asdict(cfg.data), run_dir=str(run_dir))  # no I/O yet
    net = cfg.net.build(dm.in_channels, dm.n_outputs)
    fused, _ = partition(net)
    sources = load_sources(cfg, names, fused, with_fisher=init.fisher, target=net.state_dict())
    base = None
    if init.base:
        base = load_base(cfg, names, net.state_dict())
        layers, _ = mergeable_layers(net, [s.state for s in sources], layer_groups(net, fused))
        check_base(cfg.merge.base or f"{names[0]}/{INIT_FILE}", base, sources, layers)
    dm.check_layout()
    with stage_guard(run_dir):
        if not start_run(run_dir, run_cfg, TARGET_MARKER, force=cfg.force):
            log.info("%s is finished; pass force=true to run it again", run_dir)
            return run_dir
        stages: dict[str, Any] = {
            "init": cfg.init,
            "sources": names,
            "specific": cfg.transfer.specific,
            "fisher_normalize": cfg.fisher.normalize if init.fisher else None,
        }
        tags = [f"p{cfg.data.portion}", cfg.init, f"seed{cfg.seed}"]
        # One W&B run for the whole process, every stage under its own key prefix (what
        # `wandb agent`, which pins the process's run id, expects; see tmerge.loggers).
        name = f"p{cfg.data.portion}-{cfg.init}"
        with wandb_run(_logger_cfg(cfg, tags), runs_dir(cfg.runs_dir), name, to_container(run_cfg)) as run:
            _run_stages(cfg, init, dm, sources, base, run_dir, run, stages)
        return run_dir


def _run_stages(
    cfg: TargetStageConfig,
    init: Initialisation,
    dm: BraTSDataModule,
    sources: list[Source],
    base: dict[str, torch.Tensor] | None,
    run_dir: Path,
    run: Logger | None,
    stages: dict[str, Any],
) -> None:
    """Initialise, (select a candidate, adapt,) fine-tune and test one run in its locked folder;
    ``stages`` (the run's summary so far) is completed and written with the results."""
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    net = cfg.net.build(dm.in_channels, dm.n_outputs)  # fresh initialisation under the run's seed
    params = None
    if init.candidates is not None:
        params = select_candidate(cfg, init, dm, sources, base, run_dir)
        stages["merge"] = {"method": init.method, "params": params}
        L.seed_everything(cfg.seed, workers=True, verbose=False)  # S as fresh as for every init
        net = cfg.net.build(dm.in_channels, dm.n_outputs)
    start = initialise(cfg, init, net, sources, base, params)
    net = start.net
    if init.adapt is not None:
        net, stages["adaption"] = init.adapt(cfg, dm, net, sources, start, run_dir, run)

    module = segmentation_module(net, dm, cfg, cfg.data.patch_size)
    loggers = stage_loggers(run_dir, run, "finetune")
    # Label maps in original geometry: the test subjects', and (portion 100, paper §4.4) the
    # unlabelled validation set's under the BraTS submission naming <Brats18_ID>.nii.gz.
    predictions = run_dir / PREDICTIONS_DIR
    writer = PredictionWriter(test_dir=predictions, predict_dir=predictions / VALIDATION_DIR)
    trainer, result = fit(
        module,
        dm,
        run_dir=run_dir,
        trainer_cfg=cfg.trainer,
        loggers=loggers,
        callbacks=[writer],
        name=f"p{cfg.data.portion}/{cfg.init} fine-tune",
    )
    stages["finetune"] = result.as_dict()
    tested = test_subjects(trainer, module, dm, result.best_path)
    if dm.subjects.get("predict"):
        log.info("predicting %d unlabelled subjects into %s", len(dm.subjects["predict"]), writer.predict_dir)
        ckpt = result.best_path or None
        trainer.predict(module, datamodule=dm, ckpt_path=ckpt, return_predictions=False, weights_only=True)
    names = label_names(dm.output_mode, dm.class_names)
    log_test_results(
        loggers, tested.records, dm.class_names, tested.previews, names, step=trainer.global_step
    )
    if trainer.is_global_zero:
        summary = write_results(run_dir, cfg, dm, module.net, tested.records, stages, run)
        log.info("%s p%s: test %s", cfg.init, cfg.data.portion, format_summary(summary))


def _logger_cfg(cfg: TargetStageConfig, tags: list[str]) -> LoggerConfig:
    wandb = dataclasses.replace(
        cfg.logger.wandb,
        group=cfg.logger.wandb.group or f"brats-p{cfg.data.portion}",
        tags=[*cfg.logger.wandb.tags, *tags],
    )
    return LoggerConfig(wandb=wandb)
