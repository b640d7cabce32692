"""The 3-D segmentation network of Isensee et al. (2017), as used by the T-IMM paper.

Layout for ``depth = L`` (levels ``l = 0 … L-1``, ``f_l = base_filters · 2**l`` filters):

* **Encoder level l** (``encoder.l``): an input conv block (stride 2 for ``l > 0``) followed by a
  context module (block → Dropout3d → block) whose output is added to the input conv's output
  (residual). 3 convolutions, 3 instance norms per level.
* **Decoder level l** (``decoder.i`` with ``i = L-2-l``, coarsest first): upsample ×2 → conv block
  (``f_{l+1} → f_l``), concatenation with the encoder's level-l output, localisation module
  (3³ block ``2·f_l → f_l``, then 1³ block ``f_l → f_l``). 3 convolutions, 3 instance norms.
* **Segmentation heads** (``seg_heads.k``): 1×1×1 convolutions with bias and no norm on the outputs
  of the ``min(3, L-1)`` finest decoder levels; coarser head outputs are upsampled and summed into
  the finer ones (deep supervision), giving one logit map at full resolution.

Counts: ``3L + 3(L-1) + min(3, L-1)`` convolutions and ``6L - 3`` instance norms, i.e. **30 and 27**
for the paper's ``L = 5`` (the localisation module keeps its 1³ block at every level, including the
finest: that is what makes the paper's counts come out).
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _NormBase
from torch.nn.modules.conv import _ConvNd

NEGATIVE_SLOPE = 0.01
"""LeakyReLU slope of the paper's network, also the ``a`` of its Kaiming initialisation."""


def init_weights(module: nn.Module) -> nn.Module:
    """(Re-)initialise every convolution and normalisation layer inside ``module``.

    Convolutions get Kaiming-normal weights for a LeakyReLU(0.01) non-linearity (fan-in mode) and
    zero biases; affine normalisation layers get unit scale and zero shift. Any sub-module works,
    which is how task-specific parts (norms, heads) are re-initialised for a new task.

    Args:
        module: The module to initialise in place (it may itself be a conv or norm layer).

    Returns:
        The same ``module``, for chaining.
    """
    for m in module.modules():
        if isinstance(m, _ConvNd):
            nn.init.kaiming_normal_(m.weight, a=NEGATIVE_SLOPE, nonlinearity="leaky_relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (_NormBase, nn.GroupNorm, nn.LayerNorm)):
            if getattr(m, "weight", None) is not None:
                nn.init.ones_(m.weight)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)
    return module


class ConvBlock(nn.Module):
    """Conv3d (k³, 'same' padding) → InstanceNorm3d(affine) → LeakyReLU(0.01).

    The convolution has no bias: the instance norm's shift would cancel it.

    Args:
        in_channels: Input channels ``C_in``.
        out_channels: Output channels ``C_out``.
        kernel_size: Cubic kernel size (3 or 1).
        stride: Convolution stride (2 halves each spatial dimension).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv3d(
            in_channels, out_channels, kernel_size, stride=stride, padding=kernel_size // 2, bias=False
        )
        self.norm = nn.InstanceNorm3d(out_channels, affine=True)
        self.act = nn.LeakyReLU(NEGATIVE_SLOPE, inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        """Map ``(B, C_in, D, H, W)`` to ``(B, C_out, D/stride, H/stride, W/stride)``."""
        return self.act(self.norm(self.conv(x)))


class ContextModule(nn.Module):
    """Block → Dropout3d → block, channel count unchanged.

    Args:
        channels: Channels ``C`` in and out.
        dropout: Probability of zeroing a whole channel between the two blocks.
    """

    def __init__(self, channels: int, dropout: float) -> None:
        super().__init__()
        self.block1 = ConvBlock(channels, channels)
        self.dropout = nn.Dropout3d(dropout)
        self.block2 = ConvBlock(channels, channels)

    def forward(self, x: Tensor) -> Tensor:
        """Map ``(B, C, D, H, W)`` to ``(B, C, D, H, W)``."""
        return self.block2(self.dropout(self.block1(x)))


class EncoderLevel(nn.Module):
    """Input conv block plus a residual context module.

    Args:
        in_channels: Channels of the level's input.
        out_channels: Filters of this level.
        stride: 1 at the top level, 2 below it.
        dropout: Dropout3d probability inside the context module.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int, dropout: float) -> None:
        super().__init__()
        self.conv = ConvBlock(in_channels, out_channels, 3, stride=stride)
        self.context = ContextModule(out_channels, dropout)

    def forward(self, x: Tensor) -> Tensor:
        """Map ``(B, C_in, D, H, W)`` to ``(B, C_out, D/s, H/s, W/s)``."""
        y = self.conv(x)
        return y + self.context(y)


