"""Computes and saves the empirical Fisher of the best model at the end of training.

The Fisher itself (per-sample gradients, sums, normalisation, what a Fisher must be) is in
:mod:`tmerge.fisher`; this module is only its Lightning adapter: which weights, which samples on
which rank, the reduction over ranks and the file.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Sequence
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from typing_extensions import override

from tmerge.errors import RunError
from tmerge.fisher import (
    LossFn,
    autocast_for,
    check_options,
    compute_fisher_sums,
    fisher_problem,
    normalize_fisher,
)
from tmerge.io import write_safetensors
from tmerge.runs import FISHER_FILE


class FisherCallback(pl.Callback):
    """Compute the empirical Fisher of the trained network at the end of training and save it.

    In ``on_train_end``: load the best checkpoint's weights (if the trainer's checkpoint callback
    has a ``best_model_path``; else keep the current weights), compute Fisher sums over the
    datamodule's ``fisher_dataset()`` with samples sharded across ranks (rank ``r`` takes indices
    ``r::world_size``), sum the sums and counts over ranks, divide, normalise, and let rank 0
    write ``<dirpath>/<filename>`` atomically with metadata ``samples``, ``normalize``,
    ``method``, ``precision``, ``names``, ``world_size``, ``checkpoint`` and ``seconds`` (rank
    0's wall time of the computation, data loading included). The computation runs in
    the trainer's numerics (:func:`~tmerge.fisher.autocast_for`): bf16 autocast after
    ``"bf16-mixed"`` training, float32 otherwise; sums are float32 either way.

    Contract: the LightningModule has an attribute ``net`` (the ``nn.Module`` whose parameters get
    a Fisher; the saved keys are ``net``-relative names) and a method
    ``sample_loss(output (1, K, …), target (1, …)) -> scalar``; ``trainer.datamodule`` has
    ``fisher_dataset() -> Dataset`` of un-batched ``{"image": (C, D, H, W), "label": …}``
    dicts, deterministic (no augmentation).

    No ``state_dict``: everything it holds is made in ``on_train_end``, after the last checkpoint
    of the fit, so a resumed fit has nothing of it to restore.

    Args:
        dirpath: Output folder (default: ``trainer.default_root_dir``).
        filename: Output file name, ending in ``.safetensors``.
        max_samples: Use at most this many samples of the dataset (``None``: all).
        normalize: ``"none"``, ``"sum"``, ``"l2"`` or ``"per_tensor"``
            (:func:`~tmerge.fisher.normalize_fisher`).
        method: ``"auto"``, ``"loop"``, ``"vmap"`` or ``"compile"``.
        names: ``net`` parameter names (default: all its parameters); stages pass the fused set.
        chunk_size: Samples per ``vmap`` call (``None``: 4 on CPU, from free memory on a GPU).
        num_workers: DataLoader workers reading the Fisher dataset.

    Attributes:
        path: Where the Fisher was written (``None`` before ``on_train_end``).
        fisher: The computed Fisher ``{name: F}`` (float32 CPU tensors shaped like the
            parameters), on every rank, after ``on_train_end``.
        best_path: The checkpoint whose weights ``on_train_end`` loaded into the LightningModule,
            which still holds them afterwards: a caller that wants the best weights need not read
            that checkpoint again. ``None`` before ``on_train_end`` and when there was no best
            checkpoint (the module kept its final weights).

    Raises:
        ValueError: From ``__init__`` on an invalid argument (the message shows the value); from
            ``on_train_end`` if the Fisher dataset yields no sample.
        TypeError: From ``on_train_end`` if the module or datamodule breaks the contract.
        RunError: From ``on_train_end`` if the best checkpoint cannot be read, or the Fisher is
            not finite (both name the file).

    Example:
        >>> callback = FisherCallback(normalize="none", max_samples=16)
        >>> trainer = pl.Trainer(callbacks=[callback], max_epochs=1)  # doctest: +SKIP
        >>> trainer.fit(module, datamodule=dm)  # doctest: +SKIP
        >>> fisher = load_fisher(callback.path)  # doctest: +SKIP
    """

    def __init__(
        self,
        dirpath: str | os.PathLike | None = None,
        filename: str = FISHER_FILE,
        max_samples: int | None = None,
        normalize: str = "none",
        method: str = "auto",
        names: Sequence[str] | None = None,
        chunk_size: int | None = None,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        check_options(normalize=normalize, method=method, chunk_size=chunk_size, max_samples=max_samples)
        if not isinstance(filename, str) or not filename.endswith(".safetensors") or "/" in filename:
            raise ValueError(
                f"FisherCallback: filename must be a bare '*.safetensors' name, got {filename!r}"
            )
        if not isinstance(num_workers, int) or num_workers < 0:
            raise ValueError(
                f"FisherCallback: num_workers must be a non-negative integer, got {num_workers!r}"
            )
        if names is not None and (isinstance(names, str) or not all(isinstance(n, str) for n in names)):
            raise ValueError(f"FisherCallback: names must be a sequence of parameter names, got {names!r}")
        self.dirpath = Path(dirpath) if dirpath is not None else None
        self.filename = filename
        self.max_samples = max_samples
        self.normalize = normalize
        self.method = method
        self.names = list(names) if names is not None else None
        self.chunk_size = chunk_size
        self.num_workers = num_workers
        self.path: Path | None = None
        self.fisher: dict[str, Tensor] | None = None
        self.best_path: str | None = None

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        net, loss_fn, dataset = self._contract(trainer, pl_module)
        checkpoint = self._load_best(trainer, pl_module)

        n_total = len(dataset) if self.max_samples is None else min(len(dataset), self.max_samples)
        rank, world = trainer.global_rank, trainer.world_size
        shard = torch.utils.data.Subset(dataset, list(range(rank, n_total, world)))
        loader = torch.utils.data.DataLoader(shard, batch_size=1, shuffle=False, num_workers=self.num_workers)
        result = compute_fisher_sums(
            net,
            loader,
            loss_fn,
            names=self.names,
            method=self.method,
            chunk_size=self.chunk_size,
            device=pl_module.device,
            autocast_dtype=autocast_for(trainer.precision),
            progress=trainer.is_global_zero,  # a counted bar: minutes per volume at paper scale
        )

        # One all-reduce of everything (sums flattened, then the count) instead of one per tensor.
        names = list(result.sums)
        flat = torch.cat([result.sums[n].flatten() for n in names] + [torch.tensor([float(result.count)])])
        flat = trainer.strategy.reduce(flat.to(pl_module.device), reduce_op="sum").cpu()
        count = int(round(float(flat[-1])))
        if count == 0:
            raise ValueError(
                f"FisherCallback: the Fisher dataset of {type(trainer.datamodule).__name__} is empty; "
                f"got {len(dataset)} samples (max_samples={self.max_samples}) over {world} rank(s)"
            )
        fisher: dict[str, Tensor] = {}
        offset = 0
        for n in names:
            size = result.sums[n].numel()
            fisher[n] = (flat[offset : offset + size] / count).view_as(result.sums[n])
            offset += size
        path = (self.dirpath or Path(trainer.default_root_dir)) / self.filename
        problem = fisher_problem(fisher, {}, str(path))
        if problem:
            raise RunError(f"{problem}; the model or loss produced NaN/inf gradients")
        fisher = normalize_fisher(fisher, self.normalize)

        if trainer.is_global_zero:
            metadata = {
                "samples": count,
                "normalize": self.normalize,
                "method": result.method,
                "precision": result.precision,
                "names": len(names),
                "world_size": world,
                "checkpoint": checkpoint or "",
                "seconds": round(result.seconds, 3),
            }
            write_safetensors(path, fisher, metadata)
        # Other ranks may read the file right after fit(); wait until it exists.
        trainer.strategy.barrier("fisher_written")
        self.fisher, self.path, self.best_path = fisher, path, checkpoint

    def _contract(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule
    ) -> tuple[nn.Module, LossFn, torch.utils.data.Dataset]:
        """The module's ``net`` and ``sample_loss`` and the datamodule's Fisher dataset.

        Raises:
            TypeError: naming what is missing and the type that lacks it (a programming error:
                the stages always pass a SegmentationModule and a tmerge DataModule).
        """
        net = getattr(pl_module, "net", None)
        if not isinstance(net, nn.Module):
            raise TypeError(
                f"FisherCallback: {type(pl_module).__name__} has no 'net' attribute holding an nn.Module"
                f" (got {type(net).__name__})"
            )
        loss_fn = getattr(pl_module, "sample_loss", None)
        if not callable(loss_fn):
            raise TypeError(
                f"FisherCallback: {type(pl_module).__name__} has no method sample_loss(output, target)"
                f" (got {type(loss_fn).__name__})"
            )
        datamodule = getattr(trainer, "datamodule", None)
        make = getattr(datamodule, "fisher_dataset", None)
        if not callable(make):
            raise TypeError(
                "FisherCallback: trainer.datamodule must provide fisher_dataset() -> Dataset, "
                f"got {type(datamodule).__name__}"
            )
        dataset = make()
        if not hasattr(dataset, "__len__") or not hasattr(dataset, "__getitem__"):
            raise TypeError(
                f"FisherCallback: {type(datamodule).__name__}.fisher_dataset() must return a map-style "
                f"Dataset with __len__, got {type(dataset).__name__}"
            )
        return net, loss_fn, dataset

    @staticmethod
    def _load_best(trainer: pl.Trainer, pl_module: pl.LightningModule) -> str | None:
        """Load the best checkpoint's weights into ``pl_module``; return its path (or None).

        Raises:
            RunError: the checkpoint (a file in the run folder) cannot be read, naming it.
        """
        callback = trainer.checkpoint_callback
        best = getattr(callback, "best_model_path", "") if callback is not None else ""
        if not best:
            return None
        try:
            # Never unpickle arbitrary objects, not even from our own run folder.
            checkpoint = torch.load(best, map_location="cpu", weights_only=True)
            state = checkpoint["state_dict"]
        except (OSError, KeyError, RuntimeError, EOFError, pickle.UnpicklingError) as exc:
            raise RunError(f"{best}: cannot read the best checkpoint for the Fisher ({exc})") from None
        pl_module.load_state_dict(state)
        return str(best)
