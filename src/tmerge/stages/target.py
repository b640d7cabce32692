"""A target run (BraTS or any labelled dataset): initialise the network by a registry entry, (adapt,) fine-tune and test.

The orchestration only; the initialisations are entries of :mod:`tmerge.stages.inits`, the
grid choice is :mod:`tmerge.stages.selection`, T-IMM's adaption :mod:`tmerge.stages.adaption`,
the result files :mod:`tmerge.stages.results`, and the run folder's layout :mod:`tmerge.runs`.
Everything that can fail on the user's input (sources, architectures, Fishers, θ₀: all of it
:mod:`tmerge.sources`) is checked before the run folder is touched.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import Logger

from tmerge.callbacks import LearningCurve, PredictionWriter
from tmerge.config import to_container
from tmerge.dashboard import log_test_results
from tmerge.data.target import BRATS_TARGET, TargetDataModule
from tmerge.errors import ConfigError
from tmerge.evaluate import dice_summary, format_summary, label_names
from tmerge.loggers import LoggerConfig, stage_loggers, wandb_mode, wandb_run
from tmerge.merge import mergeable_layers
from tmerge.nets import input_names, layer_groups, partition
from tmerge.paths import runs_dir
from tmerge.resume import checkpoint_progress
from tmerge.runner import check_trainer, fit
from tmerge.runs import INIT_FILE, PREDICTIONS_DIR, TARGET_MARKER, VALIDATION_DIR, target_dir
from tmerge.sources import (
    Source,
    check_base,
    check_channel_map,
    check_same_outputs,
    input_plan,
    load_base,
    load_source,
    map_input,
)
from tmerge.stages.adaption import warm_up
from tmerge.stages.configs import TargetStageConfig
from tmerge.stages.initialisation import Initialisation
from tmerge.stages.inits import INITS, initialise
from tmerge.stages.module import segmentation_module
from tmerge.stages.protocol import stage_guard, start_run
from tmerge.stages.results import curve_score, test_subjects, write_results
from tmerge.stages.selection import select_candidate

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
    net: torch.nn.Module,
    fused: list[str],
    with_fisher: bool,
    channels: tuple[str, ...],
) -> list[Source]:
    """The source runs ``names`` (:func:`tmerge.sources.load_source`: every check), of the target
    network's architecture, their input layer adapted to the target's ``channels``
    (:func:`tmerge.sources.input_plan`).

    Raises:
        RunError: a source is missing, unfinished, of another architecture or with a bad Fisher,
            or the sources solve tasks of different label counts.
        ConfigError: ``channel_map`` does not name one source channel per target channel.
    """
    check_channel_map(cfg.channel_map, channels)
    target = net.state_dict()
    first = input_names(net, fused)
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
        plan, said = input_plan(cfg.channel_map, channels, s)
        log.info("%s: input layer: %s", cfg.init, said)
        map_input(s, target, plan, first)
        sources.append(s)
    check_same_outputs(sources)
    return sources


def describe(cfg: TargetStageConfig) -> dict[str, Any]:
    """The target a config resolves to (``--show-config``): name, layout, channels, output mode,
    classes and label values, read from the dataset (its description only)."""
    return {"target": TargetDataModule(**dataclasses.asdict(cfg.data)).describe()}


def run_target(cfg: TargetStageConfig) -> Path:
    """Initialise by ``cfg.init``, (select, adapt,) fine-tune and test one target run; return its
    folder (``runs/brats/p<portion>/[seed<k>/]<init>``; another target's under
    ``runs/targets/<name>/``). A finished run is skipped."""
    if cfg.init not in INITS:
        raise ConfigError(f"init: expected one of {', '.join(INITS)}, got {cfg.init!r}")
    init = INITS[cfg.init]
    check_trainer(cfg.trainer)  # this machine runs the trainer settings (accelerator, devices, …)
    per_seed = cfg.seed_folder if cfg.seed_folder is not None else len(cfg.seeds) > 1
    cfg = run_config(cfg)
    dm = TargetDataModule(**dataclasses.asdict(cfg.data), divisor=cfg.net.divisor)  # reads the dataset's description only
    folder = cfg.run_name or cfg.init
    run_dir = target_dir(runs_dir(cfg.runs_dir), cfg.data.portion, folder, cfg.seed if per_seed else None, target=dm.name)
    dm.run_dir = str(run_dir)
    names = init.sources(cfg)
    if init.merges and len(names) < 2:
        raise ConfigError(f"sources: init={cfg.init} merges at least 2 source runs, got {names}")
    if init.models not in (None, len(names)):
        raise ConfigError(f"sources: init={cfg.init} merges exactly {init.models} source runs, got {names}")
    run_cfg = dataclasses.replace(cfg, inits=[cfg.init], seeds=[cfg.seed])
    net = cfg.net.build(dm.in_channels, dm.n_outputs)
    fused, _ = partition(net)
    sources = load_sources(cfg, names, net, fused, init.fisher, tuple(dm.modalities))
    base = None
    if init.base:
        plan, _ = input_plan(cfg.channel_map, tuple(dm.modalities), sources[0])
        base = load_base(
            runs_dir(cfg.runs_dir),
            cfg.merge.base,
            names[0],
            wandb_mode(cfg.logger),
            net.state_dict(),
            plan,
            input_names(net, fused),
        )
        layers, _ = mergeable_layers(net, [s.state for s in sources], layer_groups(net, fused))
        check_base(cfg.merge.base or f"{names[0]}/{INIT_FILE}", base, sources, layers)
    dm.check_layout()
    with stage_guard(run_dir):
        if not start_run(run_dir, run_cfg, TARGET_MARKER, force=cfg.force):
            log.info("%s is finished; pass force=true to run it again", run_dir)
            return run_dir
        stages: dict[str, Any] = {
            "init": cfg.init,
            "protocol": cfg.protocol,
            "sources": names,
            "specific": cfg.transfer.specific,
            "fisher_normalize": cfg.fisher.normalize if init.fisher else None,
        }
        tags = [dm.name, f"p{cfg.data.portion}", cfg.init, f"seed{cfg.seed}"]
        # One W&B run for the whole process, every stage under its own key prefix (what
        # `wandb agent`, which pins the process's run id, expects; see tmerge.loggers).
        name = f"p{cfg.data.portion}-{cfg.init}" if dm.name == BRATS_TARGET else f"{dm.name}-p{cfg.data.portion}-{cfg.init}"
        logger_cfg = _logger_cfg(cfg, tags, dm.name)
        with wandb_run(logger_cfg, runs_dir(cfg.runs_dir), name, to_container(run_cfg)) as run:
            _run_stages(cfg, init, dm, sources, base, run_dir, run, stages)
        return run_dir


def _run_stages(
    cfg: TargetStageConfig,
    init: Initialisation,
    dm: TargetDataModule,
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
    fixed = cfg.protocol == "fixed"
    if init.adapt is not None:
        net, stages["adaption"] = init.adapt(cfg, dm, net, sources, start, run_dir, run)
    elif fixed and cfg.fixed.warmup_epochs:  # the same steps for every init before fine-tuning
        net, stages["warmup"] = warm_up(cfg, dm, net, run_dir, run)

    module = segmentation_module(
        net, dm, cfg, cfg.data.patch_size, optim=cfg.stage_optim(), metrics=cfg.metrics
    )
    loggers = stage_loggers(run_dir, run, "finetune")
    # Label maps in original geometry: the test subjects', and (portion 100, paper §4.4) the
    # unlabelled validation set's under the BraTS submission naming <Brats18_ID>.nii.gz.
    predictions = run_dir / PREDICTIONS_DIR
    writer = PredictionWriter(test_dir=predictions, predict_dir=predictions / VALIDATION_DIR)
    extra: list[Any] = [writer]
    # The curve's last point is the final test's Dice (the same weights and subjects): one test
    # pass fewer per run.
    curve = LearningCurve(curve_score(dm), run_dir, score_last=False) if fixed and cfg.fixed.curve else None
    if curve is not None:
        extra.append(curve)
    trainer, result = fit(
        module,
        dm,
        run_dir=run_dir,
        trainer_cfg=cfg.trainer,
        loggers=loggers,
        callbacks=extra,
        name=f"p{cfg.data.portion}/{cfg.init} fine-tune",
        **({"max_epochs": cfg.fixed.epochs, "select": "last"} if fixed else {}),
    )
    stages["finetune"] = result.as_dict()
    tested = test_subjects(trainer, module, dm, result.best_path)
    if dm.subjects.get("predict"):
        log.info("predicting %d unlabelled subjects into %s", len(dm.subjects["predict"]), writer.predict_dir)
        ckpt = result.best_path or None
        trainer.predict(module, datamodule=dm, ckpt_path=ckpt, return_predictions=False, weights_only=True)
    names = label_names(dm.scheme)
    log_test_results(
        loggers, tested.records, dm.class_names, tested.previews, names, step=trainer.global_step
    )
    if curve is not None:
        dice = dice_summary(tested.records, dm.class_names)
        curve.add(
            cfg.fixed.epochs,
            # A finished fit is not repeated on resume: its trainer has taken no step.
            trainer.global_step or checkpoint_progress(Path(result.best_path))[1],
            {f"dice_{c}": v for c, v in dice.items() if v is not None},
            write=trainer.is_global_zero,
        )
    if trainer.is_global_zero:
        summary = write_results(run_dir, cfg, dm, module.net, tested.records, stages, run)
        log.info("%s p%s: test %s", cfg.init, cfg.data.portion, format_summary(summary))


def _logger_cfg(cfg: TargetStageConfig, tags: list[str], target: str = BRATS_TARGET) -> LoggerConfig:
    """W&B runs of one target and portion share a group (``brats-p4``, ``<target>-p100``)."""
    wandb = dataclasses.replace(
        cfg.logger.wandb,
        group=cfg.logger.wandb.group or f"{target}-p{cfg.data.portion}",
        tags=[*cfg.logger.wandb.tags, *tags],
    )
    return LoggerConfig(wandb=wandb)
