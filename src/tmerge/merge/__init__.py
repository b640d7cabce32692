"""Model merging: IMM (paper eq. 2), learned per-layer mixing ratios and the T-IMM adaption network."""

from tmerge.merge.adaptive import AdaptiveMerge, mergeable_layers
from tmerge.merge.imm import combine_packed, fisher_weights, imm_merge, merge_tensor, pack_terms
from tmerge.merge.mixing import LayerwiseMixing, mixing_ratios

__all__ = [
    "AdaptiveMerge",
    "LayerwiseMixing",
    "combine_packed",
    "fisher_weights",
    "imm_merge",
    "merge_tensor",
    "mergeable_layers",
    "mixing_ratios",
    "pack_terms",
]
