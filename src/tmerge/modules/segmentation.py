"""The LightningModule that trains a segmentation network: source tasks, fine-tuning, adaption.

The network is passed in (a plain ``nn.Module``; for the adaption stage an
:class:`~tmerge.merge.AdaptiveMerge` wrapping it), so one class serves every stage. Only
parameters with ``requires_grad`` are optimised, which is how the adaption stage trains δ and S
alone.

One file of ~450 lines on purpose: the losses, the optimiser and the sliding-window
validation/test belong to the one LightningModule every stage shares; their maths lives
elsewhere (:mod:`tmerge.metrics`, :mod:`tmerge.evaluate`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from monai.inferers import sliding_window_inference
from monai.losses import DiceCELoss, DiceLoss
from torch import nn

from tmerge.callbacks.nonfinite_guard import NonFiniteGuard
from tmerge.config import check_count, check_number
from tmerge.data.schemes import LabelScheme
from tmerge.errors import ConfigError
from tmerge.evaluate import N_PREVIEWS, MetricsConfig, Prediction, evaluate_subject, preview, summarise
from tmerge.fastpath import CompiledForward, enable_cudnn_benchmark
from tmerge.metrics import PerClassMean, check_output_mode, dice_per_class

log = logging.getLogger("tmerge")


@dataclass
class OptimConfig:
    """Optimiser and learning-rate schedule."""

    lr: float = 5e-4  # Isensee et al. 2017: Adam at 5e-4
    weight_decay: float = 1e-5  # Isensee et al. 2017 (L2 on the weights)
    # "plateau": decay by plateau_factor when the validation loss stalls (Isensee et al. 2017);
    # "poly": lr · (1 − step/total)^0.9 over the epoch budget (nnU-Net), for fixed short budgets.
    schedule: str = "plateau"
    plateau_factor: float = 0.5  # LR decay when the validation loss stalls
    plateau_patience: int = 5  # epochs without improvement before the LR decays
    min_lr: float = 1e-6

    def __post_init__(self) -> None:
        if self.schedule not in ("plateau", "poly"):
            raise ConfigError(f"optim.schedule: expected 'plateau' or 'poly', got {self.schedule!r}")
        check_number("optim.lr", self.lr)  # a negative rate would climb the loss
        check_number("optim.weight_decay", self.weight_decay, strict=False)
        check_number("optim.plateau_factor", self.plateau_factor, below=1.0)  # torch's own rule
        check_count("optim.plateau_patience", self.plateau_patience, 0)
        check_number("optim.min_lr", self.min_lr, strict=False)


@dataclass
class LossConfig:
    """Training objective and inference settings."""

    # "dice": multi-class soft Dice over the foreground classes/regions (Isensee et al. 2017);
    # "dice_ce": Dice + cross-entropy, converges faster on very small budgets.
    name: str = "dice"
    # Validation/test inference window: 0 = the training patch, else a multiple of the network's
    # divisor (net.divisor; checked where the run's config is composed). Whole volumes up to this
    # edge are predicted in one pass (the CPU default sets 64 = the embedded data's grid).
    sw_roi: int = 0
    sw_overlap: float = 0.25  # sliding-window overlap for volumes larger than the window
    sw_batch_size: int = 2

    def __post_init__(self) -> None:
        # Here, not only in build_loss: a typo in the config is the user's, refused before a run
        # folder exists, in one line.
        if self.name not in LOSSES:
            raise ConfigError(f"loss.name: expected one of {', '.join(LOSSES)}, got {self.name!r}")
        # MONAI's sliding window would refuse these only when the first volume is inferred.
        if self.sw_roi < 0:
            raise ConfigError(
                f"loss.sw_roi: got {self.sw_roi}; expected 0 (the training patch) or a multiple of net.divisor"
            )
        check_number("loss.sw_overlap", self.sw_overlap, strict=False, below=1.0)
        check_count("loss.sw_batch_size", self.sw_batch_size, 1)


#: The training objectives :func:`build_loss` knows.
LOSSES = ("dice", "dice_ce")


def build_loss(name: str, output_mode: str) -> nn.Module:
    """Loss on logits ``(B, C, ...)`` and targets in the convention of ``output_mode``.

    softmax: targets are class indices ``(B, 1, ...)``, Dice over the foreground classes
    (+ cross-entropy over all classes for ``dice_ce``).
    sigmoid: targets are region masks ``(B, C, ...)``, Dice over every region (+ binary
    cross-entropy per region for ``dice_ce``: the regions overlap, so not a softmax CE).
    """
    check_output_mode(output_mode)
    if name not in LOSSES:
        raise ValueError(f"loss.name must be 'dice' or 'dice_ce', got {name!r}")
    # batch=True: Dice over the whole batch per class (Isensee et al. 2017), so a class absent
    # from one patch does not push its prediction towards zero.
    if output_mode == "sigmoid":
        dice = DiceLoss(include_background=True, sigmoid=True, batch=True)
        # MONAI's DiceCELoss applies a softmax cross-entropy whenever there is more than one
        # channel, which would treat the nested regions ET ⊂ TC ⊂ WT as exclusive classes.
        return dice if name == "dice" else _PlusBCE(dice)
    loss_cls = DiceLoss if name == "dice" else DiceCELoss
    return _IndexTargets(loss_cls(include_background=False, softmax=True, batch=True))


class _PlusBCE(nn.Module):
    """``dice(logits, masks) + BCEWithLogits(logits, masks)`` for overlapping region outputs."""

    def __init__(self, dice: nn.Module) -> None:
        super().__init__()
        self.dice = dice

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        target = target.to(logits.dtype)
        return self.dice(logits, target) + nn.functional.binary_cross_entropy_with_logits(logits, target)


class _IndexTargets(nn.Module):
    """Feeds class-index targets ``(B, 1, ...)`` to a one-hot loss.

    The one-hot encoding is an out-of-place comparison rather than MONAI's in-place
    ``scatter_`` (``to_onehot_y``), so the loss also runs under ``torch.func.vmap`` — which the
    batched per-sample Fisher needs.
    """

    def __init__(self, loss: nn.Module) -> None:
        super().__init__()
        self.loss = loss

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        classes = torch.arange(logits.shape[1], device=logits.device).view(1, -1, *([1] * (logits.ndim - 2)))
        return self.loss(logits, (target == classes).to(logits.dtype))


def param_groups(
    named_parameters: Iterable[tuple[str, nn.Parameter]],
    lr: float,
    weight_decay: float,
    group_lrs: Mapping[str, float] | None = None,
) -> list[dict[str, Any]]:
    """Optimiser parameter groups: the trainable parameters at ``lr``, except those under a
    prefix of ``group_lrs``, which get that learning rate and no weight decay.

    The adaption stage gives δ (``net.mixing.``) its own, larger rate: with Adam a parameter
    moves about one learning rate per step, and δ must travel a few units (α = 0.9 for two
    sources needs δ¹ − δ² ≈ 4.4) within a few hundred steps. Weight decay would pull δ back
    towards 0, i.e. towards IMM's uniform α, so δ has none.

    Args:
        named_parameters: ``module.named_parameters()``; parameters without ``requires_grad`` are
            left out.
        lr: the learning rate of every other trainable parameter.
        weight_decay: their L2 weight decay.
        group_lrs: name prefix → learning rate. Each prefix must match at least one trainable
            parameter.

    Returns:
        ``[{"params", "lr", "weight_decay", "name"}, …]``: the default group first (``"name":
        "default"``, omitted if empty), then one group per prefix, in ``group_lrs`` order.

    Raises:
        ValueError: a prefix that matches no trainable parameter (a typo would otherwise train
            δ at the default rate without a word).
    """
    prefixes = dict(group_lrs or {})
    grouped: dict[str, list[nn.Parameter]] = {p: [] for p in prefixes}
    default: list[nn.Parameter] = []
    for name, param in named_parameters:
        if not param.requires_grad:
            continue
        prefix = next((p for p in prefixes if name.startswith(p)), None)
        (default if prefix is None else grouped[prefix]).append(param)
    empty = [p for p, params in grouped.items() if not params]
    if empty:
        raise ValueError(f"param_groups: no trainable parameter under the prefix(es) {empty}")
    groups = (
        [{"params": default, "lr": lr, "weight_decay": weight_decay, "name": "default"}] if default else []
    )
    groups += [
        {"params": grouped[p], "lr": float(prefixes[p]), "weight_decay": 0.0, "name": p} for p in prefixes
    ]
    return groups


class SegmentationModule(L.LightningModule):
    """Trains ``net`` on patches, validates and tests on whole volumes.

    Args:
        net: maps images ``(B, C_in, D, H, W)`` to logits ``(B, C_out, D, H, W)``.
        output_mode: ``"softmax"`` (targets ``(B, 1, ...)`` class indices) or ``"sigmoid"``
            (targets ``(B, C_out, ...)`` region masks).
        class_names: names of the scored classes (foreground classes or regions), used in log keys
            ``val/dice_<name>``.
        patch_size: training patch edge; larger validation volumes use sliding-window inference.
        optim: optimiser settings.
        loss: loss and inference settings.
        group_lrs: parameter-name prefix → its own learning rate (no weight decay), e.g.
            ``{"net.mixing.": 0.05}`` for the adaption stage's δ (see :func:`param_groups`).
        scheme: how label maps are made and scored (:class:`~tmerge.data.schemes.LabelScheme`,
            e.g. a dataset's own regions); None: the output mode's built-in one (softmax classes,
            or the BraTS regions).
        metrics: how the test scores are computed (HD95 definition, empty-region convention;
            :class:`~tmerge.evaluate.MetricsConfig`); None: the defaults.

        channels_last: keep activations in NDHWC layout (faster convolutions).
        compile: run the network through ``torch.compile`` (:class:`~tmerge.fastpath.CompiledForward`,
            set up in :meth:`configure_model`; falls back to eager with a warning if compiling
            fails). ``self.net`` and the state-dict keys stay those of the eager network.

    Logged: ``train/loss``, ``val/loss``, ``val/dice`` (mean over classes), ``val/dice_<class>``;
    ``test/loss``, ``test/dice``, ``test/dice_<class>``, ``test/hd95``, ``test/hd95_<class>``.

    Validation scores Dice on the preprocessed (cropped) grid, cheaply, every epoch. Testing
    scores each subject in its original geometry (:func:`tmerge.evaluate.evaluate_subject`: Dice
    and HD95 in mm, full volume); ``test_step`` and ``predict_step`` return each volume's label
    map in its original geometry (:class:`~tmerge.evaluate.Prediction`), which a
    :class:`~tmerge.callbacks.PredictionWriter` writes out.

    Attributes:
        test_records: After testing, one dict per test subject of all ranks, sorted by id:
            ``subject``, ``dice_<class>``, ``hd95_<class>``.
        test_previews: After testing, up to :data:`N_PREVIEWS` slices
            (:func:`tmerge.evaluate.preview`) for the dashboard.
        nonfinite: The :class:`~tmerge.callbacks.NonFiniteGuard` that stops training on a NaN/inf
            loss; :meth:`configure_callbacks` hands it to every trainer of this module.
    """

    def __init__(
        self,
        net: nn.Module,
        *,
        output_mode: str,
        class_names: Sequence[str],
        patch_size: int | Sequence[int],
        optim: OptimConfig | None = None,
        loss: LossConfig | None = None,
        channels_last: bool = False,
        compile: bool = False,
        group_lrs: Mapping[str, float] | None = None,
        scheme: LabelScheme | None = None,
        metrics: MetricsConfig | None = None,
    ) -> None:
        super().__init__()
        self.metrics = metrics or MetricsConfig()
        self.group_lrs = dict(group_lrs or {})
        # Channels-last (NDHWC) activations: ~30 % faster 3-D convolutions on CPUs (oneDNN)
        # and on GPUs under mixed precision. Only the memory layout changes, never the numbers.
        self.memory_format = torch.channels_last_3d if channels_last else torch.contiguous_format
        self.net = net.to(memory_format=self.memory_format)
        self.compile_net = compile
        self._fast_net: CompiledForward | None = None  # set in configure_model
        self.output_mode = check_output_mode(output_mode)
        self.class_names = list(class_names)
        # How label maps are made and scored; None: the built-in scheme of the output mode.
        self.scheme = scheme or LabelScheme.of(self.output_mode, self.class_names)
        if (self.scheme.mode, list(self.scheme.classes)) != (self.output_mode, self.class_names):
            raise ValueError(
                f"scheme {self.scheme.mode} {list(self.scheme.classes)} does not fit output_mode "
                f"{self.output_mode!r} and class_names {self.class_names}"
            )
        self.patch_size = (patch_size,) * 3 if isinstance(patch_size, int) else tuple(patch_size)
        self.optim = optim or OptimConfig()
        self.loss_cfg = loss or LossConfig()
        self.loss_fn = build_loss(self.loss_cfg.name, output_mode)
        self.val_dice = PerClassMean(len(self.class_names))
        self.test_records: list[dict[str, Any]] = []
        self.test_previews: list[dict[str, Any]] = []
        self._progress_start = time.perf_counter()
        # A NaN/inf loss stops training with the step and subjects named, without a host
        # synchronisation per step on accelerators. A callback the module brings along
        # (configure_callbacks), so that every fit of this module has it.
        self.nonfinite = NonFiniteGuard(every=25)

    def configure_callbacks(self) -> list[Callback]:
        """The callbacks every trainer of this module needs: the non-finite loss guard."""
        return [self.nonfinite]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, C_out, D, H, W)`` for images ``(B, C_in, D, H, W)``."""
        net = self._fast_net if self._fast_net is not None else self.net
        return net(x.contiguous(memory_format=self.memory_format))

    def configure_model(self) -> None:
        """Accelerator fast paths, once per process: cuDNN autotuning on CUDA, the compiled net."""
        # self.device may still be the CPU here (the strategy moves the module afterwards).
        if self.trainer.strategy.root_device.type == "cuda":
            enable_cudnn_benchmark()
        if self.compile_net and self._fast_net is None:
            self._fast_net = CompiledForward(self.net)

    def sample_loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Loss of one sample (batch dim 1) — the per-sample loss the empirical Fisher squares."""
        return self.loss_fn(output, target)

    def infer(self, image: torch.Tensor) -> torch.Tensor:
        """Logits for a whole volume, by sliding windows when it is larger than the patch."""
        roi = (self.loss_cfg.sw_roi,) * 3 if self.loss_cfg.sw_roi else self.patch_size
        if all(s <= r for s, r in zip(image.shape[2:], roi, strict=True)):
            return self(image)
        return sliding_window_inference(
            image,
            roi_size=roi,
            sw_batch_size=self.loss_cfg.sw_batch_size,
            predictor=self,
            overlap=self.loss_cfg.sw_overlap,
            mode="gaussian",
        )

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        loss = self.loss_fn(self(batch["image"]), batch["label"])
        self.log(
            "train/loss",
            loss,
            on_step=False,
            on_epoch=True,
            prog_bar=True,
            batch_size=batch["image"].shape[0],
        )
        return loss

    def _evaluate(self, batch: dict[str, Any], split: str, metric: PerClassMean) -> torch.Tensor:
        logits = self.infer(batch["image"])
        loss = self.loss_fn(logits, batch["label"])
        dice = dice_per_class(logits, batch["label"], self.output_mode)
        metric.update(dice)
        self.log(
            f"{split}/loss", loss, on_step=False, on_epoch=True, sync_dist=True, batch_size=dice.shape[0]
        )
        return dice

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, "val", self.val_dice)

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> list[Prediction]:
        """Score each whole volume of the batch in its original geometry; return the predictions."""
        logits = self.infer(batch["image"])
        n = logits.shape[0]
        if "label" in batch:
            loss = self.loss_fn(logits, batch["label"])
            self.log("test/loss", loss, on_step=False, on_epoch=True, sync_dist=True, batch_size=n)
        predictions = []
        for i, (subject, meta, result) in enumerate(self._predict_volumes(batch, batch_idx, logits)):
            if result.scores:
                self.test_records.append({"subject": subject, **result.scores, **result.counts})
            if len(self.test_previews) < N_PREVIEWS:
                self.test_previews.append(preview(batch["image"][i], result, meta, subject))
            predictions.append(Prediction(subject, result.labels, meta))
        self._log_progress("test", batch_idx, self.trainer.num_test_batches)
        return predictions

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> list[Prediction]:
        """Predict whole volumes in their original geometry."""
        volumes = self._predict_volumes(batch, batch_idx, self.infer(batch["image"]))
        predictions = [Prediction(s, result.labels, meta) for s, meta, result in volumes]
        self._log_progress("predict", batch_idx, self.trainer.num_predict_batches)
        return predictions

    def _predict_volumes(self, batch: dict[str, Any], batch_idx: int, logits: torch.Tensor) -> Any:
        """Yield ``(subject, meta, SubjectResult)`` per volume."""
        n = logits.shape[0]
        subjects = batch.get("subject", [f"{batch_idx}_{i}" for i in range(n)])
        metas = batch.get("meta", [None] * n)
        labels = batch.get("label")
        for i, (subject, meta) in enumerate(zip(subjects, metas, strict=True)):
            target = None if labels is None else labels[i]
            result = evaluate_subject(logits[i], target, meta, self.scheme, metrics=self.metrics)
            yield str(subject), meta, result

    def _log_progress(self, what: str, batch_idx: int, totals: Sequence[int | float]) -> None:
        """A progress line every 10 volumes and at the end (rank 0: its share of the volumes)."""
        if batch_idx == 0:
            self._progress_start = time.perf_counter()
        total = int(sum(t for t in totals if t != float("inf")))
        done = batch_idx + 1
        if self.trainer.is_global_zero and (done % 10 == 0 or done == total):
            elapsed = time.perf_counter() - self._progress_start
            log.info("%s: %d/%d volumes (%.0f s)", what, done, total, elapsed)

    def _log_dice(self, split: str, metric: PerClassMean) -> None:
        # torchmetrics squeezes a one-element result to 0-d: a single-class task needs the reshape.
        scores = metric.compute().reshape(-1)
        self.log(f"{split}/dice", scores.mean(), prog_bar=True)
        for name, value in zip(self.class_names, scores, strict=True):
            self.log(f"{split}/dice_{name}", value)
        metric.reset()

    def on_validation_epoch_end(self) -> None:
        self._log_dice("val", self.val_dice)

    def on_test_epoch_start(self) -> None:
        self.test_records = []
        self.test_previews = []

    def on_test_epoch_end(self) -> None:
        # Means over the gathered records, not over each rank's batches: DistributedSampler may
        # repeat subjects to even out the ranks, and a repeated subject must count once.
        self.test_records = _gather_records(self.test_records)
        self.test_previews = _gather_records(self.test_previews)[:N_PREVIEWS]
        if not self.test_records:
            return
        summary = summarise(self.test_records, self.class_names, self.metrics.convention)
        # Every rank holds the same records, so the synced mean is that value. A mean is None
        # only under metrics.convention=brats2023, for a class empty in every subject: not logged.
        hd95 = [v for v in summary["hd95"].values() if v is not None]
        if summary["dice"]["mean"] is not None:
            self.log("test/dice", summary["dice"]["mean"], sync_dist=True)
        if hd95:
            self.log("test/hd95", sum(hd95) / len(hd95), sync_dist=True)
        for name in self.class_names:
            for metric in ("dice", "hd95"):
                if summary[metric][name] is not None:
                    self.log(f"test/{metric}_{name}", summary[metric][name], sync_dist=True)

    def configure_optimizers(self) -> dict[str, Any]:
        groups = param_groups(self.named_parameters(), self.optim.lr, self.optim.weight_decay, self.group_lrs)
        optimizer = torch.optim.Adam(groups)
        if self.optim.schedule == "poly":
            total = max(1, int(self.trainer.estimated_stepping_batches))
            floor = self.optim.min_lr / self.optim.lr  # of the default group (δ's decays alike)
            poly = torch.optim.lr_scheduler.LambdaLR(
                optimizer, lambda step: max(floor, (1 - min(step, total) / total) ** 0.9)
            )
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": poly, "interval": "step"}}
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer,
            factor=self.optim.plateau_factor,
            patience=self.optim.plateau_patience,
            min_lr=self.optim.min_lr,
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "monitor": "val/loss"}}


def _gather_records(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per-subject records from every DDP rank, each subject once (DistributedSampler may pad
    the last batch by repeating subjects)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return records
    gathered: list[list[dict[str, Any]]] = [[] for _ in range(dist.get_world_size())]
    dist.all_gather_object(gathered, records)
    unique: dict[str, dict[str, Any]] = {}
    for part in gathered:
        for rec in part:
            unique.setdefault(str(rec["subject"]), rec)
    return sorted(unique.values(), key=lambda r: str(r["subject"]))
