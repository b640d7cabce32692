"""MONAI's 3-D segmentation networks with their P/S split declared (``net.name=dynunet|segresnet|unet``).

Each class is MONAI's own network (``monai.networks.nets``), constructed for 3-D volumes with
``n_classes`` logit channels, with two additions:

* ``head_prefixes``: the module prefixes of its output head(s), which :func:`tmerge.nets.partition`
  puts in the task-specific set S together with every normalisation layer; every other
  parameter (the convolutions of the encoder and decoder) is fused (P).
* ``divisor``: every spatial input dimension must be a multiple of it (the product of the
  downsampling strides).

Parameter names are MONAI's, so MONAI state dicts load into them; theirs load into MONAI's
classes too (a DynUNet's with ``strict=False``: its ``skip_layers`` names, aliases, are left out).

=============  ==========================================================  ========================
network        S (task-specific)                                           norm
=============  ==========================================================  ========================
``DynUNet``    ``output_block`` (+ ``deep_supervision_heads``), the norms  InstanceNorm3d (affine)
``SegResNet``  ``conv_final`` (GroupNorm → ReLU → 1³ conv), the norms      GroupNorm(8)
``UNet``       ``model.2`` (the top up-sampling level), the norms          InstanceNorm3d (affine)
=============  ==========================================================  ========================

MONAI's ``DynUNet`` reaches its encoder blocks under two names (``input_block``, ``downsamples.k``,
… and again under ``skip_layers``). ``named_parameters()`` lists each parameter once under its
first name, so :func:`~tmerge.nets.partition` and :func:`~tmerge.nets.layer_groups` see each
once; :mod:`tmerge.stateless` substitutes every name in functional calls (the Fisher's ``vmap``
path, the adaption stage). Its ``state_dict()`` here also holds each tensor once (safetensors
refuses tensors that share memory), and ``load_state_dict`` accepts a state dict with or without
the ``skip_layers`` names.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, ClassVar

from monai.networks import nets as monai_nets
from torch import nn

from tmerge.stateless import shared_names

LEAKY_RELU = ("leakyrelu", {"negative_slope": 0.01})
"""The activation of DynUNet (MONAI's default, but not in place) and of UNet here (MONAI's default
for UNet is a PReLU, whose learned slope would be one more fused "layer" of a single number per
convolution)."""

INSTANCE_NORM = ("instance", {"affine": True})
"""Instance norm with a learned scale and shift: the task-specific S of the paper's network."""

SEGRESNET_GROUPS = 8
"""SegResNet's GroupNorm groups (MONAI's default); its filter counts must be multiples of it."""


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_sizes(who: str, name: str, values: Sequence[int], least: int, minimum: int = 1) -> list[int]:
    """``values`` as a list of at least ``least`` integers, each ``>= minimum``."""
    values = list(values)
    if len(values) < least or any(not _is_int(v) or v < minimum for v in values):
        raise ValueError(f"{who}: {name} must be at least {least} integer(s) >= {minimum}, got {values!r}")
    return values


