"""The ``tmerge`` command: one sub-command per stage, ``key=value`` overrides after it.

    tmerge data                                  # generate the embedded default datasets
    tmerge task1 trainer.max_epochs=3            # M1 on HCP labels 1:7
    tmerge task2                                 # M2, initialised from M1, labels 8:14
    tmerge source labels=all split=all           # an All-HCP baseline model
    tmerge task1 --profile paper                 # the paper's scale (experiments/paper/)
    tmerge task1 --show-config                   # print the resolved config and exit

Configs: dataclass defaults < ``experiments/[paper/]<stage>.yaml`` < command line. Errors in the
user's input (files, keys, missing runs) print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from tmerge.config import PROFILES, compose, to_yaml
from tmerge.errors import TmergeError

log = logging.getLogger("tmerge")


@dataclass(frozen=True)
class Command:
    """A sub-command: its config schema, experiment file, short keys and runner (imported lazily
    so that ``tmerge --help`` does not import torch)."""

    help: str
    schema: Callable[[], type]
    run: Callable[[], Callable[[Any], Any]]
    aliases: Callable[[], dict[str, str]] = dict
    experiment: str | None = None
    preset: tuple[str, ...] = ()  # overrides applied before the user's (e.g. init=timm)


def _source_schema() -> type:
    from tmerge.stages.source import SourceStageConfig

    return SourceStageConfig


def _source_aliases() -> dict[str, str]:
    from tmerge.stages.source import ALIASES

    return ALIASES


def _run_source() -> Callable[[Any], Any]:
    from tmerge.stages.source import run_source

    return run_source


def _data_schema() -> type:
    from tmerge.stages.data import DataStageConfig

    return DataStageConfig


def _run_data() -> Callable[[Any], Any]:
    from tmerge.stages.data import run_data

    return run_data


def _target_schema() -> type:
    from tmerge.stages.target import TargetStageConfig

    return TargetStageConfig


def _target_aliases() -> dict[str, str]:
    from tmerge.stages.target import ALIASES

    return ALIASES


def _run_target() -> Callable[[Any], Any]:
    from tmerge.stages.target import run_target

    return run_target


def _run_sweep() -> Callable[[Any], Any]:
    from tmerge.stages.target import run_sweep

    return run_sweep


def _forgetting_schema() -> type:
    from tmerge.stages.forgetting import ForgettingConfig

    return ForgettingConfig


def _run_forgetting() -> Callable[[Any], Any]:
    from tmerge.stages.forgetting import run_forgetting

    return run_forgetting


COMMANDS: dict[str, Command] = {
    "data": Command(
        "generate the embedded default datasets (HCP-like and BraTS-like)",
        _data_schema,
        _run_data,
        experiment="data",
    ),
    "task1": Command(
        "train M1 on HCP labels 1:7 (paper task 1) and compute its Fisher",
        _source_schema,
        _run_source,
        _source_aliases,
        "task1",
    ),
    "task2": Command(
        "train M2 from M1 on HCP labels 8:14 (paper task 2) and compute its Fisher",
        _source_schema,
        _run_source,
        _source_aliases,
        "task2",
    ),
    "source": Command(
        "train another source model, e.g. the All-HCP baselines (labels=all split=all)",
        _source_schema,
        _run_source,
        _source_aliases,
        "source",
    ),
    "timm": Command(
        "T-IMM on BraTS: adaption (learn α per layer) then fine-tune and test",
        _target_schema,
        _run_target,
        _target_aliases,
        "brats",
        ("init=timm",),
    ),
    "imm": Command(
        "IMM on BraTS: uniform Fisher-weighted merge, fine-tune and test",
        _target_schema,
        _run_target,
        _target_aliases,
        "brats",
        ("init=imm",),
    ),
    "target": Command(
        "one BraTS run with any initialisation (init=none|m1|m2|imm|mean-imm|timm|all-hcp…)",
        _target_schema,
        _run_target,
        _target_aliases,
        "brats",
    ),
    "forgetting": Command(
        "paper Table 4: P of M1, M2, IMM and T-IMM with the source tasks' S on the HCP test split",
        _forgetting_schema,
        _run_forgetting,
        experiment="forgetting",
    ),
    "sweep": Command(
        "every initialisation in `inits` (per seed in `seeds`) on identical splits",
        _target_schema,
        _run_sweep,
        _target_aliases,
        "brats",
    ),
}


def configure_logging() -> None:
    """``[tmerge] …`` progress lines on stderr; Lightning's banners and known-harmless warnings
    silenced so that what remains is worth reading."""
    import warnings

    ours = logging.getLogger("tmerge")
    # Bind to the sys.stderr of *this* call (a previous call's stream may be gone, e.g. when
    # main() runs several times in one process, as in the tests).
    for old in [h for h in ours.handlers if getattr(h, "tmerge_cli", False)]:
        ours.removeHandler(old)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("[tmerge] %(message)s"))
    handler.tmerge_cli = True  # type: ignore[attr-defined]
    ours.addHandler(handler)
    ours.setLevel(logging.INFO)
    ours.propagate = False
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    for message in (
        r".*isinstance\(treespec, LeafSpec\)",  # Lightning internals on newer torch
        r"Checkpoint directory .* exists and is not empty",  # the run folder holds config.yaml first
        r".*does not have many workers",  # in-memory datasets: workers would only add overhead
    ):
        warnings.filterwarnings("ignore", message=message)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tmerge",
        description="T-IMM: transfer learning by adaptive merging of multiple models.",
        epilog="Run `tmerge <command> --help` for a command's options; `--show-config` prints every key.",
    )
    sub = parser.add_subparsers(dest="command", metavar="<command>", required=True)
    for name, cmd in COMMANDS.items():
        p = sub.add_parser(
            name,
            help=cmd.help,
            description=f"{cmd.help}. Overrides are key=value pairs (OmegaConf dotlist), e.g. trainer.max_epochs=3.",
        )
        p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
        p.add_argument(
            "--profile",
            choices=PROFILES,
            default=os.environ.get("TMERGE_PROFILE", "default"),
            help="experiment family: 'default' (embedded data, CPU-sized) or 'paper' (128³, full lengths)",
        )
        p.add_argument("--show-config", action="store_true", help="print the resolved config and exit")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``tmerge`` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    configure_logging()
    cmd = COMMANDS[args.command]
    try:
        cfg = compose(
            cmd.schema(),
            cmd.experiment,
            [*cmd.preset, *args.overrides],
            profile=args.profile,
            aliases=cmd.aliases(),
        )
        if args.show_config:
            print(to_yaml(cfg), end="")
            return 0
        cmd.run()(cfg)
    except TmergeError as exc:
        print(f"tmerge {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"tmerge {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
