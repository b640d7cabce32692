"""Source-task training: M1 (task 1, HCP labels 1:7), M2 (task 2, labels 8:14, initialised from
M1) and the paper's All-HCP baselines — then the empirical Fisher of the best model.

Outputs in ``runs/<name>/`` (layout: :mod:`tmerge.runs`): the checkpoints, the best weights with
their architecture, the Fisher of the fused parameters, the splits, the config, the CSV log
and, written last, the marker with the validation scores.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L

from tmerge.artifacts import SOURCE_TYPE, log_model
from tmerge.callbacks import FisherCallback
from tmerge.config import to_container
from tmerge.data.hcp import HCPDataConfig, HCPDataModule
from tmerge.errors import ConfigError, RunError
from tmerge.io import file_sha256, write_json
from tmerge.loggers import stage_loggers, wandb_run
from tmerge.merge.distance import layer_distances, summarise_distances
from tmerge.nets import head_names, layer_groups, partition
from tmerge.paths import runs_dir
from tmerge.resume import is_rank_zero
from tmerge.runner import check_trainer, fit
from tmerge.runs import (
    FISHER_FILE,
    INIT_FILE,
    NET_FILE,
    SOURCE_MARKER,
    best_state_dict,
    save_net,
)
from tmerge.sources import Source, load_source
from tmerge.stages.configs import FisherConfig, RunConfig
from tmerge.stages.module import architecture_meta, segmentation_module
from tmerge.stages.protocol import stage_guard, start_run
from tmerge.transfer import transfer_parameters

log = logging.getLogger("tmerge")

MARKER = SOURCE_MARKER
#: Keys that must agree between a model and the weights it is initialised from, beside the
#: network's name and sizes (``NetConfig.architecture()``).
ARCH_KEYS = ("in_channels",)


@dataclass
class SourceStageConfig(RunConfig):
    """Config of a source-model run (``tmerge task1``, ``tmerge task2``, ``tmerge source``)."""

    # Run folder name under runs/. None: derived from the data (all-hcp, all-hcp-1-7, …).
    name: str | None = None
    # Run whose weights initialise this one ("task1" for M2: incremental training keeps the
    # parameters of the source models in correspondence, paper §3.1). None: fresh He init.
    init_from: str | None = None
    data: HCPDataConfig = field(default_factory=HCPDataConfig)
    fisher: FisherConfig = field(default_factory=FisherConfig)


#: Short command-line keys: ``tmerge source labels=all split=all``.
ALIASES = {"labels": "data.labels", "split": "data.split", "epochs": "trainer.max_epochs"}


def run_name(cfg: SourceStageConfig) -> str:
    """The run folder's name: ``cfg.name`` or, for All-HCP baselines, ``all-hcp[-1-7|-8-14]``."""
    if cfg.name:
        return cfg.name
    label_set = cfg.data.label_set  # the split's own set when `labels` is unset
    labels = "" if label_set == "all" else "-" + label_set.replace(":", "-")
    return f"{'all-hcp' if cfg.data.split == 'all' else cfg.data.split}{labels}"


def net_meta(cfg: SourceStageConfig, dm: HCPDataModule) -> dict:
    """Architecture and task description stored beside the weights."""
    return {
        **architecture_meta(cfg, dm),
        "labels": cfg.data.label_set,
        "split": cfg.data.split,
    }