def _check_common(who: str, in_channels: int, n_classes: int, dropout: float) -> None:
    for name, value in (("in_channels", in_channels), ("n_classes", n_classes)):
        if not _is_int(value) or value < 1:
            raise ValueError(f"{who}: {name} must be a positive integer, got {value!r}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"{who}: dropout must lie in [0, 1), got {dropout!r}")


def _drop_alias_keys(module: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    """State-dict post-hook: keep each shared tensor under its first name only."""
    for others in shared_names(module).values():
        for other in others:
            state_dict.pop(prefix + other, None)


def _fill_alias_keys(
    module: nn.Module,
    state_dict: dict[str, Any],
    prefix: str,
    local_metadata: Any,
    strict: bool,
    missing_keys: list[str],
    unexpected_keys: list[str],
    error_msgs: list[str],
) -> None:
    """Load-state-dict pre-hook: give a shared tensor's other names the value of its first."""
    for first, others in shared_names(module).items():
        if prefix + first in state_dict:
            for other in others:
                state_dict.setdefault(prefix + other, state_dict[prefix + first])



def _check_levels(
    name: str,
    in_channels: int,
    n_classes: int,
    dropout: float,
    filters: Sequence[int],
    strides: Sequence[int],
    kernel_size: int,
) -> tuple[list[int], list[int]]:
    """The checks a U-Net of levels shares (DynUNet, UNet): channels, dropout, one stride per
    level below the first, an odd kernel. Returns ``filters`` and ``strides`` as lists.

    Raises:
        ValueError: naming the network and the value it got.
    """
    _check_common(name, in_channels, n_classes, dropout)
    filters = _check_sizes(name, "filters", filters, 2)
    strides = _check_sizes(name, "strides", strides, 1)
    if len(strides) != len(filters) - 1:
        raise ValueError(
            f"{name}: strides must have one entry per level below the first "
            f"({len(filters) - 1} for filters={filters}), got {strides}"
        )
    if not _is_int(kernel_size) or kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"{name}: kernel_size must be an odd positive integer, got {kernel_size!r}")
    return filters, strides

class DynUNet(monai_nets.DynUNet):
    """MONAI's ``DynUNet`` (the nnU-Net layout): one encoder level per entry of ``filters``.

    Level 0 works at full resolution; level ``l > 0`` is reached by a stride-``strides[l-1]``
    convolution and left by a transposed convolution of the same stride. Every block is two
    ``kernel_size``³ convolutions (no bias) with affine instance norm and LeakyReLU(0.01), or a
    residual block with ``res_block``.

    Args:
        in_channels: Input modalities.
        n_classes: Output channels (logits).
        filters: Filters per level, e.g. ``(8, 16, 32, 64, 128)``.
        strides: Downsampling stride between consecutive levels (``len(filters) - 1`` entries).
        kernel_size: Cubic kernel size of every convolution block (odd).
        dropout: Dropout probability in every block (0: none).
        res_block: Residual convolution blocks (MONAI's ``UnetResBlock``).
        deep_supervision: MONAI's deep supervision: in training mode the output becomes a stack
            of ``1 + deep_supr_num`` logit maps, which the stages' loss does not take; the heads
            (``deep_supervision_heads``) are task-specific. The stages build it without.
        deep_supr_num: Deep-supervision heads (with ``deep_supervision``).

    Raises:
        ValueError: On non-positive channel counts, fewer than 2 levels, a stride list of
            another length, an even kernel size or a dropout outside ``[0, 1)``.
    """

    def __init__(
        self,
        in_channels: int,
        n_classes: int,
        filters: Sequence[int] = (8, 16, 32, 64, 128),
        strides: Sequence[int] = (2, 2, 2, 2),
        kernel_size: int = 3,
        dropout: float = 0.0,
        res_block: bool = False,
        deep_supervision: bool = False,
        deep_supr_num: int = 1,
    ) -> None:
        filters, strides = _check_levels("DynUNet", in_channels, n_classes, dropout, filters, strides, kernel_size)
        super().__init__(
            spatial_dims=3,
            in_channels=in_channels,
            out_channels=n_classes,
            kernel_size=[kernel_size] * len(filters),
            strides=[1, *strides],
            upsample_kernel_size=strides,
            filters=filters,
            dropout=dropout or None,
            norm_name=INSTANCE_NORM,
            act_name=LEAKY_RELU,
            deep_supervision=deep_supervision,
            deep_supr_num=deep_supr_num,
            res_block=res_block,
        )
        self.n_classes = n_classes
        #: Module prefixes whose parameters are task-specific (see :func:`tmerge.nets.partition`).
        self.head_prefixes: tuple[str, ...] = ("output_block",) + (
            ("deep_supervision_heads",) if deep_supervision else ()
        )
        self.register_state_dict_post_hook(_drop_alias_keys)
        self.register_load_state_dict_pre_hook(_fill_alias_keys)

    @property
    def divisor(self) -> int:
        """Every spatial input dimension must be a multiple of this (the product of the strides)."""
        return math.prod(self.strides[1:])


class SegResNet(monai_nets.SegResNet):
    """MONAI's ``SegResNet`` (Myronenko 2018, without the VAE branch).

    Level ``l`` has ``init_filters · 2**l`` filters and ``blocks_down[l]`` residual blocks
    (GroupNorm(8) → ReLU → 3³ conv, twice); the decoder has ``blocks_up[k]`` blocks per level.
    The output head ``conv_final`` (GroupNorm → ReLU → 1³ conv) is task-specific.

    Args:
        in_channels: Input modalities.
        n_classes: Output channels (logits).
        init_filters: Filters of the first level (a multiple of 8, the GroupNorm's groups).
        blocks_down: Residual blocks per encoder level (at least 2 levels).
        blocks_up: Residual blocks per decoder level (``len(blocks_down) - 1`` entries).
        dropout: Dropout probability after the first convolution (0: none).

    Raises:
        ValueError: On non-positive counts, ``init_filters`` not a multiple of 8, a
            ``blocks_up`` of another length or a dropout outside ``[0, 1)``.
    """

    head_prefixes: ClassVar[tuple[str, ...]] = ("conv_final",)
    """Module prefixes whose parameters are task-specific (see :func:`tmerge.nets.partition`)."""

    def __init__(
        self,
        in_channels: int,
        n_classes: int,
        init_filters: int = 8,
        blocks_down: Sequence[int] = (1, 2, 2, 4),
        blocks_up: Sequence[int] = (1, 1, 1),
        dropout: float = 0.0,
    ) -> None:
        _check_common("SegResNet", in_channels, n_classes, dropout)
        if not _is_int(init_filters) or init_filters < 1 or init_filters % SEGRESNET_GROUPS:
            raise ValueError(
                f"SegResNet: init_filters must be a positive multiple of {SEGRESNET_GROUPS} "
                f"(the GroupNorm's groups), got {init_filters!r}"
            )
        blocks_down = _check_sizes("SegResNet", "blocks_down", blocks_down, 2)
        blocks_up = _check_sizes("SegResNet", "blocks_up", blocks_up, 1)
        if len(blocks_up) != len(blocks_down) - 1:
            raise ValueError(
                f"SegResNet: blocks_up must have one entry per level below the first "
                f"({len(blocks_down) - 1} for blocks_down={blocks_down}), got {blocks_up}"
            )
        super().__init__(
            spatial_dims=3,
            init_filters=init_filters,
            in_channels=in_channels,
            out_channels=n_classes,
            dropout_prob=dropout or None,
            norm=("group", {"num_groups": SEGRESNET_GROUPS}),
            blocks_down=tuple(blocks_down),
            blocks_up=tuple(blocks_up),
        )
        self.n_classes = n_classes

    @property
    def divisor(self) -> int:
        """Every spatial input dimension must be a multiple of this (``2**(levels - 1)``)."""
        return 2 ** (len(self.blocks_down) - 1)


class UNet(monai_nets.UNet):
    """MONAI's ``UNet`` (residual units, Kerfoot et al. 2018): one level per entry of ``filters``.

    Level 0 is already reached by a stride-``strides[0]`` convolution; the top up-sampling level
    (``model.2``, a transposed convolution to ``n_classes`` channels, then a residual unit) is the
    output head and task-specific. Convolutions have biases; norms are affine instance norms,
    activations LeakyReLU(0.01).

    Args:
        in_channels: Input modalities.
        n_classes: Output channels (logits).
        filters: Filters per level (MONAI's ``channels``), at least 2.
        strides: Stride of each level's first convolution (``len(filters) - 1`` entries).
        kernel_size: Cubic kernel size of every convolution (odd), down and up.
        res_units: Residual units per level (MONAI's ``num_res_units``; 0: plain convolutions).
        dropout: Dropout probability after every convolution (0: none).

    Raises:
        ValueError: On non-positive counts, fewer than 2 levels, a stride list of another
            length, an even kernel size, negative ``res_units`` or a dropout outside ``[0, 1)``.
    """

    head_prefixes: ClassVar[tuple[str, ...]] = ("model.2",)
    """Module prefixes whose parameters are task-specific (see :func:`tmerge.nets.partition`)."""

    def __init__(
        self,
        in_channels: int,
        n_classes: int,
        filters: Sequence[int] = (8, 16, 32, 64, 128),
        strides: Sequence[int] = (2, 2, 2, 2),
        kernel_size: int = 3,
        res_units: int = 2,
        dropout: float = 0.0,
    ) -> None:
        filters, strides = _check_levels("UNet", in_channels, n_classes, dropout, filters, strides, kernel_size)
        if not _is_int(res_units) or res_units < 0:
            raise ValueError(f"UNet: res_units must be an integer >= 0, got {res_units!r}")
        super().__init__(
            spatial_dims=3,
            in_channels=in_channels,
            out_channels=n_classes,
            channels=filters,
            strides=strides,
            kernel_size=kernel_size,
            up_kernel_size=kernel_size,
            num_res_units=res_units,
            act=LEAKY_RELU,
            norm=INSTANCE_NORM,
            dropout=dropout,
        )
        self.n_classes = n_classes

    @property
    def divisor(self) -> int:
        """Every spatial input dimension must be a multiple of this (the product of the strides)."""
        return math.prod(self.strides)