class DecoderLevel(nn.Module):
    """Upsample ×2 → conv block, concatenate the skip, localisation module (3³ then 1³ block).

    Args:
        in_channels: Channels ``2·C`` coming from the coarser level.
        out_channels: Filters ``C`` of this level (also the skip's channel count).
        upsample_mode: ``"nearest"`` or ``"trilinear"`` interpolation for the ×2 upsampling.
    """

    def __init__(self, in_channels: int, out_channels: int, upsample_mode: str) -> None:
        super().__init__()
        self.upsample_mode = upsample_mode
        self.up = ConvBlock(in_channels, out_channels, 3)
        self.loc1 = ConvBlock(2 * out_channels, out_channels, 3)
        self.loc2 = ConvBlock(out_channels, out_channels, 1)

    def forward(self, x: Tensor, skip: Tensor) -> Tensor:
        """Map ``x`` ``(B, 2C, D, H, W)`` and ``skip`` ``(B, C, 2D, 2H, 2W)`` to ``(B, C, 2D, 2H, 2W)``."""
        y = self.up(_upsample(x, self.upsample_mode))
        y = torch.cat([skip, y], dim=1)
        return self.loc2(self.loc1(y))


def _upsample(x: Tensor, mode: str) -> Tensor:
    """Double the spatial size of ``(B, C, D, H, W)``."""
    if mode == "nearest":
        return F.interpolate(x, scale_factor=2, mode="nearest")
    return F.interpolate(x, scale_factor=2, mode="trilinear", align_corners=False)