def run_source(cfg: SourceStageConfig) -> Path:
    """Train one source model and its Fisher; return the run folder. Skips a finished run."""
    root = runs_dir(cfg.runs_dir)
    name = run_name(cfg)
    run_dir = root / name
    if cfg.init_from == name:
        raise ConfigError(f"init_from: a run cannot start from itself ({name!r})")
    check_trainer(cfg.trainer)  # this machine runs the trainer settings (accelerator, devices, …)
    # Everything that can fail on the user's input is checked before the run folder is touched
    # (the DataModule does no I/O before prepare_data).
    dm = HCPDataModule(**dataclasses.asdict(cfg.data), run_dir=str(run_dir), divisor=cfg.net.divisor)
    meta = net_meta(cfg, dm)
    init_source = _load_init(root, cfg, meta) if cfg.init_from else None
    dm.check_layout()
    with stage_guard(run_dir):
        if not start_run(run_dir, cfg, MARKER, force=cfg.force):
            log.info("%s is finished (%s); pass force=true to train it again", run_dir, run_dir / MARKER)
            return run_dir

        L.seed_everything(cfg.seed, workers=True, verbose=False)
        net = cfg.net.build(dm.in_channels, dm.n_outputs)
        fused, specific = partition(net)
        if init_source is not None:
            report = transfer_parameters(net, init_source.state, exclude=head_names(net, specific))
            log.info("%s: initialised from %s — %s", name, init_source.folder / NET_FILE, report.summary())
        elif is_rank_zero():
            # θ₀, the base of the task vectors τ = θ − θ₀ of this model and of every model that
            # descends from it (M2 starts from M1): task arithmetic, TIES, DARE (tmerge merge).
            save_net(run_dir / INIT_FILE, net, meta)

        module = segmentation_module(net, dm, cfg, cfg.data.patch_size)
        fisher = FisherCallback(
            dirpath=str(run_dir),
            filename=FISHER_FILE,
            max_samples=cfg.fisher.max_samples,
            normalize=cfg.fisher.normalize,
            method=cfg.fisher.method,
            names=fused,
        )
        with wandb_run(cfg.logger, root, name, to_container(cfg)) as run:
            trainer, result = fit(
                module,
                dm,
                run_dir=run_dir,
                trainer_cfg=cfg.trainer,
                loggers=stage_loggers(run_dir, run),
                callbacks=[fisher],
                name=name,
            )
            scores = result.best_metrics
            distance = None
            if trainer.is_global_zero:
                # The Fisher callback left the best weights in the module (it computed the Fisher
                # of them); only a fit skipped as finished hands back a freshly built one.
                if result.best_path and fisher.best_path != result.best_path:
                    module.net.load_state_dict(best_state_dict(result.best_path))
                # The weights name their Fisher by its hash: a Fisher file swapped in from another
                # model (or run) is refused when the two are merged.
                fisher_file = run_dir / FISHER_FILE
                fisher_sha = file_sha256(fisher_file) if fisher_file.is_file() else None
                init_file = run_dir / INIT_FILE
                links = {
                    "fisher_sha256": fisher_sha,
                    "init_sha256": file_sha256(init_file) if init_file.is_file() else None,
                }
                save_net(run_dir / NET_FILE, module.net, {**meta, **links})
                # IMM assumes the models it merges sit in one basin: record how far this one moved
                # from the model it started from (M2 from M1), per fused layer.
                if init_source is not None:
                    per_layer = layer_distances(
                        init_source.state, module.net.state_dict(), layer_groups(module.net, fused)
                    )
                    distance = {"from": cfg.init_from, **summarise_distances(per_layer), "per_layer": per_layer}
                write_json(
                    run_dir / MARKER,
                    {
                        "name": name,
                        "val_dice": scores.get("val/dice"),
                        "val_dice_per_class": {c: scores.get(f"val/dice_{c}") for c in dm.class_names},
                        "epochs": result.epochs,
                        "best_epoch": result.best_epoch,
                        "wall_s": result.wall_s,
                        "checkpoint": result.best_path,
                        "fused_tensors": len(fused),
                        "task_specific_tensors": len(specific),
                        "distance_from_init": distance,
                    },
                )
                # The files a target needs to merge this model, hash-linked, as one W&B artifact.
                files = {f: run_dir / f for f in (NET_FILE, FISHER_FILE, INIT_FILE, MARKER)}
                log_model(run, name, SOURCE_TYPE, files, {**meta, **links})
        log.info(
            "%s: best val Dice %.3f after %d epochs (%.0f s)",
            name,
            scores.get("val/dice", float("nan")),
            result.epochs,
            result.wall_s,
        )
        if trainer.is_global_zero and distance is not None:
            log.info(
                "%s: per layer ‖θ − θ(%s)‖/‖θ(%s)‖ %.2f–%.2f (median %.2f), cosine %.2f–%.2f",
                name,
                cfg.init_from,
                cfg.init_from,
                distance["rel_distance_min"],
                distance["rel_distance_max"],
                distance["rel_distance_median"],
                distance["cosine_min"],
                distance["cosine_max"],
            )
        return run_dir


def _load_init(root: Path, cfg: SourceStageConfig, meta: dict) -> Source:
    """The run this one starts from (``init_from``), of this run's architecture (``ARCH_KEYS``)."""
    path = root / str(cfg.init_from) / NET_FILE
    if not path.is_file():
        raise RunError(
            f"{run_name(cfg)} starts from the model of run {cfg.init_from!r}, but {path} does not exist; "
            f"train it first (e.g. `make {cfg.init_from}`)"
        )
    expected = {**{k: meta[k] for k in ARCH_KEYS}, **cfg.net.architecture()}
    return load_source(root, str(cfg.init_from), expected=expected)
