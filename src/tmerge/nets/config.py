"""Typed configuration of the segmentation network (``net.*``): which network and its sizes."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from tmerge.errors import ConfigError

#: ``net.name`` → the class it builds (also the ``arch`` recorded beside the weights).
NETS: dict[str, str] = {
    "isensee2017": "Isensee2017",
    "dynunet": "DynUNet",
    "segresnet": "SegResNet",
    "unet": "UNet",
}

#: ``net.name`` → the keys that make up its architecture: recorded beside the weights, with the
#: name, and compared between sources and target (``dropout`` and ``channels_last`` are not).
ARCH_FIELDS: dict[str, tuple[str, ...]] = {
    "isensee2017": ("base_filters", "depth"),
    "dynunet": ("filters", "strides", "kernel_size", "res_block"),
    "segresnet": ("init_filters", "blocks_down", "blocks_up"),
    "unet": ("filters", "strides", "kernel_size", "res_units"),
}

#: The network of weights whose metadata has no ``name`` (written before ``net.name`` existed).
LEGACY_NAME = "isensee2017"


@dataclass
class NetConfig:
    """The network (``name``) and its shape; input/output channels follow the task's data.

    Only the keys of the chosen network are used (and checked): ``base_filters``/``depth`` for
    ``isensee2017``; ``filters``/``strides``/``kernel_size`` with ``res_block`` (``dynunet``) or
    ``res_units`` (``unet``); ``init_filters``/``blocks_down``/``blocks_up`` for ``segresnet``.
    """

    name: str = "isensee2017"  # isensee2017 | dynunet | segresnet | unet (MONAI's)
    # isensee2017: 16 is the paper's width (16…256 filters); the CPU default experiments use 8 so
    # that the embedded-data pipeline trains in minutes on two cores.
    base_filters: int = 16
    depth: int = 5  # levels; 5 gives the paper's 30 convolutions and 27 instance norms
    # dynunet, unet: filters per level and the downsampling stride between consecutive levels
    # (len(filters) - 1 entries; the patch and the sliding window are multiples of their product,
    # `divisor`: 16 for 4 strides of 2).
    filters: list[int] = field(default_factory=lambda: [8, 16, 32, 64, 128])
    strides: list[int] = field(default_factory=lambda: [2, 2, 2, 2])
    kernel_size: int = 3  # dynunet, unet: cubic kernel of every convolution block (odd)
    res_block: bool = False  # dynunet: residual blocks (MONAI's UnetResBlock)
    res_units: int = 2  # unet: residual units per level (MONAI's num_res_units; 0: plain convs)
    # segresnet: init_filters · 2**l filters at level l (a multiple of 8, its GroupNorm groups),
    # residual blocks per encoder level and per decoder level (one fewer); MONAI's defaults.
    init_filters: int = 8
    blocks_down: list[int] = field(default_factory=lambda: [1, 2, 2, 4])
    blocks_up: list[int] = field(default_factory=lambda: [1, 1, 1])
    # Dropout3d in Isensee2017's context modules (Isensee et al. 2017); MONAI's nets: their
    # dropout (every block of dynunet/unet, after segresnet's first convolution).
    dropout: float = 0.3
    # NDHWC activations: measured 0.63 → 0.45 s per training step (base 8, 2×48³) on 2 CPU cores.
    channels_last: bool = True

    def __post_init__(self) -> None:
        if self.name not in NETS:
            raise ConfigError(f"net.name: expected one of {', '.join(NETS)}, got {self.name!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"net.dropout: expected a probability in [0, 1), got {self.dropout!r}")
        if self.name == "isensee2017":
            _positive("base_filters", self.base_filters)
            if self.depth < 2:
                raise ConfigError(f"net.depth: expected an integer >= 2, got {self.depth!r}")
        elif self.name in ("dynunet", "unet"):
            _sizes("filters", self.filters, least=2)
            _sizes("strides", self.strides, least=1)
            if len(self.strides) != len(self.filters) - 1:
                raise ConfigError(
                    f"net.strides: expected {len(self.filters) - 1} entries, one per level below the first "
                    f"of net.filters={list(self.filters)}, got {list(self.strides)}"
                )
            if self.kernel_size < 1 or self.kernel_size % 2 == 0:
                raise ConfigError(
                    f"net.kernel_size: expected an odd positive integer, got {self.kernel_size!r}"
                )
            if self.res_units < 0:
                raise ConfigError(f"net.res_units: expected an integer >= 0, got {self.res_units!r}")
        else:  # segresnet
            from tmerge.nets.monai_nets import SEGRESNET_GROUPS

            if self.init_filters < 1 or self.init_filters % SEGRESNET_GROUPS:
                raise ConfigError(
                    f"net.init_filters: expected a positive multiple of {SEGRESNET_GROUPS} "
                    f"(SegResNet's GroupNorm groups), got {self.init_filters!r}"
                )
            _sizes("blocks_down", self.blocks_down, least=2)
            _sizes("blocks_up", self.blocks_up, least=1)
            if len(self.blocks_up) != len(self.blocks_down) - 1:
                raise ConfigError(
                    f"net.blocks_up: expected {len(self.blocks_down) - 1} entries, one per level below the "
                    f"first of net.blocks_down={list(self.blocks_down)}, got {list(self.blocks_up)}"
                )

    @property
    def divisor(self) -> int:
        """Every spatial input size must be a multiple of this: the product of the network's
        downsampling strides (``2**(depth-1)`` for isensee2017, ``prod(strides)`` for dynunet and
        unet, ``2**(len(blocks_down)-1)`` for segresnet; the built network's ``divisor``). The
        data's patch size, the sliding window and the volumes' padding follow it."""
        if self.name == "isensee2017":
            return 2 ** (self.depth - 1)
        if self.name in ("dynunet", "unet"):
            return math.prod(int(s) for s in self.strides)
        return 2 ** (len(self.blocks_down) - 1)

    @property
    def smallest_input(self) -> int:
        """The smallest cubic input edge the network takes: twice :attr:`divisor` where its
        bottleneck is instance-normalised (undefined on one voxel: isensee2017, dynunet, unet),
        the divisor itself for segresnet (group norm)."""
        return self.divisor if self.name == "segresnet" else 2 * self.divisor

    def check_input_size(self, key: str, size: int, alternative: str = "") -> None:
        """Refuse a cubic input edge (a patch, a sliding window) this network cannot take.

        Args:
            key: the config key of ``size``, named in the error.
            alternative: what else the key accepts, said before the multiple (e.g.
                ``"0 (the training patch) or "``); the caller lets that value through.

        Raises:
            ConfigError: one line naming ``key``, the value and ``net.divisor``.
        """
        d = self.divisor
        if size % d or size < self.smallest_input:
            at_least = f" of at least {self.smallest_input}" if self.smallest_input > d else ""
            raise ConfigError(
                f"{key}: got {size}; expected {alternative}a multiple of {d}{at_least} (net.divisor: the "
                f"{self.name} network downsamples {d}× in every axis)"
            )

    @property
    def arch(self) -> str:
        """The class :meth:`build` makes (``"Isensee2017"``, ``"DynUNet"``, …)."""
        return NETS[self.name]

    def label(self) -> str:
        """The network and its sizes in a few words, e.g. ``"Isensee2017 base 16 depth 5"``."""
        sizes = " ".join(
            f"{key.replace('_', ' ')} {_compact(getattr(self, key))}" for key in ARCH_FIELDS[self.name]
        )
        return f"{self.arch} {sizes}"

    def architecture(self) -> dict[str, Any]:
        """``{"name": …, <its sizes>}``: what is recorded beside the weights and must agree
        between the sources and the target (``{"name", "base_filters", "depth"}`` for the
        default network, as in weight files written before ``net.name`` existed)."""
        out: dict[str, Any] = {"name": self.name}
        for key in ARCH_FIELDS[self.name]:
            value = getattr(self, key)
            out[key] = [int(v) for v in value] if isinstance(value, (list, tuple)) else value
        return out

    def build(self, in_channels: int, n_classes: int) -> nn.Module:
        """A freshly initialised network of this config, e.g. :class:`~tmerge.nets.Isensee2017`."""
        if self.name == "isensee2017":
            from tmerge.nets.isensee2017 import Isensee2017

            return Isensee2017(
                in_channels=in_channels,
                n_classes=n_classes,
                base_filters=self.base_filters,
                depth=self.depth,
                dropout=self.dropout,
            )
        from tmerge.nets import monai_nets

        if self.name == "dynunet":
            return monai_nets.DynUNet(
                in_channels,
                n_classes,
                filters=list(self.filters),
                strides=list(self.strides),
                kernel_size=self.kernel_size,
                dropout=self.dropout,
                res_block=self.res_block,
            )
        if self.name == "segresnet":
            return monai_nets.SegResNet(
                in_channels,
                n_classes,
                init_filters=self.init_filters,
                blocks_down=list(self.blocks_down),
                blocks_up=list(self.blocks_up),
                dropout=self.dropout,
            )
        return monai_nets.UNet(
            in_channels,
            n_classes,
            filters=list(self.filters),
            strides=list(self.strides),
            kernel_size=self.kernel_size,
            res_units=self.res_units,
            dropout=self.dropout,
        )


def stored_architecture(meta: dict[str, Any]) -> dict[str, Any]:
    """Weights' metadata with the network's ``name`` filled in where it predates ``net.name``."""
    return {"name": LEGACY_NAME, **meta}


def _compact(value: Any) -> str:
    """A size for :meth:`NetConfig.label`: ``[8, 16, 32]`` → ``"8/16/32"``, ``True`` → ``"yes"``."""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (list, tuple)):
        return "/".join(str(v) for v in value)
    return str(value)


def _positive(key: str, value: int) -> None:
    if value < 1:
        raise ConfigError(f"net.{key}: expected a positive integer, got {value!r}")


def _sizes(key: str, values: list[int], least: int) -> None:
    if len(values) < least or any(v < 1 for v in values):
        raise ConfigError(f"net.{key}: expected at least {least} positive integer(s), got {list(values)}")
