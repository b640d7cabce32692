"""The diagonal empirical Fisher information, F = (1/N) Σ_n (∇_θ ℓ_n)², and what a Fisher must be.

ℓ_n is the loss of ONE sample with its true label. The square is taken per sample: squaring the
gradient of a batch-mean loss (what several public EWC/IMM codes do) gives
(1/B²)(Σ_n ∇ℓ_n)², which drops every cross-sample cancellation and is not the Fisher.

Pure code, by job:

- :mod:`~tmerge.fisher.gradients`: one sample's loss and the squared per-sample gradients;
- :mod:`~tmerge.fisher.compute`: the Fisher of a model over a data loader (loop, ``vmap`` or
  compiled), its sums for reduction across DDP ranks;
- :mod:`~tmerge.fisher.policy`: which method ``"auto"`` takes, the options' one validation;
- :mod:`~tmerge.fisher.diagonal`: the one check of a Fisher and its normalisations.

The Lightning adapter that computes it at the end of training is
:class:`tmerge.callbacks.FisherCallback`.
"""

from tmerge.fisher.compute import FisherSums, compute_fisher_sums, empirical_fisher
from tmerge.fisher.diagonal import fisher_problem, normalize_fisher
from tmerge.fisher.gradients import LossFn, iter_samples, sample_loss
from tmerge.fisher.policy import (
    COMPILE_COST_S,
    COMPILE_SAVING_S_PER_VOXEL,
    METHODS,
    NORMALIZE,
    auto_method,
    autocast_for,
    check_options,
    compile_pays,
    vmap_chunk_size,
)

__all__ = [
    "COMPILE_COST_S",
    "COMPILE_SAVING_S_PER_VOXEL",
    "METHODS",
    "NORMALIZE",
    "FisherSums",
    "LossFn",
    "auto_method",
    "autocast_for",
    "check_options",
    "compile_pays",
    "compute_fisher_sums",
    "empirical_fisher",
    "fisher_problem",
    "iter_samples",
    "normalize_fisher",
    "sample_loss",
    "vmap_chunk_size",
]