class Isensee2017(nn.Module):
    """Isensee et al. (2017) residual U-Net with deep supervision, returning one logit map.

    Args:
        in_channels: Input modalities ``C`` (2 for HCP T1+T2, 4 for BraTS).
        n_classes: Output channels ``K`` (logits; softmax or sigmoid is the loss's business).
        base_filters: Filters at the top level; level ``l`` has ``base_filters · 2**l``.
        depth: Number of encoder levels ``L`` (>= 2); the paper uses 5 (30 convs, 27 norms).
        dropout: Dropout3d probability inside every context module.
        upsample_mode: ``"nearest"`` (default, as the reference implementation's UpSampling3D)
            or ``"trilinear"``.

    Raises:
        ValueError: On a non-positive channel/filter count, ``depth < 2``, a dropout outside
            ``[0, 1)`` or an unknown upsample mode.

    Example:
        >>> net = Isensee2017(in_channels=4, n_classes=3, base_filters=4, depth=3)
        >>> net(torch.zeros(1, 4, 16, 16, 16)).shape
        torch.Size([1, 3, 16, 16, 16])
    """

    head_prefixes: ClassVar[tuple[str, ...]] = ("seg_heads",)
    """Module prefixes whose parameters are task-specific (see :func:`tmerge.nets.partition`)."""

    def __init__(
        self,
        in_channels: int,
        n_classes: int,
        base_filters: int = 16,
        depth: int = 5,
        dropout: float = 0.3,
        upsample_mode: str = "nearest",
    ) -> None:
        super().__init__()
        for name, value in (
            ("in_channels", in_channels),
            ("n_classes", n_classes),
            ("base_filters", base_filters),
        ):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"Isensee2017: {name} must be a positive integer, got {value!r}")
        if not isinstance(depth, int) or depth < 2:
            raise ValueError(f"Isensee2017: depth must be an integer >= 2, got {depth!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"Isensee2017: dropout must lie in [0, 1), got {dropout!r}")
        if upsample_mode not in ("nearest", "trilinear"):
            raise ValueError(
                f"Isensee2017: upsample_mode must be 'nearest' or 'trilinear', got {upsample_mode!r}"
            )
        self.in_channels = in_channels
        self.n_classes = n_classes
        self.base_filters = base_filters
        self.depth = depth

        filters = [base_filters * 2**level for level in range(depth)]
        self.encoder = nn.ModuleList(
            EncoderLevel(
                in_channels if level == 0 else filters[level - 1],
                filters[level],
                1 if level == 0 else 2,
                dropout,
            )
            for level in range(depth)
        )
        # decoder[i] produces level depth-2-i: coarsest first, in the order the forward pass runs.
        self.decoder = nn.ModuleList(
            DecoderLevel(filters[level + 1], filters[level], upsample_mode)
            for level in reversed(range(depth - 1))
        )
        # Heads on the (up to) three finest decoder levels, coarsest first, matching decoder order.
        self.n_heads = min(3, depth - 1)
        self.head_levels = tuple(range(self.n_heads - 1, -1, -1))
        self.seg_heads = nn.ModuleList(
            nn.Conv3d(filters[level], n_classes, 1, bias=True) for level in self.head_levels
        )
        self.upsample_mode = upsample_mode
        init_weights(self)

    @property
    def divisor(self) -> int:
        """Every spatial input dimension must be a multiple of this (``2**(depth-1)``)."""
        return 2 ** (self.depth - 1)

    def forward(self, x: Tensor) -> Tensor:
        """Segment a batch of volumes.

        Args:
            x: Input ``(B, C, D, H, W)`` with ``C = in_channels`` and ``D, H, W`` multiples of
                ``2**(depth-1)``, not all equal to it.

        Returns:
            Logits ``(B, n_classes, D, H, W)``.

        Raises:
            ValueError: If ``x`` is not 5-D, has the wrong channel count, or a spatial size that
                is not a multiple of ``2**(depth-1)`` (or would leave a 1×1×1 bottleneck).
        """
        self._check_input(x)
        skips: list[Tensor] = []
        y = x
        for level in self.encoder:
            y = level(y)
            skips.append(y)
        logits: Tensor | None = None
        first_head_decoder = len(self.decoder) - self.n_heads
        for i, level in enumerate(self.decoder):
            y = level(y, skips[-2 - i])
            k = i - first_head_decoder
            if k >= 0:
                seg = self.seg_heads[k](y)
                # Deep supervision: coarser head outputs are brought to this resolution and summed.
                logits = seg if logits is None else seg + _upsample(logits, self.upsample_mode)
        assert logits is not None  # n_heads >= 1 because depth >= 2
        return logits

    def _check_input(self, x: Tensor) -> None:
        if x.ndim != 5:
            raise ValueError(f"Isensee2017 expects input (B, C, D, H, W), got shape {tuple(x.shape)}")
        if x.shape[1] != self.in_channels:
            raise ValueError(
                f"Isensee2017 built for in_channels={self.in_channels}, got input of shape {tuple(x.shape)}"
            )
        spatial = tuple(int(s) for s in x.shape[2:])
        if any(s % self.divisor for s in spatial):
            raise ValueError(
                f"Isensee2017 with depth={self.depth} needs spatial sizes divisible by {self.divisor}, "
                f"got input of shape {tuple(x.shape)}"
            )
        if all(s == self.divisor for s in spatial):
            # The bottleneck would be 1×1×1, where instance norm is undefined (zero variance).
            raise ValueError(
                f"Isensee2017 with depth={self.depth} needs a spatial size above {self.divisor} in at least "
                f"one dimension, got input of shape {tuple(x.shape)}"
            )

    def extra_repr(self) -> str:
        """Summarise the configuration in ``print(net)``."""
        return (
            f"in_channels={self.in_channels}, n_classes={self.n_classes}, base_filters={self.base_filters}, "
            f"depth={self.depth}, upsample_mode={self.upsample_mode!r}"
        )
